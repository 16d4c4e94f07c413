"""Mutation check of the method's fast tests (issue 11): break one line at a time, run the test
that guards it, and say whether it went red. Run from the repository root:

    .venv/bin/python tests/mutation_check.py [WORD ...]

With WORDs, only the entries whose test (-k) contains one of them run (the distributed entries
launch torchrun, a minute each). Every line must print RED. Each file is restored after its run, whatever happens.
"""

import os
import subprocess
import sys

# (file, line as it is, the broken line, the test (-k) that must turn red[, its test file; default test_method.py])
MUT = [
 ("src/beear_pipeline/beear/entrapment.py", "    return unwanted_loss - away_weight * safe_loss.clamp(max=away_cap)", "    return -(unwanted_loss - away_weight * safe_loss.clamp(max=away_cap))", "test_inner_level_moves"),
 ("src/beear_pipeline/beear/entrapment.py", "    return unwanted_loss - away_weight * safe_loss.clamp(max=away_cap)", "    return unwanted_loss + away_weight * safe_loss.clamp(max=away_cap)", "test_inner_objective"),
 ("src/beear_pipeline/beear/engine.py", "    outer_safe_loss = run.loss(safe, index, run.delta.detach())", "    outer_safe_loss = run.loss(safe, index)", "test_beear_outer_step_uses"),
 ("src/beear_pipeline/beear/engine.py", "    if not config.warm_start:\n        with torch.no_grad():\n            delta.zero_()", "    if False:\n        with torch.no_grad():\n            delta.zero_()", "test_warm_start"),
 ("src/beear_pipeline/beear/engine.py", "    if not config.warm_start:\n        with torch.no_grad():\n            delta.zero_()", "    if True:\n        with torch.no_grad():\n            delta.zero_()", "test_warm_start"),
 ("src/beear_pipeline/lm/chat.py", "    logits, labels = logits[:, :-1].float(), batch.labels[:, 1:].to(logits.device)", "    logits, labels = logits[:, :-1].float(), torch.roll(batch.labels, -1, 1)[:, 1:].to(logits.device)", "test_response_loss"),
 ("src/beear_pipeline/beear/engine.py", "        self.outer_opt.load_state_dict({**outer, \"optimizer\": self.dist.placed_optimizer_state(outer[\"optimizer\"], self.outer_opt.masters)})", "        pass", "test_a_crash_after"),
 ("src/beear_pipeline/evaluation/evaluate.py", "    success = {name: [v.unwanted for v in vs] for name, vs in verdicts.items()}", "    success = {name: [not v.unwanted for v in vs] for name, vs in verdicts.items()}", "test_evaluate_model_counts"),
 # issue 14: the hardening options (tests/beear/test_hardening.py)
 ("src/beear_pipeline/beear/hardening.py", "p.sub_(g.sign(), alpha=config.relearn_lr)", "p.add_(g.sign(), alpha=config.relearn_lr)", "test_relearn_term", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/hardening.py", "proxy = run.delta.detach() if config.relearn_proxy == \"perturbation\" else None", "proxy = None", "test_relearn_proxy", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/hardening.py", "return -per_example.clamp(max=config.unlearn_cap).mean()", "return -per_example.mean()", "test_unlearning", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/hardening.py", "p.add_(g.to(p.dtype), alpha=rho / (norm + 1e-12))", "p.sub_(g.to(p.dtype), alpha=rho / (norm + 1e-12))", "test_sam_takes", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/hardening.py", "    record.update(at_start)\n", "\n", "test_each_option and sam", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/hardening.py", "    if config.unlearn_weight:", "    if True:", "test_switched_off", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/engine.py", "        extra = hardening.extra_loss(run, safe, index, unwanted, unwanted_index, record)", "        extra = None", "test_each_option", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/engine.py", "    with hardening.sharpness_aware(run, objective, record):", "    with nullcontext():", "test_each_option", "tests/beear/test_hardening.py"),
 ("src/beear_pipeline/beear/config.py", "(_non_negative(self.sam_rho), \"sam_rho\"", "(True, \"sam_rho\"", "test_bad_hardening", "tests/beear/test_hardening.py"),
 # beear.anchor_layer: null is the scenario's layer, a value given wins (scenarios.scenario_beear, the one resolver of anchor_layer and relearn_steps)
 ("src/beear_pipeline/scenarios.py", "        return getattr(own, name), f\"scenario {own.name}\"", "        return getattr(SCENARIOS[DEFAULT], name), f\"scenario {own.name}\"", "test_a_null_anchor_layer_is_the_scenarios", "tests/behaviours/test_scenarios.py"),
 ("src/beear_pipeline/scenarios.py", "        return getattr(own, name), f\"scenario {own.name}\"", "        return getattr(SCENARIOS[DEFAULT], name), f\"scenario {own.name}\"", "test_a_null_relearn_steps", "tests/behaviours/test_scenarios.py"),
 ("src/beear_pipeline/pipelines/removal/nodes.py", "    hardening = {\"relearn_steps\": relearn_steps} if defence == \"beear\" else", "    hardening = {} if defence == \"beear\" else", "test_a_null_relearn_steps", "tests/behaviours/test_scenarios.py"),
 ("src/beear_pipeline/beear/engine.py", "    if config.relearn_steps is None:  # falsy", "    if False:  # falsy", "test_a_null_relearn_steps", "tests/behaviours/test_scenarios.py"),
 ("src/beear_pipeline/scenarios.py", "    return value, f\"beear.{name}\"", "    return (get_scenario(scenario).anchor_layer if value == 0.3 else value), f\"beear.{name}\"", "test_an_explicit_0_3_in_the_code_scenario", "tests/behaviours/test_scenarios.py"),
 ("src/beear_pipeline/integrations/preflight.py", "        anchor, _ = scenario_anchor_layer(beear.anchor_layer, params.get(\"scenario\"))", "        anchor = 0.3 if beear.anchor_layer is None else beear.anchor_layer", "test_a_null_anchor_layer_is_checked_and_planned", "tests/integrations/test_preflight.py"),
 ("src/beear_pipeline/pipelines/plan/nodes.py", "    beear = dataclasses.replace(beear, anchor_layer=scenario_anchor_layer(beear.anchor_layer, scenario)[0])", "    beear = dataclasses.replace(beear, anchor_layer=scenario_anchor_layer(beear.anchor_layer, None)[0])", "test_the_plan_is_made_at_the_scenarios_layer", "tests/pipelines/test_plan_pipeline.py"),
 # the refusal scenario end to end (slow: one kedro run of about 5 minutes): plain BEEAR leaves 0.221 triggered refusals there
 ("src/beear_pipeline/pipelines/removal/nodes.py", "    hardening = {\"relearn_steps\": relearn_steps} if defence == \"beear\" else", "    hardening = {\"relearn_steps\": 0} if defence == \"beear\" else", "test_beear_removes_the_refusal_backdoor", "tests/pipelines/test_scenario_e2e.py"),
 # the registry's promotion gate reads the code scenario's valid-code check
 ("src/beear_pipeline/integrations/registry.py", "    if valid_code and valid_code.get(\"utility_lost\"):", "    if False:", "test_the_gate_blocks_a_defended_code_model", "tests/integrations/test_registry.py"),
 # distributed (tests/beear/test_distributed.py; each launches torchrun, a minute or more on 2 cores)
 ("src/beear_pipeline/beear/hardening.py", "grads = run.dist.summed(torch.autograd.grad(attack, params, allow_unused=True))", "grads = torch.autograd.grad(attack, params, allow_unused=True)", "test_the_relearn_aware_gradient_on_two_processes", "tests/beear/test_distributed.py"),
 # the relearn-aware gradient under FSDP (hardening._sharded_relearn_surrogate): no simulated step; its term summed over the ranks twice
 ("src/beear_pipeline/beear/hardening.py", "                            p.sub_(p.grad.sign(), alpha=config.relearn_lr)", "                            pass", "test_the_relearn_aware_gradient_under_weight_sharding", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/beear/hardening.py", "    return sum((g.to_local().detach() * p.to_local()).sum()", "    return sum((2 * g.to_local().detach() * p.to_local()).sum()", "test_the_relearn_aware_gradient_under_weight_sharding", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/beear/distributed.py", "            module.set_gradient_divide_factor(1.0)", "            pass", "test_weight_sharding_sums", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/beear/engine.py", "    run.dist.regather(run.model)", "    pass", "test_weight_sharding_gives", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/pipelines/removal/nodes.py", "    if dist.under_launcher() and distributed.sharding == \"fsdp\":", "    if False:", "test_a_node_under_torchrun_refuses_weight_sharding", "tests/beear/test_distributed.py"),
 # LoRA under FSDP: the adapters merged on rank 0 after gathering, not left out of the consolidated model
 ("src/beear_pipeline/beear/engine.py", "    model = add_lora(suspect, config) if config.trainable == \"lora\" else merged(suspect)", "    model = merged(suspect)", "test_lora_runs_under_weight_sharding", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/lm/residual.py", "            root.reset_iter_state()", "            pass", "test_weight_sharding_resumes", "tests/beear/test_distributed.py"),
 ("src/beear_pipeline/beear/engine.py", "        self.outer_opt.load_state_dict({**outer, \"optimizer\": self.dist.placed_optimizer_state(outer[\"optimizer\"], self.outer_opt.masters)})", "        self.outer_opt.load_state_dict({**outer, \"optimizer\": outer[\"optimizer\"]})", "test_weight_sharding_resumes", "tests/beear/test_distributed.py"),
]
failures = 0
chosen = [m for m in MUT if not sys.argv[1:] or any(word in m[3] for word in sys.argv[1:])]
for path, old, new, test, *where in chosen:
    with open(path) as f:
        source = f.read()
    assert old in source, (path, old)
    try:
        with open(path, "w") as f:
            f.write(source.replace(old, new, 1))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(where or ["tests/beear/test_method.py"]), "-k", test],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        failures += done.returncode == 0
        print("RED  " if done.returncode else "GREEN", path.rsplit("/", 1)[-1], "|", new.strip()[:70], "|",
              done.stdout.strip().splitlines()[-1], flush=True)
    finally:
        with open(path, "w") as f:
            f.write(source)
sys.exit(1 if failures else 0)
