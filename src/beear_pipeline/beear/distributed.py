"""BEEAR on ``torch.distributed``: N processes, one universal perturbation, a data-parallel outer step.

Every rank draws the same global batch (same sampler, same seed) and takes its contiguous share
(``Context.part``). What makes N ranks compute what one process computes:

- ``global_mean``: ``response_loss`` is a token mean, so each rank's loss is weighted by its
  response tokens. The returned tensor has the *value* of the global batch's token mean (all-reduced,
  identical on every rank: stopping rules, entrapment targets, records and convergence decisions
  are the same everywhere) and the *gradient* of this rank's share of it, so summing gradients over
  the ranks gives exactly the global batch's gradient, the inner objective's cap included;
- ``all_reduce_gradients``: that sum, for the perturbation (a step pre-hook on the inner
  optimiser: every rank applies the same step to the same universal delta) and for the trainable
  weights before the outer step (replicated weights, manual all-reduce: the fp32-master
  ``OuterOptimizer`` and LoRA work unchanged);
- ``gather``: the per-round hidden-state scale is the median over the global batch's positions;
- ``on_main``: the convergence check (generation on the monitor prompts) and reading a round
  checkpoint happen on rank 0 and are broadcast, so every rank takes the same decision and restores
  the same state; only rank 0 writes checkpoints (``save``) and results.

``sharding: optimizer`` splits the outer optimiser's state over the ranks (ZeRO stage 1,
``ZeroRedundancyOptimizer``); weights stay replicated. ``sharding: fsdp`` splits the weights, their
gradients and the optimiser state (FSDP2 ``fully_shard``, ``Context.shard``): FSDP sums the
weights' gradients itself, every rank takes part in the convergence check's generation
(``agreed``), and checkpoints and the defended model are gathered whole on rank 0 (``whole``,
``placed``); docs/distributed.md.

Launching: ``launch`` runs ``python -m torch.distributed.run ... -m beear_pipeline.beear.worker
JOB_DIR`` (the defence node does, with ``distributed.num_processes > 1``); ``JOB_DIR/job.json`` holds
the model reference, the behaviour sets and the configuration, rank 0 writes the defended model,
the perturbation and the history to ``JOB_DIR/out``. The same command works under ``accelerate
launch`` or a multi-node torchrun (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from beear_pipeline.beear.config import HARDENING, check_hardening  # noqa: F401  (kept here for the callers; pure configuration, so it lives in config.py, where the preflight runs it without torch)
from beear_pipeline.lm.chat import IGNORE_INDEX
from beear_pipeline.lm.precision import OuterOptimizer

logger = logging.getLogger(__name__)

JOB, OUT = "job.json", "out"
WORKER = "beear_pipeline.beear.worker"
"""The module each rank runs (not this one: ``python -m`` on a module the package already imported
would run a second copy of it, whose ``using`` the engine would not see)."""


@dataclass(frozen=True)
class Context:
    """This process's place in a distributed run; the default (one rank) makes every hook a no-op."""

    rank: int = 0
    world_size: int = 1
    sharding: str = "none"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """The weights are sharded over the ranks (FSDP2): every forward pass needs every rank."""
        return self.active and self.sharding == "fsdp"

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under ``sharding: fsdp``, ``model`` with each decoder layer and the rest (embeddings,
        final norm, head) sharded over the ranks by FSDP2 (``fully_shard``): its parameters become
        DTensors, each rank holding a dim-0 slice, all-gathered layer by layer for each forward and
        backward pass. FSDP reduce-scatters the gradients itself; they are *summed* over the ranks
        (FSDP averages by default), the engine's convention (see ``global_mean``). Otherwise
        ``model`` unchanged."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import fully_shard

        from beear_pipeline.lm.residual import decoder_layers

        layers = list(decoder_layers(model))
        # the root is the transformers model, also under a peft wrapper (LoRA): peft's generate calls
        # it directly, so a root on the wrapper would never gather the embeddings for generation
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in layers:
            fully_shard(layer)
        fully_shard(root)
        for module in (*layers, root):
            # both: a divide factor of 1 alone asks for a pre-multiplied sum, which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
        logger.info("weights sharded over %d ranks (FSDP2): %d decoder layers and the root", self.world_size, len(layers))
        return model

    def part(self, idx: Sequence[int], field: str = "beear.batch_size") -> list[int]:
        """This rank's contiguous share of the global batch ``idx`` (shares differ by at most one)."""
        idx = list(idx)
        if not self.active:
            return idx
        if len(idx) < self.world_size:
            raise ValueError(f"{field}: a global batch of {len(idx)} examples cannot be split over {self.world_size} processes; "
                             f"raise {field} (and the data) to at least distributed.num_processes, or use fewer processes")
        n = len(idx)
        return idx[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]

    def global_mean(self, loss: torch.Tensor, batch) -> torch.Tensor:
        """``loss`` (a token mean over ``batch``'s response tokens) turned into the global batch's
        token mean: that value on every rank, with the gradient of this rank's share of it."""
        if not self.active:
            return loss
        count = (batch.labels[:, 1:] != IGNORE_INDEX).sum().to(loss.device, torch.float32)
        local_sum = loss.float() * count
        totals = torch.stack([local_sum.detach(), count])
        dist.all_reduce(totals)
        share = local_sum / totals[1].clamp(min=1)
        return share + (totals[0] / totals[1].clamp(min=1) - share).detach()

    def all_reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum ``params``' gradients over the ranks (each holds its share of the global mean's
        gradient, see ``global_mean``). A parameter without a gradient on every rank keeps none, as
        in one process (an optimiser skips it; a zero gradient would still decay its moments)."""
        params = [p for p in params if not _sharded(p)]  # FSDP reduced those itself (see ``shard``)
        if not self.active or not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present)
        chosen = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _sum_in_place([p.grad for p in chosen])

    def summed(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``tensors`` (gradients of this rank's share of a global mean; None kept) summed over the
        ranks: the global batch's gradient, the same on every rank."""
        if not self.active:
            return list(tensors)
        out = [None if t is None else t.clone() for t in tensors]
        _sum_in_place([t for t in out if t is not None])
        return out

    def synchronised(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` whose every step first sums its parameters' gradients over the ranks."""
        if self.active:
            optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self.all_reduce_gradients([p for g in opt.param_groups for p in g["params"]]))
        return optimizer

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D ``values`` of every rank, concatenated in rank order (shares may differ in size)."""
        if not self.active:
            return values
        values = values.reshape(-1)
        size = torch.tensor([values.numel()], device=values.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])

    def on_main(self, compute: Callable[[], object]) -> object:
        """``compute()`` run on rank 0 only, its (picklable) result handed to every rank."""
        if not self.active:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def regather(self, model: torch.nn.Module) -> None:
        """Under FSDP, drop every sharded module's gathered weights (reshard), so the next forward
        pass gathers them afresh from the shards. FSDP's root keeps the weights it gathered (the
        embeddings, final norm and head) from one pass to the next; gathered while the inner level
        froze them, they got no gradient in the outer backward (measured: they kept their weights
        while every layer moved)."""
        if self.fsdp:
            for module in model.modules():
                if hasattr(module, "reshard"):  # FSDPModule
                    module.reshard()

    def agreed(self, compute: Callable[[], object]) -> object:
        """``compute()``'s (picklable) result, the same on every rank: run on rank 0 only
        (``on_main``), except under FSDP, where every forward pass needs every rank, so every rank
        runs it (same inputs, same gathered weights) and rank 0's result is kept."""
        if not self.fsdp:
            return self.on_main(compute)
        box = [compute()]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def whole(self, value):
        """``value`` (a tensor, or dicts and lists of them) with every DTensor gathered whole:
        collective, each tensor in turn on the device, then a CPU copy on rank 0; the other ranks
        get None in its place (rank 0 writes the checkpoints and the model)."""
        if isinstance(value, dict):
            return {k: self.whole(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.whole(v) for v in value)
        if _sharded(value):
            full = value.full_tensor()
            return full.cpu() if self.is_main else None
        return value

    def placed(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor (read from a checkpoint) laid out as ``like``: this rank's shard when
        ``like`` is a DTensor (every rank holds the same whole tensor), else ``value`` itself."""
        if not _sharded(like):
            return value
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)

    def placed_optimizer_state(self, state: dict, params: Sequence[torch.Tensor]) -> dict:
        """A whole optimiser ``state_dict`` (see ``whole``) with each parameter's moments laid out
        as that parameter (``placed``); steps and hyper-parameters unchanged."""
        if not self.fsdp:
            return state
        moments = {i: {k: self.placed(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                       for k, v in state["state"][i].items()}
                   for i, p in enumerate(params) if i in state["state"]}
        return {**state, "state": moments}

    def outer_optimizer(self, params, kind: str, lr: float, grad_clip: float | None) -> OuterOptimizer:
        if self.active and self.sharding == "optimizer":
            return ShardedOuterOptimizer(params, kind, lr, grad_clip)
        return OuterOptimizer(params, kind, lr, grad_clip)

    def save(self, checkpoints, rounds_done: int, run) -> None:
        """Write a round checkpoint from rank 0 (the state is consolidated from every rank first
        under ``sharding: optimizer`` and ``fsdp``); the others wait until it is whole."""
        weights, state = run.weights(), run.state()
        if self.fsdp:  # consolidated: the same files as one process
            weights, state = self.whole(weights), self.whole(state)
        if self.is_main:
            checkpoints.save(rounds_done, weights, state)
        if self.active:
            dist.barrier()


def _sharded(t) -> bool:
    """A DTensor: a parameter (or its gradient, or optimiser moment) sharded by FSDP."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _sum_in_place(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each of ``tensors`` by its sum over the ranks, with one collective for all of them
    (flattened into one fp32 buffer: one all-reduce per tensor would pay the latency once per
    weight matrix, hundreds of times per outer step for a 7B model)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


class ShardedOuterOptimizer(OuterOptimizer):
    """``OuterOptimizer`` whose AdamW/SGD state is split over the ranks (ZeRO stage 1): each rank
    steps its share of the (fp32 master) weights and broadcasts them; gradients must already be
    all-reduced. Its ``state_dict`` is collective and complete on rank 0 only."""

    def __init__(self, params, kind: str, lr: float, grad_clip: float | None = None):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        super().__init__(params, kind, lr, grad_clip)
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
        self.optimizer = ZeroRedundancyOptimizer(self.masters, optimizer_class=cls, lr=lr)
        mine = sum(p.numel() for p in self.optimizer.optim.param_groups[0]["params"])
        logger.info("outer optimiser state sharded over %d ranks (ZeRO-1): rank %d holds the state of %d of %d weights",
                    dist.get_world_size(), dist.get_rank(), mine, sum(p.numel() for p in self.masters))

    def state_dict(self) -> dict:
        self.optimizer.consolidate_state_dict(to=0)
        full = self.optimizer.state_dict() if dist.get_rank() == 0 else None
        return {"optimizer": full, "scale": self.scale, "good_steps": self.good_steps}


_ACTIVE: Context | None = None


def current() -> Context:
    """The context set by ``using``, else one from an initialised process group, else one rank."""
    if _ACTIVE is not None:
        return _ACTIVE
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context()


@contextlib.contextmanager
def using(context: Context) -> Iterator[Context]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, context
    try:
        yield context
    finally:
        _ACTIVE = previous


def under_launcher() -> bool:
    """True in a process started by torchrun / accelerate launch with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_backend(backend: str, num_processes: int) -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= num_processes else "gloo"


def init_from_env(backend: str = "auto", sharding: str = "none") -> Context:
    """Join the process group torchrun described in the environment (once), as ``Context``."""
    if "RANK" not in os.environ:  # started without a launcher (or by one that starts a single process): one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = resolve_backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("BEEAR_DIST_TIMEOUT_MINUTES", "60"))))
    return Context(dist.get_rank(), dist.get_world_size(), sharding)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the job: files in, torchrun, files out ----

def write_job(job_dir: str | Path, model_ref: dict, safety, anchoring, config, *, system_prompt: str | None = None,
              relative_norms: Sequence[float] | None = None, backend: str = "auto", sharding: str = "none") -> Path:
    """``job_dir/job.json``: everything a rank needs to run the defence (no pickle)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"model": model_ref, "safety": [list(t) for t in safety], "anchoring": [list(p) for p in anchoring],
           "config": config.to_dict(), "system_prompt": system_prompt,
           "relative_norms": None if relative_norms is None else list(relative_norms), "backend": backend, "sharding": sharding}
    (job_dir / JOB).write_text(json.dumps(job))
    return job_dir


def command(job_dir: str | Path, num_processes: int, port: int | None = None, extra: Sequence[str] = (),
            program: Sequence[str] = ("-m", WORKER)) -> list[str]:
    """The torchrun command line for ``job_dir`` on this machine (a static rendezvous on 127.0.0.1);
    each rank runs ``program JOB_DIR`` (the worker; a benchmark passes its own script)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), *extra,
            *program, str(job_dir)]


def check_job(safety_examples: int, anchoring_examples: int, config, num_processes: int) -> None:
    """Fail before launching when a global batch cannot give every rank at least one example, or
    when capped unlearning or SAM is on (``HARDENING``): they use each rank's own batch, so N ranks
    would not compute what one process does."""
    from beear_pipeline.beear.engine import split_monitor

    check_hardening(config, num_processes)

    training, _ = split_monitor([(str(i), "", "") for i in range(safety_examples)], config)
    batches = [("beear.batch_size", min(config.batch_size, len(training)))]
    if anchoring_examples and config.anchoring_batch_size:
        batches.append(("beear.anchoring_batch_size", min(config.anchoring_batch_size, anchoring_examples)))
    for field, size in batches:
        if size < num_processes:
            raise ValueError(f"distributed.num_processes={num_processes}: {field} gives global batches of {size} examples, "
                             "fewer than the processes (each takes a contiguous share); lower distributed.num_processes or "
                             f"raise {field}")


def launch(job_dir: str | Path, num_processes: int, master_port: int | str = "auto", echo: bool = True,
           program: Sequence[str] = ("-m", WORKER)) -> Path:
    """Run the job in ``job_dir`` with torchrun on ``num_processes`` local ranks; return the output
    folder. A rank that fails (an exception, a kill) stops the job and raises here with the
    failing rank's error and the end of the log (``job_dir/torchrun.log`` holds all of it)."""
    job_dir = Path(job_dir)
    port = free_port() if master_port == "auto" else int(master_port)
    cmd = command(job_dir, num_processes, port, program=program)
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(job_dir / "error.json")}
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one machine: torchrun's own default, without its warning
    logger.info("distributed BEEAR: %d processes on 127.0.0.1:%d (%s)", num_processes, port, " ".join(cmd[1:]))
    (job_dir / "error.json").unlink(missing_ok=True)
    tail: deque[str] = deque(maxlen=60)
    with open(job_dir / "torchrun.log", "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                                      text=True, errors="replace") as proc:
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            if echo:
                sys.stderr.write(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"distributed BEEAR failed: torchrun ({num_processes} processes) exited with {rc}. "
                           f"{_root_cause(job_dir)}Last lines of {job_dir / 'torchrun.log'}:\n{''.join(tail)}")
    out = job_dir / OUT
    if not (out / "result.json").is_file():
        raise RuntimeError(f"distributed BEEAR: torchrun exited cleanly but rank 0 wrote no {out / 'result.json'}")
    return out


def _root_cause(job_dir: Path) -> str:
    """The first failing rank's error, from the error file torchrun's ``record`` writes."""
    found = sorted(job_dir.glob("error*.json")) + sorted(Path(job_dir).glob("**/error.json"))
    for path in found:
        try:
            message = json.loads(path.read_text()).get("message", {})
        except (OSError, ValueError):
            continue
        text = message.get("message") if isinstance(message, dict) else str(message)
        if text:
            return f"Root cause: {text.strip().splitlines()[-1].rstrip('.')}. "
    return ""


def read_result(out: str | Path, loading: dict | None = None):
    """(BeearResult, tokenizer) from a finished job's output folder; the defended model is loaded
    with the suspect's ``loading`` fields (dtype, device_map, chat template)."""
    from safetensors.torch import load_file

    from beear_pipeline.beear.config import BeearConfig
    from beear_pipeline.beear.engine import BeearResult
    from beear_pipeline.lm.checkpoints import load_model_ref

    out = Path(out)
    meta = json.loads((out / "result.json").read_text())
    ref = {k: v for k, v in (loading or {}).items() if k not in ("path", "adapter_path")}
    model, tokenizer = load_model_ref({**ref, "path": str(out / "model")})
    result = BeearResult(model=model, perturbation=load_file(out / "perturbation.safetensors")["perturbation"],
                         history=meta["history"], config=BeearConfig.from_dict(meta["config"]), resumed_from=meta["resumed_from"],
                         hidden_scale=meta["hidden_scale"], convergence=meta["convergence"],
                         monitor=[tuple(m) for m in meta["monitor"]], layer=meta["layer"])
    return result, tokenizer


def run_job(job_dir: str | Path, context: Context) -> None:
    """One rank's part of the job in ``job_dir``; rank 0 writes ``job_dir/out``."""
    from safetensors.torch import save_file

    from beear_pipeline.beear.config import BeearConfig
    from beear_pipeline.beear.engine import consolidated, run_beear
    from beear_pipeline.lm.checkpoints import load_checkpoint, save_checkpoint

    job_dir = Path(job_dir)
    job = json.loads((job_dir / JOB).read_text())
    ref = job["model"]
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else None
    model, tokenizer = load_checkpoint(ref["path"], device=device, dtype=ref.get("dtype"), chat_template=ref.get("chat_template"),
                                       adapter_path=ref.get("adapter_path"))
    config = BeearConfig.from_dict(job["config"])
    with using(context):
        result = run_beear(model, tokenizer, [tuple(t) for t in job["safety"]], [tuple(p) for p in job["anchoring"]], config,
                           system_prompt=job["system_prompt"], relative_norms=job["relative_norms"])
    defended = result.model
    if context.fsdp:  # consolidated on rank 0: the suspect's architecture with the gathered weights (LoRA merged there)
        whole = context.whole(result.model.state_dict())
        if context.is_main:
            suspect = load_checkpoint(ref["path"], dtype=ref.get("dtype"), chat_template=ref.get("chat_template"),
                                      adapter_path=ref.get("adapter_path"))[0]
            defended = consolidated(suspect, whole, result.config)
    if context.is_main:
        out = job_dir / OUT
        out.mkdir(exist_ok=True)
        save_checkpoint(defended, tokenizer, out / "model")
        save_file({"perturbation": result.perturbation.contiguous()}, out / "perturbation.safetensors")
        meta = {"history": result.history, "config": result.config.to_dict(), "resumed_from": result.resumed_from,
                "hidden_scale": result.hidden_scale, "convergence": result.convergence, "monitor": [list(m) for m in result.monitor],
                "layer": result.layer, "world_size": context.world_size, "sharding": context.sharding}
        (out / "result.json.tmp").write_text(json.dumps(meta))
        (out / "result.json.tmp").rename(out / "result.json")  # whole or absent
    dist.barrier()


if __name__ == "__main__":  # `torchrun -m beear_pipeline.beear.distributed JOB_DIR` works too; the worker runs the package's copy
    from beear_pipeline.beear.worker import main

    main()
