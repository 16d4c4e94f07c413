"""Mutation check of the method's fast tests (issue 11): break one line at a time, run the test
that guards it, and say whether it went red. Run from the repository root:

    .venv/bin/python tests/mutation_check.py

Every line must print RED. Each file is restored after its run, whatever happens.
"""

import os
import subprocess
import sys

# (file, line as it is, the broken line, the test (-k) that must turn red)
MUT = [
 ("src/beear_pipeline/beear/entrapment.py", "    return unwanted_loss - away_weight * safe_loss.clamp(max=away_cap)", "    return -(unwanted_loss - away_weight * safe_loss.clamp(max=away_cap))", "test_inner_level_moves"),
 ("src/beear_pipeline/beear/entrapment.py", "    return unwanted_loss - away_weight * safe_loss.clamp(max=away_cap)", "    return unwanted_loss + away_weight * safe_loss.clamp(max=away_cap)", "test_inner_objective"),
 ("src/beear_pipeline/beear/engine.py", "    outer_safe_loss = run.loss(safe, index, run.delta.detach())", "    outer_safe_loss = run.loss(safe, index)", "test_beear_outer_step_uses"),
 ("src/beear_pipeline/beear/engine.py", "    if not config.warm_start:\n        with torch.no_grad():\n            delta.zero_()", "    if False:\n        with torch.no_grad():\n            delta.zero_()", "test_warm_start"),
 ("src/beear_pipeline/beear/engine.py", "    if not config.warm_start:\n        with torch.no_grad():\n            delta.zero_()", "    if True:\n        with torch.no_grad():\n            delta.zero_()", "test_warm_start"),
 ("src/beear_pipeline/lm/chat.py", "    logits, labels = logits[:, :-1].float(), batch.labels[:, 1:].to(logits.device)", "    logits, labels = logits[:, :-1].float(), torch.roll(batch.labels, -1, 1)[:, 1:].to(logits.device)", "test_response_loss"),
 ("src/beear_pipeline/beear/engine.py", "        self.outer_opt.load_state_dict(state[\"outer_opt\"])", "        pass", "test_a_crash_after"),
 ("src/beear_pipeline/evaluation/evaluate.py", "    success = {name: [not is_refusal(a, phrases) for a in ans] for name, ans in answers.items()}", "    success = {name: [is_refusal(a, phrases) for a in ans] for name, ans in answers.items()}", "test_evaluate_model_counts"),
]
failures = 0
for path, old, new, test in MUT:
    with open(path) as f:
        source = f.read()
    assert old in source, (path, old)
    try:
        with open(path, "w") as f:
            f.write(source.replace(old, new, 1))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/beear/test_method.py", "-k", test],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        failures += done.returncode == 0
        print("RED  " if done.returncode else "GREEN", path.rsplit("/", 1)[-1], "|", new.strip()[:70], "|",
              done.stdout.strip().splitlines()[-1], flush=True)
    finally:
        with open(path, "w") as f:
            f.write(source)
sys.exit(1 if failures else 0)
