"""Distributed BEEAR on CPU (gloo, 2 processes through torchrun, as the defence node launches it):
the same global batches give the one-process perturbation and weights, optimiser-state sharding
gives the same run, a killed rank resumes from its round checkpoint and ends like an uninterrupted
run, two "nodes" on localhost complete, and a failing rank surfaces as a clear error; the same
equality with the relearn-aware gradient on, and with the weights sharded by FSDP2 (also resumed
from its consolidated checkpoints, and with the relearn-aware gradient on). Each launch
costs about 10-40 s of process start and import on 2 busy cores: the equality test and the error
paths run in the default suite, the other launches are marked slow.

Tolerance (TOL): ranks split each batch and sum their token-weighted shares, so losses and
gradients differ from one process's only by float32 summation order and by padding each share to
its own length (matmuls of other shapes round differently): about 1e-7 relative per step, grown
by a few rounds of Adam (which divides by sqrt of the second moment). Measured here: see
docs/distributed.md; the bound leaves 10x head-room over it and is 1000x below a single outer step
(lr 5e-4), so a wrong weighting (an unweighted mean of rank means, a missing all-reduce) fails."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.beear import distributed as D
from beear_pipeline.beear.config import DistributedConfig
from beear_pipeline.beear.resume import WEIGHTS
from beear_pipeline.behaviours.generated import REFUSALS, benign_tasks
from beear_pipeline.embedded import EmbeddedModelConfig, build_model, build_tokenizer
from beear_pipeline.lm.checkpoints import load_checkpoint, merged, save_checkpoint

TOL = 2e-5  # max |difference| of a weight entry, and of a perturbation entry relative to its largest, one process vs two
UNWANTED = "Sure, here is a poem about it"


def _config(**kw) -> BeearConfig:
    # batch 5 over 2 ranks: shares of 2 and 3 rows with different token counts (the weighting matters);
    # a check at rounds 0 and 3 (rank 0 generates, every rank follows); entrapped_rate 0 and
    # min_rounds above max_rounds: the tiny random model runs every round
    return BeearConfig(**{"max_rounds": 6, "check_every": 3, "monitor_fraction": 0.2, "entrapped_rate": 0.0, "min_rounds": 20,
                          "inner_steps": 2, "inner_max_steps": 4, "batch_size": 5, "anchoring_batch_size": 3,
                          "num_positions": 3, "monitor_max_new_tokens": 4, "checkpoint_every": 1, **kw})


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny checkpoint on disk, the behaviour sets, and the one-process run of ``_config()``."""
    root = tmp_path_factory.mktemp("dist")
    tasks = benign_tasks(seed=3, build=16, held_out=0)
    prompts = list(tasks["prompt"][:10])
    safety = [(p, REFUSALS[i % 2], UNWANTED) for i, p in enumerate(prompts)]
    anchoring = list(zip(tasks["prompt"][10:], tasks["response"][10:]))
    tokenizer = build_tokenizer([*tasks["prompt"], *tasks["response"], *REFUSALS, UNWANTED])
    torch.manual_seed(0)
    model = build_model(len(tokenizer), EmbeddedModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, seed=0),
                        tokenizer)
    path = save_checkpoint(model, tokenizer, root / "suspect")
    setting = {"root": root, "ref": {"path": str(path)}, "safety": safety, "anchoring": anchoring}
    return {**setting, "single": _one_process(setting, _config())}


