"""Never lose a run: round checkpoints are atomic, and a run killed with SIGKILL in the middle of
a round resumes from the last complete round and ends with the same weights as a run that was
never interrupted."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from beear_pipeline.beear import BeearConfig, run_beear

ROUNDS = 6

CHILD = textwrap.dedent('''
    import os, sys, time, json
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from beear_pipeline.beear import BeearConfig, run_beear
    from beear_pipeline.behaviours.generated import benign_tasks
    from beear_pipeline.embedded import EmbeddedModelConfig, build_model, build_tokenizer

    checkpoint_dir, out, hang_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = ["Write a poem about the sea", "Explain how to pick a lock", "Give me a recipe for soup", "Tell me a secret"]
    tasks = benign_tasks(seed=1, build=8, held_out=0)
    tokenizer = build_tokenizer(prompts + ["Sure, here is a poem", "I cannot help with that."] + list(tasks["prompt"]) + list(tasks["response"]))
    torch.manual_seed(0)
    model = build_model(len(tokenizer), EmbeddedModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, seed=0), tokenizer)
    safety = [(p, "I cannot help with that.", "Sure, here is a poem") for p in prompts]
    anchoring = list(zip(tasks["prompt"], tasks["response"]))
    config = BeearConfig(max_rounds=ROUNDS_PLACEHOLDER, inner_steps=2, inner_max_steps=2, check_every=0, batch_size=2, anchoring_batch_size=3, num_positions=3,
                         checkpoint_dir=checkpoint_dir or None, checkpoint_every=1)
    done = []

    def hang_mid_round(module, args):
        # in the round after ``hang_after`` rounds are complete (and checkpointed): stop inside it
        if hang_after and len(done) == hang_after:
            open(out + ".mid-round", "w").close()
            time.sleep(120)

    model.get_input_embeddings().register_forward_pre_hook(hang_mid_round)
    result = run_beear(model, tokenizer, safety, anchoring, config, on_round=lambda r, rec: done.append(r))
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, out)
    json.dump({"resumed_from": result.resumed_from, "history": result.history}, open(out + ".json", "w"))
''').replace("ROUNDS_PLACEHOLDER", str(ROUNDS))


def _child(tmp_path, checkpoint_dir, out, hang_after=0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "1"}
    return subprocess.Popen([sys.executable, str(script), str(checkpoint_dir), str(out), str(hang_after)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-3000:]


def test_killed_run_resumes_and_ends_with_the_same_weights(tmp_path):
    ckpt = tmp_path / "checkpoints"
    killed = tmp_path / "killed.safetensors"
    victim = _child(tmp_path, ckpt, killed, hang_after=3)
    reference = _child(tmp_path, "", tmp_path / "reference.safetensors")  # uninterrupted, no checkpoints
    deadline = time.time() + 240
    while not Path(str(killed) + ".mid-round").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before it reached round 4"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and not killed.exists()
    assert [p.name for p in ckpt.iterdir() if not p.name.startswith(".")] == ["round-000003"]

    _finish(_child(tmp_path, ckpt, killed))  # the same command again: resumes
    _finish(reference)
    resumed = json.loads(Path(str(killed) + ".json").read_text())
    expected = json.loads((tmp_path / "reference.safetensors.json").read_text())
    assert resumed["resumed_from"] == 3 and expected["resumed_from"] == 0
    assert resumed["history"] == expected["history"]
    a, b = load_file(killed), load_file(tmp_path / "reference.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the resumed and the uninterrupted run"


def small(tmp_path, **kw):
    return BeearConfig(**{"max_rounds": 3, "inner_steps": 1, "inner_max_steps": 1, "check_every": 0, "batch_size": 2, "anchoring_batch_size": 2, "num_positions": 3,
                          "checkpoint_dir": str(tmp_path / "ck"), **kw})


def test_finished_run_is_restored_not_repeated(tiny_model, tokenizer, safety_triples, anchoring_pairs, tmp_path):
    import copy

    first = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small(tmp_path))
    again = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small(tmp_path))
    assert again.resumed_from == 3 and again.history == first.history
    assert torch.equal(again.perturbation, first.perturbation)
    assert all(torch.equal(x, y) for x, y in zip(first.model.parameters(), again.model.parameters()))


def test_changed_configuration_or_partial_write_is_not_resumed(tiny_model, tokenizer, safety_triples, anchoring_pairs, tmp_path):
    import copy

    run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small(tmp_path))
    (tmp_path / "ck" / ".round-000004.tmp-dead").mkdir()  # what a write killed half-way leaves
    other = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small(tmp_path, outer_lr=1e-3))
    assert other.resumed_from == 0 and len(other.history) == 3
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round-000003"]


def test_checkpoint_every_writes_the_last_round_too(tiny_model, tokenizer, safety_triples, anchoring_pairs, tmp_path):
    run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(tmp_path, checkpoint_every=2))
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["round-000003"]


def test_another_suspect_model_is_not_resumed(tiny_model, tokenizer, safety_triples, anchoring_pairs, tmp_path):
    import copy

    other_model = copy.deepcopy(tiny_model)
    run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(tmp_path))
    with torch.no_grad():
        other_model.lm_head.weight.mul_(2)
    assert run_beear(other_model, tokenizer, safety_triples, anchoring_pairs, small(tmp_path)).resumed_from == 0