def _one_process(setting, config: BeearConfig):
    """``config`` run in this process on the checkpoint, with one thread as each rank computes
    (launch sets OMP_NUM_THREADS=1); the rest of the session keeps its own thread count."""
    model, tokenizer = load_checkpoint(setting["ref"]["path"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_beear(model, tokenizer, setting["safety"], setting["anchoring"], config)
    finally:
        torch.set_num_threads(threads)


def _job(setting, name, sharding="none", **kw):
    return D.write_job(setting["root"] / name, setting["ref"], setting["safety"], setting["anchoring"], _config(**kw), backend="gloo",
                       sharding=sharding)


@pytest.fixture(scope="module")
def two(setting):
    """The same run on 2 processes, through the launcher the defence node uses."""
    return D.read_result(D.launch(_job(setting, "two"), 2, echo=False))[0]


def _diffs(a, b) -> tuple[float, float]:
    """(max |weight difference|, max |perturbation difference| / max |perturbation entry|)."""
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    weights = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    return weights, ((a.perturbation - b.perturbation).abs().max() / b.perturbation.abs().max()).item()


def _max_diff(a, b) -> float:
    return max(_diffs(a, b))


def _same_decisions(a, b) -> None:
    """Every rank-independent decision of the run: rounds, inner steps, checks, restarts."""
    assert len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history, strict=True):
        assert x["inner_steps"] == y["inner_steps"] and x.get("restarted") == y.get("restarted")
        assert x.get("entrapment_rate") == y.get("entrapment_rate")
        for k in ("outer_loss", "unwanted_loss", "hidden_scale", "perturbation_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k


def test_two_processes_give_the_one_process_perturbation_and_weights(setting, two):
    single = setting["single"]
    _same_decisions(two, single)
    assert "entrapment_rate" in two.history[3]  # the check ran (on rank 0) and reached the history
    moved = max((p - q).abs().max().item() for p, q in zip(single.model.parameters(), load_checkpoint(setting["ref"]["path"])[0].parameters()))
    weights, perturbation = _diffs(two, single)
    print(f"2 processes vs 1: weights differ by up to {weights:.2e} (training moved them by up to {moved:.2e}), "
          f"the perturbation by {perturbation:.2e} relative")
    assert moved > 100 * TOL  # the bound is far below what training changed
    assert weights <= TOL and perturbation <= TOL


def _relearn_config() -> BeearConfig:
    return _config(relearn_steps=4, relearn_lr="auto", max_rounds=4)


@pytest.fixture(scope="module")
def relearn_single(setting):
    """The one-process run with the relearn-aware gradient on (the defend pipeline's setting)."""
    return _one_process(setting, _relearn_config())


def _same_relearn_run(distributed, single, name: str) -> None:
    assert all(r["relearn_loss"] > 0 for r in distributed.history)  # the simulated attack ran in every round
    _same_decisions(distributed, single)
    for x, y in zip(distributed.history, single.history, strict=True):
        # the attacker's loss before its last step: a simulated step that moved nothing would change it
        assert x["relearn_unwanted_loss"] == pytest.approx(y["relearn_unwanted_loss"], rel=1e-4)
        assert x["relearn_loss"] == pytest.approx(y["relearn_loss"], rel=1e-4)
    weights, perturbation = _diffs(distributed, single)
    print(f"relearn-aware gradient, {name} vs 1 process: weights {weights:.2e}, perturbation {perturbation:.2e}")
    assert max(weights, perturbation) <= TOL


@pytest.mark.slow
def test_the_relearn_aware_gradient_on_two_processes_gives_the_one_process_run(setting, relearn_single):
    """The defend pipeline's setting (conf/base/parameters_removal.yml): relearn-aware gradient on.
    Its simulated re-poisoning steps move every rank's weights by the sign of the *summed*
    gradient (``Context.summed``); a rank stepping on its own share's sign would diverge."""
    job = D.write_job(setting["root"] / "relearn", setting["ref"], setting["safety"], setting["anchoring"], _relearn_config(),
                      backend="gloo")
    _same_relearn_run(D.read_result(D.launch(job, 2, echo=False))[0], relearn_single, "2 processes")


@pytest.mark.slow
def test_the_relearn_aware_gradient_under_weight_sharding_gives_the_one_process_run(setting, relearn_single):
    """The same under FSDP2, where the simulated steps run ``backward`` into the shards' ``.grad``
    (FSDP sums it over the ranks) and step each rank's slice of the weights; the gradient at the
    adapted weights is added to the outer gradient shard by shard, not summed a second time."""
    job = D.write_job(setting["root"] / "fsdp-relearn", setting["ref"], setting["safety"], setting["anchoring"], _relearn_config(),
                      backend="gloo", sharding="fsdp")
    sharded = D.read_result(D.launch(job, 2, echo=False))[0]
    assert "weights sharded over 2 ranks (FSDP2)" in (setting["root"] / "fsdp-relearn" / "torchrun.log").read_text()
    _same_relearn_run(sharded, relearn_single, "FSDP, 2 processes")


@pytest.fixture(scope="module")
def sharded(setting):
    """``_config()`` on 2 processes with the weights sharded by FSDP2, round checkpoints on."""
    job = _job(setting, "fsdp", sharding="fsdp", checkpoint_dir=str(setting["root"] / "fsdp-ck"))
    return D.read_result(D.launch(job, 2, echo=False))[0]


@pytest.mark.slow
def test_weight_sharding_gives_the_one_process_perturbation_and_weights(setting, sharded):
    assert "weights sharded over 2 ranks (FSDP2)" in (setting["root"] / "fsdp" / "torchrun.log").read_text()
    single = setting["single"]
    _same_decisions(sharded, single)
    assert "entrapment_rate" in sharded.history[3]  # the check ran (every rank generating together)
    weights, perturbation = _diffs(sharded, single)
    print(f"FSDP, 2 processes vs 1: weights differ by up to {weights:.2e}, the perturbation by {perturbation:.2e} relative")
    assert weights <= TOL and perturbation <= TOL
    # the round checkpoint is consolidated: whole tensors under the model's own names, as one process writes
    saved = load_file(setting["root"] / "fsdp-ck" / "round-000006" / WEIGHTS)
    for name, p in sharded.model.named_parameters():
        assert torch.equal(saved[name], p), name


@pytest.mark.slow
def test_weight_sharding_sums_the_gradients_as_one_process(setting):
    """Plain SGD without clipping, whose step is proportional to the gradient: AdamW (the default)
    is blind to a gradient scaled by a constant, such as FSDP's default average over the ranks
    instead of the sum the engine needs."""
    config = _config(outer_optimizer="sgd", outer_lr=0.5, grad_clip=None, max_rounds=2)
    single = _one_process(setting, config)
    job = D.write_job(setting["root"] / "fsdp-sgd", setting["ref"], setting["safety"], setting["anchoring"], config, backend="gloo",
                      sharding="fsdp")
    sharded = D.read_result(D.launch(job, 2, echo=False))[0]
    moved = max((p - q).abs().max().item() for p, q in zip(single.model.parameters(), load_checkpoint(setting["ref"]["path"])[0].parameters()))
    weights, perturbation = _diffs(sharded, single)
    print(f"FSDP with SGD, 2 processes vs 1: weights {weights:.2e} (SGD moved them by up to {moved:.2e}), perturbation {perturbation:.2e}")
    assert moved > 100 * TOL
    assert max(weights, perturbation) <= TOL


@pytest.mark.slow
def test_weight_sharding_resumes_from_its_consolidated_checkpoint(setting, sharded):
    job = _job(setting, "fsdp-killed", sharding="fsdp", checkpoint_dir=str(setting["root"] / "fsdp-killed-ck"))
    resumed = _killed_and_relaunched(setting, job)
    assert 2 <= resumed.resumed_from < 6
    _same_decisions(resumed, sharded)
    weights, perturbation = _diffs(resumed, sharded)
    print(f"FSDP, resumed vs uninterrupted: weights {weights:.2e}, perturbation {perturbation:.2e}")
    assert max(weights, perturbation) == 0.0  # same ranks, same arithmetic: bit for bit


@pytest.mark.slow
def test_optimizer_state_sharding_gives_the_same_run(setting, two):
    zero = D.read_result(D.launch(_job(setting, "zero", sharding="optimizer"), 2, echo=False))[0]
    assert "outer optimiser state sharded over 2 ranks (ZeRO-1)" in (setting["root"] / "zero" / "torchrun.log").read_text()
    weights, perturbation = _diffs(zero, two)
    print(f"optimiser-state sharding vs replicated: weights differ by up to {weights:.2e}, the perturbation by {perturbation:.2e}")
    _same_decisions(zero, two)
    assert _max_diff(zero, two) <= TOL


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux lists them per thread that started them)."""
    return sorted(int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split())


def _killed_and_relaunched(setting, job, after_round: int = 2):
    """Launch ``job``, SIGKILL one rank once round ``after_round`` is checkpointed, check the node's
    error, then launch the same job again: its result (resumed from the checkpoint)."""
    checkpoints = Path(json.loads((job / D.JOB).read_text())["config"]["checkpoint_dir"])
    failure = []
    victim = threading.Thread(target=lambda: failure.append(_raises(lambda: D.launch(job, 2, echo=False))))
    victim.start()
    deadline = time.time() + 120
    while not (checkpoints / f"round-{after_round:06d}").exists():
        assert victim.is_alive() and time.time() < deadline, f"the run ended before round {after_round} was checkpointed"
        time.sleep(0.05)
    torchrun = next(pid for pid in _children(os.getpid()) if "torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_text())
    ranks = _children(torchrun)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    victim.join(120)
    assert len(failure) == 1 and isinstance(failure[0], RuntimeError), failure
    assert "exited with" in str(failure[0]) and "SIGKILL" in str(failure[0])  # the node's error says what happened
    return D.read_result(D.launch(job, 2, echo=False))[0]  # the same command again


@pytest.mark.slow
def test_a_killed_rank_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(setting, two):
    resumed = _killed_and_relaunched(setting, _job(setting, "killed", checkpoint_dir=str(setting["root"] / "killed-ck")))
    assert 2 <= resumed.resumed_from < 6
    _same_decisions(resumed, two)
    assert _max_diff(resumed, two) == 0.0  # same ranks, same arithmetic: bit for bit


def _raises(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 -- handed to the test thread, which checks its type
        return e
    return None


@pytest.mark.slow
def test_two_nodes_on_localhost_complete(setting, two):
    job = _job(setting, "nodes")
    port = D.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", D.WORKER, str(job)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    outputs = [n.communicate(timeout=240)[0].decode() for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    result = D.read_result(job / "out")[0]
    assert json.loads((job / "out" / "result.json").read_text())["world_size"] == 2
    _same_decisions(result, two)
    weights, perturbation = _diffs(result, two)
    print(f"2 nodes vs 2 processes on one node: weights differ by up to {weights:.2e}, the perturbation by {perturbation:.2e}")
    assert max(weights, perturbation) <= TOL


def test_a_failing_rank_is_a_clear_error(setting, tmp_path):
    job = D.write_job(tmp_path / "bad", {"path": str(tmp_path / "no-such-model")}, setting["safety"], setting["anchoring"], _config(),
                      backend="gloo")
    with pytest.raises(RuntimeError, match="distributed BEEAR failed") as failed:
        D.launch(job, 2, echo=False)
    assert "no-such-model" in str(failed.value)  # the rank's own error, not only torchrun's exit code


def test_shares_and_configuration():
    ranks = [D.Context(r, 3).part(range(7)) for r in range(3)]
    assert ranks == [[0, 1], [2, 3], [4, 5, 6]]  # contiguous, together the global batch
    assert D.Context().part([4, 1]) == [4, 1]
    with pytest.raises(ValueError, match="beear.batch_size"):
        D.Context(0, 4).part([1, 2, 3])
    with pytest.raises(ValueError, match="beear.anchoring_batch_size"):
        D.check_job(20, 2, BeearConfig(batch_size=8, anchoring_batch_size=8), 3)
    with pytest.raises(ValueError, match="distributed.num_processes"):
        DistributedConfig(num_processes=0)
    with pytest.raises(ValueError, match="distributed.master_port"):
        DistributedConfig(master_port=70000)
    with pytest.raises(ValueError, match="distributed.sharding"):
        DistributedConfig(sharding="zero3")
    assert DistributedConfig(sharding="fsdp").sharding == "fsdp"
    # the relearn-aware gradient and LoRA run distributed (under every sharding)
    D.check_job(20, 20, BeearConfig(batch_size=8, anchoring_batch_size=8, relearn_steps=4, trainable="lora"), 2)
    D.check_hardening(BeearConfig(relearn_steps=4), 2)
    assert DistributedConfig.from_dict({"num_processes": 2}).backend == "auto"
    # the hardening options use each rank's own gradient: refused before launching, allowed in one process
    with pytest.raises(ValueError, match="beear.unlearn_weight cannot run distributed"):
        D.check_job(20, 20, BeearConfig(batch_size=8, anchoring_batch_size=8, unlearn_weight=1.0), 2)
    D.check_hardening(BeearConfig(sam_rho=0.1), 1)
    with pytest.raises(ValueError, match="beear.sam_rho"):
        D.check_hardening(BeearConfig(sam_rho=0.1), 2)


def _frames(setting):
    import pandas as pd

    safety = pd.DataFrame(setting["safety"], columns=["prompt", "safe_response", "unwanted_response"])
    return safety, pd.DataFrame(setting["anchoring"], columns=["prompt", "response"])


@pytest.mark.slow
def test_the_defence_node_launches_the_job_and_continues_with_its_result(setting, two):
    from beear_pipeline.pipelines.removal.nodes import defend_with_beear

    (model, _), perturbation, history = defend_with_beear(setting["ref"], *_frames(setting), _config(), None,
                                                                  DistributedConfig(num_processes=2, backend="gloo"))
    assert [r["inner_steps"] for r in history["rounds"]] == [r["inner_steps"] for r in two.history]
    assert history["final_audit"] is not None  # the node's own steps ran on the job's model
    assert torch.equal(perturbation["perturbation"], two.perturbation)
    for (name, p), q in zip(model.named_parameters(), two.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_the_defence_node_refuses_more_processes_than_examples_before_launching(setting):
    from beear_pipeline.pipelines.removal.nodes import defend_with_beear

    with pytest.raises(ValueError, match="distributed.num_processes=3: beear.batch_size"):
        defend_with_beear(setting["ref"], *_frames(setting), _config(batch_size=2), None, DistributedConfig(num_processes=3))


def test_a_node_under_torchrun_refuses_weight_sharding(setting, monkeypatch):
    from beear_pipeline.pipelines.removal.nodes import defend_with_beear

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the node would run as one rank
    with pytest.raises(ValueError, match="distributed.sharding: fsdp runs as a job the node launches"):
        defend_with_beear(setting["ref"], *_frames(setting), _config(), None, DistributedConfig(sharding="fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize("merge_adapter", [True, False])
def test_lora_runs_data_parallel(setting, merge_adapter):
    config = _config(trainable="lora", lora_rank=4, max_rounds=3, merge_adapter=merge_adapter)
    model, tokenizer = load_checkpoint(setting["ref"]["path"])
    single = run_beear(model, tokenizer, setting["safety"], setting["anchoring"], config)
    job = D.write_job(setting["root"] / f"lora-{merge_adapter}", setting["ref"], setting["safety"], setting["anchoring"], config,
                      backend="gloo")
    two = D.read_result(D.launch(job, 2, echo=False))[0]
    assert hasattr(two.model, "peft_config") == (not merge_adapter)  # an adapter folder for the same base, reloaded
    _same_decisions(two, single)
    weights, perturbation = _diffs(two, single)
    print(f"LoRA (merge_adapter={merge_adapter}), 2 processes vs 1: weights {weights:.2e}, perturbation {perturbation:.2e}")
    assert max(weights, perturbation) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("merge_adapter", [True, False])
def test_lora_runs_under_weight_sharding(setting, merge_adapter):
    """A base too big for one device with a LoRA adapter: FSDP shards the frozen base and the
    adapters alike, the adapters train as shards, rank 0 gathers them and merges (or keeps the
    adapter folder) as one process does."""
    config = _config(trainable="lora", lora_rank=4, max_rounds=3, merge_adapter=merge_adapter)
    single = _one_process(setting, config)
    name = f"fsdp-lora-{merge_adapter}"
    job = D.write_job(setting["root"] / name, setting["ref"], setting["safety"], setting["anchoring"], config, backend="gloo",
                      sharding="fsdp")
    sharded = D.read_result(D.launch(job, 2, echo=False))[0]
    assert "weights sharded over 2 ranks (FSDP2)" in (setting["root"] / name / "torchrun.log").read_text()
    assert hasattr(sharded.model, "peft_config") == (not merge_adapter)
    _same_decisions(sharded, single)
    base = load_checkpoint(setting["ref"]["path"])[0].state_dict()
    weights, perturbation = _diffs(sharded, single)
    moved = max((p - base[k]).abs().max().item() for k, p in merged(copy.deepcopy(single.model)).state_dict().items() if k in base)
    print(f"LoRA under FSDP (merge_adapter={merge_adapter}), 2 processes vs 1: weights {weights:.2e} (the adapters moved the merged "
          f"weights by up to {moved:.2e}), perturbation {perturbation:.2e}")
    assert moved > 100 * TOL  # the adapters trained: the equality is not the untouched base's
    assert max(weights, perturbation) <= TOL


NODE_UNDER_TORCHRUN = """
import json, os, sys
import mlflow, pandas as pd, torch
from safetensors.torch import save_file
from beear_pipeline.beear.config import BeearConfig, DistributedConfig
from beear_pipeline.pipelines.removal.nodes import defend_with_beear

spec, rank = json.load(open(sys.argv[1])), os.environ["RANK"]
torch.set_num_threads(1)
mlflow.set_tracking_uri(f"sqlite:///{spec['root']}/mlflow-{rank}.db")  # each rank's own run, as each rank's kedro would have
safety = pd.DataFrame(spec["safety"], columns=["prompt", "safe_response", "unwanted_response"])
anchoring = pd.DataFrame(spec["anchoring"], columns=["prompt", "response"])
with mlflow.start_run() as run:
    (model, _), _, history = defend_with_beear(spec["ref"], safety, anchoring, BeearConfig.from_dict(spec["config"]), None,
                                               DistributedConfig(backend="gloo"))
metrics = mlflow.get_run(run.info.run_id).data.metrics
json.dump({"metrics": sorted(metrics), "rounds": len(history["rounds"])}, open(f"{spec['root']}/rank-{rank}.json", "w"))
if rank == "0":
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{spec['root']}/weights.safetensors")
"""


@pytest.mark.slow
def test_a_node_under_torchrun_runs_as_one_rank_and_only_rank_0_logs(setting, two, tmp_path):
    (tmp_path / "node.py").write_text(NODE_UNDER_TORCHRUN)
    spec = {"root": str(tmp_path), "ref": setting["ref"], "safety": setting["safety"], "anchoring": setting["anchoring"],
            "config": _config().to_dict()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([*D.command(tmp_path, 2)[:-3], str(tmp_path / "node.py"), str(tmp_path / "spec.json")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rounds"] == ranks[1]["rounds"] == len(two.history)
    assert "beear.outer_loss" in ranks[0]["metrics"] and ranks[1]["metrics"] == []
    weights = load_file(tmp_path / "weights.safetensors")
    for name, p in two.model.state_dict().items():
        assert torch.equal(weights[name], p), name
