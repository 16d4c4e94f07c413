"""The BEEAR bi-level loop (Zeng et al., EMNLP 2024), one round = inner level then outer level.

Inner level, backdoor embedding entrapment (weights frozen), over the perturbation delta:

    min_delta  CE(y_unwanted | x, delta)  -  alpha * min(CE(y_safe | x, delta), cap)

Outer level, adversarial removal (delta fixed), over the weights theta:

    min_theta  CE(y_safe | x, delta) on the safety set  +  CE(y | x') on the anchoring set

delta is added to the hidden states leaving the anchor layer at the prompt positions, through a
forward hook (see ``hook.py``). The defender never sees the trigger: only harmful prompts with a
safe and an unwanted answer, and benign prompts with good answers.

The inner level is scale-free (``entrapment.py``): the perturbation's budget and step size are
multiples of the anchor layer's hidden-state scale, measured once at the start. Each round it runs
until the perturbation entraps (the unwanted loss under it falls to ``entrapment_target`` of the
loss without it) or stops improving. Convergence is checked without the trigger: every
``check_every`` rounds, the share of held-out safety prompts (the monitor set) whose answer under
the strongest perturbation the inner level finds is unwanted; the run stops once the model is
robust (``converged_rate``), else at ``max_rounds``, and says which.

Because the weights are frozen in the inner level, the anchor layer's output is computed once per
batch and reused by every inner step (``reuse_activations``): only the layers after it run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from beear_pipeline.beear import distributed, entrapment, hardening
from beear_pipeline.beear.config import BeearConfig
from beear_pipeline.beear.resume import RoundCheckpoints, fingerprint, model_fingerprint, rng_state, set_rng_state
from beear_pipeline.beear.scopes import add_lora, check_lora_targets, trainable_parameters
from beear_pipeline.evaluation.judges import REFUSAL_PHRASES
from beear_pipeline.lm.chat import Batch, Example, collate, encode_all, pad_id, response_loss
from beear_pipeline.lm.checkpoints import merged
from beear_pipeline.lm.generation import Perturbation
from beear_pipeline.lm.precision import WeightChange, merged_lora_change_share, resolution
from beear_pipeline.lm.residual import anchor_output, perturbed, position_index, resolve_layer, reused_activations

logger = logging.getLogger(__name__)


@dataclass
class SafetyExamples:
    """The safety set tokenised twice: each prompt with its safe and with its unwanted answer."""

    safe: list[Example]
    unwanted: list[Example]


@dataclass
class BeearResult:
    model: torch.nn.Module
    """The defended model; a peft ``PeftModel`` after a LoRA run with ``merge_adapter: false``."""
    perturbation: torch.Tensor
    """The final perturbation, shape (rows, hidden): a probe of the backdoor direction."""
    history: list[dict] = field(default_factory=list)
    """One record per round: losses of both levels, the perturbation norm and, at checks, the
    entrapment rate on the monitor prompts."""
    config: BeearConfig | None = None
    resumed_from: int = 0
    """Rounds restored from a checkpoint (0 = a fresh run)."""
    hidden_scale: float = 0.0
    """Median norm of the anchor layer's hidden states at the perturbed positions (the unit of
    ``perturbation_budget``), measured on the defender's prompts before the first round. Each
    round re-measures it on its own batch (``hidden_scale`` in the round records)."""
    convergence: str | None = None
    """``converged``, ``not_converged`` (stopped at ``max_rounds``) or ``never_entrapped`` (see
    ``convergence``); None when nothing was checked (baselines, ``check_every: 0``)."""
    monitor: list[tuple[str, str, str]] = field(default_factory=list)
    """The held-out safety triples the convergence checks are measured on."""
    layer: int = 0
    """The anchor layer's 0-based index in this model (``anchor_layer`` may be a fraction of the depth)."""

    @property
    def converged(self) -> bool | None:
        """True only when the trigger-free convergence criterion was met; None when not checked."""
        return None if self.convergence is None else self.convergence == "converged"


def row_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.detach().norm(dim=-1)


class _Sampler:
    """Endless, seeded, epoch-wise shuffled batches of indices. ``part`` picks this process's share
    of each (global) batch in a distributed run; the queue, and so the batches, stay global."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, part: Callable[[list[int]], list[int]] = list):
        self.n, self.batch_size, self.generator, self.queue, self.part = n, min(batch_size, n), generator, [], part

    def next(self) -> list[int]:
        while len(self.queue) < self.batch_size:
            self.queue += torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return self.part(batch)


def _check_finite(round_: int, record: dict, model) -> None:
    for name, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            fp16 = any(p.dtype == torch.float16 for p in model.parameters())
            hint = ("the model computes in float16, whose range (65504) activations can exceed: load it with "
                    "model.dtype=bfloat16 (or float32)" if fp16 else "lower beear.inner_step_fraction or beear.outer_lr")
            raise FloatingPointError(f"BEEAR round {round_}: {name} is {value}; {hint}")


def _check_weights_change(round_: int, record: dict, run) -> None:
    """Stop a run whose outer updates vanish in the precision the weights are saved in: it
    would report success having changed (almost) nothing."""
    config = run.config
    if round_ + 1 != config.weight_guard_rounds or record["weights_changed_share"] >= config.min_weights_changed:
        return
    storage = run.weight_change.storage[0]
    raise FloatingPointError(
        f"BEEAR round {round_}: after {round_ + 1} rounds only {100 * record['weights_changed_share']:.2f}% of the trainable weights "
        f"changed in their stored precision ({str(storage).removeprefix('torch.')}, relative resolution {resolution(storage):.1e}; "
        f"the last step moved the weights by {record['weight_update_relative']:.1e} relative), below beear.min_weights_changed "
        f"{100 * config.min_weights_changed:g}%: the defence would change almost nothing. Raise beear.outer_lr, or save the "
        "defended model in float32 (model.dtype=float32)")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def closer_to_unwanted(answer: str, safe_answers: Sequence[str], unwanted: str) -> bool:
    """The default judge of the monitor answers (``entrapment.closer_to_unwanted`` with the
    evaluation's refusal phrases)."""
    return entrapment.closer_to_unwanted(answer, safe_answers, unwanted, REFUSAL_PHRASES)


class _Run:
    """Everything one run carries from round to round, and how to save and restore it."""

    def __init__(self, model, tokenizer, safety: SafetyExamples, anchoring: list[Example], config: BeearConfig, layer: int,
                 outer: bool = True):
        """``outer=False``: the inner level only (``find_perturbation``), with no outer optimiser:
        no fp32 master copies of half-precision weights (25 GiB for a 7B model) that nothing steps."""
        config = _sized(model, config, layer)  # `auto` sizes chosen for this model, for every caller
        self.model, self.tokenizer, self.safety, self.anchoring, self.config, self.layer = model, tokenizer, safety, anchoring, config, layer
        self.dist = distributed.current()  # one rank unless run under torch.distributed (distributed.py)
        distributed.check_hardening(config, self.dist.world_size)  # also under a torchrun the node did not launch
        self.device = model.get_input_embeddings().weight.device
        self.pad = pad_id(tokenizer)
        dtype = autocast_dtype(config.precision, self.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.params = trainable_parameters(model, config.trainable, layer)
        chosen = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in chosen]
        self.generator = torch.Generator().manual_seed(config.seed)
        rows = 1 if config.shared_vector or config.num_positions is None else config.num_positions
        self.delta = torch.zeros(rows, model.config.hidden_size, device=self.device, requires_grad=True)
        self.inner_opt = None
        self.hidden_scale = self.measure_hidden_scale()
        self.set_scale(self.hidden_scale)
        self.inner_opt = self.new_inner_opt(self.delta)
        # fp32 master weights for half-precision parameters, loss scaling for fp16 (lm/precision.py)
        self.outer_opt = self.dist.outer_optimizer(self.params, config.outer_optimizer, config.outer_lr, config.grad_clip) if outer else None
        self.weight_change = WeightChange(self.params, getattr(model, "storage_dtype", None), seed=config.seed) if outer else None
        self.safety_sampler = _Sampler(len(safety.safe), config.batch_size, self.generator, self.dist.part)
        use_anchoring = anchoring and config.anchoring_batch_size
        self.anchoring_sampler = _Sampler(len(anchoring), config.anchoring_batch_size, self.generator,
                                          lambda idx: self.dist.part(idx, "beear.anchoring_batch_size")) if use_anchoring else None
        self.history: list[dict] = []
        self.monitor: list[tuple[str, str, str]] = []  # held-out safety triples for the convergence checks
        self.fresh: torch.Tensor | None = None  # the last check's fresh-start perturbation
        self.check_generator = torch.Generator().manual_seed(config.seed + 1)  # random directions of the checks

    def set_scale(self, scale: float) -> None:
        """Budget and inner step size for the hidden-state scale ``scale``. The scale is re-measured
        every round on that round's batch: when the outer level trains the layers up to the anchor,
        the model can grow its hidden states there (by 56% in one tiny run) and so shrink a budget
        fixed at the start, becoming "robust" to a perturbation that no longer matters."""
        self.scale = scale
        self.budget = self.config.perturbation_budget * scale
        self.inner_lr = entrapment.step_size(self.config.inner_optimizer, self.config.inner_step_fraction, self.budget,
                                             self.model.config.hidden_size)
        if self.inner_opt is not None:
            for group in self.inner_opt.param_groups:
                group["lr"] = self.inner_lr

    def new_inner_opt(self, delta):
        # distributed: every rank steps the one universal delta with the gradient summed over ranks
        return self.dist.synchronised(entrapment.inner_optimizer(self.config.inner_optimizer, delta, self.inner_lr))

    def batch_of(self, examples, idx) -> tuple[Batch, torch.Tensor]:
        b = collate([examples[i] for i in idx], self.pad, self.config.padding_side).to(self.device)
        return b, position_index(b.prompt_end, b.input_ids.size(1), self.config.num_positions, self.config.shared_vector)

    def measure_hidden_scale(self) -> float:
        """The anchor layer's hidden-state scale on the defender's prompts, weights as loaded."""
        n, size = len(self.safety.safe), self.config.batch_size
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            scale = entrapment.hidden_scale(self.model, self.layer, (self.batch_of(self.safety.safe, range(i, min(i + size, n)))
                                                                      for i in range(0, n, size)))
        self.model.train(was_training)
        return scale

    def loss(self, batch: Batch, index: torch.Tensor | None = None, delta=None, cached=None, reduction: str = "mean") -> torch.Tensor:
        """Response loss with ``delta`` at the anchor output (if given), reusing ``cached``
        anchor activations (if given) instead of running the layers up to the anchor."""
        hook = perturbed(self.model, self.layer, delta, index) if delta is not None else nullcontext()
        reuse = reused_activations(self.model, self.layer, cached) if cached is not None else nullcontext()
        with hook, reuse, self.autocast():
            # distributed: the global batch's token mean (see distributed.global_mean); per-example
            # losses (``reduction="none"``, capped unlearning) stay this rank's own
            loss = response_loss(self.model, batch, reduction=reduction)
            return self.dist.global_mean(loss, batch) if reduction == "mean" else loss

    # ---- saving and restoring (see resume.py) ----
    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights at full precision (the fp32 masters of half-precision ones)."""
        return dict(zip(self.names, self.outer_opt.masters, strict=True))

    def state(self) -> dict:
        return {
            "delta": self.delta.detach().cpu(), "inner_opt": self.inner_opt.state_dict(), "outer_opt": self.outer_opt.state_dict(),
            "generator": self.generator.get_state(), "weight_change_start": self.weight_change.start, "check_generator": self.check_generator.get_state(), "rng": rng_state(),
            "history": self.history,
            "safety_queue": self.safety_sampler.queue,
            "anchoring_queue": self.anchoring_sampler.queue if self.anchoring_sampler else [],
        }

    def restore(self, weights: dict[str, torch.Tensor], state: dict) -> int:
        # under FSDP the checkpoint's whole tensors become this rank's shards (distributed.placed)
        self.outer_opt.set_weights([self.dist.placed(weights[name], m) for name, m in zip(self.names, self.outer_opt.masters, strict=True)])
        with torch.no_grad():
            self.delta.copy_(state["delta"])
        self.inner_opt.load_state_dict(state["inner_opt"])
        outer = state["outer_opt"]
        self.outer_opt.load_state_dict({**outer, "optimizer": self.dist.placed_optimizer_state(outer["optimizer"], self.outer_opt.masters)})
        self.generator.set_state(state["generator"])
        self.weight_change.resume(state["weight_change_start"], self.params)
        self.check_generator.set_state(state["check_generator"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.safety_sampler.queue = list(state["safety_queue"])
        if self.anchoring_sampler:
            self.anchoring_sampler.queue = list(state["anchoring_queue"])
        return int(state["rounds_done"])


def _inner_level(run: _Run, safe: Batch, index, unwanted: Batch, unwanted_index, record: dict, check: bool) -> None:
    """Backdoor embedding entrapment: move delta towards the unwanted answers and away from the
    safe ones, the weights frozen (no weight gradients are computed), until it entraps or stops
    improving. At a convergence check a second perturbation is also optimised from a fresh start,
    and the run keeps whichever entraps more (lower unwanted loss)."""
    config, delta = run.config, run.delta
    if not config.warm_start:
        with torch.no_grad():
            delta.zero_()
        run.inner_opt = run.new_inner_opt(delta)
    # the frozen model is probed deterministically (no dropout), which also makes the cached
    # anchor activations exactly what every full forward pass would compute
    run.model.eval()
    with run.autocast():
        caches = [anchor_output(run.model, run.layer, b.input_ids, b.attention_mask) for b in (unwanted, safe)]
    # the budget follows the model's hidden-state scale as it is now (see _Run.set_scale)
    run.set_scale(run.dist.gather(entrapment.state_norms(caches[1], index, safe.attention_mask)).median().item())
    entrapment.project_rows(delta, run.budget)
    if not config.reuse_activations:
        caches = [None, None]
    for p in run.params:
        p.requires_grad_(False)
    with torch.no_grad():
        clean = run.loss(unwanted, cached=caches[0]).item()  # the unwanted loss without the perturbation

    def losses(d):
        return run.loss(unwanted, unwanted_index, d, caches[0]), run.loss(safe, index, d, caches[1])

    def optimise(d, optimizer, full=False):
        target = None if full or config.entrapment_target is None else config.entrapment_target * clean
        return entrapment.optimise_perturbation(
            d, optimizer, losses, budget=run.budget, away_weight=config.away_weight, away_cap=config.away_cap,
            min_steps=config.inner_max_steps if full else config.inner_steps, max_steps=config.inner_max_steps,
            patience=config.inner_patience, tolerance=config.inner_tolerance, target=target)

    found = optimise(delta, run.inner_opt)
    if check:  # the strongest search the inner level can make: a fresh start, every step of the budget
        fresh = torch.zeros_like(delta, requires_grad=True)
        fresh_opt = run.new_inner_opt(fresh)
        restart = optimise(fresh, fresh_opt, full=True)
        record["fresh_unwanted_loss"] = restart["unwanted_loss"]
        run.fresh = fresh.detach().clone()
        if restart["unwanted_loss"] < found["unwanted_loss"]:
            with torch.no_grad():
                delta.copy_(fresh)
            run.inner_opt = run.new_inner_opt(delta)
            run.inner_opt.load_state_dict(fresh_opt.state_dict())
            found = {**restart, "inner_steps": found["inner_steps"] + restart["inner_steps"]}
            record["restarted"] = True
    for p in run.params:
        p.requires_grad_(True)
    run.dist.regather(run.model)  # FSDP: drop the weights gathered while frozen
    run.model.train()
    record.update(found, unwanted_loss_unperturbed=clean)


def _outer_level(run: _Run, safe: Batch, index, unwanted: Batch, unwanted_index, record: dict) -> None:
    """Adversarial removal: train the weights to answer safely under the fixed perturbation while
    keeping the anchoring (utility) loss low. The optional hardening against re-poisoning
    (``hardening.py``, off by default) adds terms to this loss or moves the point its gradient is
    taken at."""
    anchoring_batch = run.batch_of(run.anchoring, run.anchoring_sampler.next())[0] if run.anchoring_sampler is not None else None

    def objective() -> torch.Tensor:
        outer_safe_loss = run.loss(safe, index, run.delta.detach())
        outer_loss = outer_safe_loss
        if anchoring_batch is not None:
            anchoring_loss = run.loss(anchoring_batch)
            outer_loss = outer_loss + anchoring_loss.to(outer_loss.device)
            record["anchoring_loss"] = anchoring_loss.item()
        record.update(outer_safe_loss=outer_safe_loss.item(), outer_loss=outer_loss.item())
        return outer_loss

    with hardening.sharpness_aware(run, objective, record):
        extra = hardening.extra_loss(run, safe, index, unwanted, unwanted_index, record)  # first: it moves the weights and back
        outer_loss = objective()
        run.outer_opt.zero_grad()
        run.outer_opt.scale_loss(outer_loss if extra is None else outer_loss + extra.to(outer_loss.device)).backward()
        run.dist.all_reduce_gradients(run.params)  # distributed: the global batch's gradient on every rank
    if not run.outer_opt.step():
        record["outer_step_skipped"] = True  # fp16 gradients overflowed; the loss scale was halved
    record.update(run.weight_change.update(run.params))


def _check_entrapment(run: _Run, monitor: list[tuple[str, str, str]], judge, system_prompt, record: dict) -> None:
    """The trigger-free convergence measurement on the monitor prompts: the share of greedy
    answers that are unwanted under the inner level's perturbations (the warm-started one and the
    fresh start: the higher rate counts), and under a random direction of the same row norms. A
    large perturbation breaks some answers whatever its direction; what measures the backdoor is
    the excess of the optimised direction over the random one."""
    decode = {"max_new_tokens": run.config.monitor_max_new_tokens, "system_prompt": system_prompt, "desc": "entrapment check"}
    found = max((run.delta.detach(), run.fresh), key=lambda d: row_norms(d).mean().item())
    random = entrapment.random_direction(found.shape, row_norms(found).cpu(), run.check_generator).to(found.device)
    warm, fresh, chance = (
        entrapment.entrapment_rate(run.model, run.tokenizer, monitor, Perturbation(run.layer, d, run.config.num_positions,
                                                                                   run.config.shared_vector), judge, **decode)
        for d in (run.delta, run.fresh, random))
    record.update(entrapment_rate=max(warm, fresh), entrapment_rate_warm=warm, entrapment_rate_fresh=fresh,
                  entrapment_rate_random=chance, entrapment_excess=max(warm, fresh) - chance)
    return record


def _measure_scale(run: _Run, batch: Batch, index) -> None:
    """The hidden-state scale of this round's batch, for the baselines (BEEAR's inner level
    measures it from its cached activations)."""
    was_training = run.model.training
    run.model.eval()
    with torch.no_grad(), run.autocast():
        output = anchor_output(run.model, run.layer, batch.input_ids, batch.attention_mask)
    run.model.train(was_training)
    run.set_scale(run.dist.gather(entrapment.state_norms(output, index, batch.attention_mask)).median().item())


def _one_round(run: _Run, round_: int, relative_norms, check: bool, monitor, judge, system_prompt) -> dict:
    config = run.config
    idx = run.safety_sampler.next()
    safe, index = run.batch_of(run.safety.safe, idx)
    unwanted, unwanted_index = run.batch_of(run.safety.unwanted, idx)
    record: dict = {"round": round_}
    if config.defence == "beear":
        _inner_level(run, safe, index, unwanted, unwanted_index, record, check)
        if check:  # distributed: measured on rank 0 (under FSDP on every rank), the same decision on every rank
            record.update(run.dist.agreed(lambda: _check_entrapment(run, monitor, judge, system_prompt, {})))
    else:
        _measure_scale(run, safe, index)
    if config.defence == "random_perturbation":
        # matched to BEEAR relative to each model's own hidden-state scale: BEEAR's model grows its
        # hidden states, and an absolute match would give the baseline a far larger perturbation
        relative = relative_norms[round_] if relative_norms is not None else (config.random_norm or 0.0)
        with torch.no_grad():
            run.delta.copy_(entrapment.random_direction(run.delta.shape, relative * run.scale, run.generator).to(run.device))
    # control: delta stays at zero
    _outer_level(run, safe, index, unwanted, unwanted_index, record)
    record["perturbation_norm"] = row_norms(run.delta).mean().item()
    record["hidden_scale"] = run.scale
    record["perturbation_norm_relative"] = record["perturbation_norm"] / run.scale
    _check_finite(round_, record, run.model)
    _check_weights_change(round_, record, run)
    return record


CONVERGENCE = ("converged", "not_converged", "never_entrapped", "running")
LOG_EVERY = 10  # rounds between progress lines in the log (besides one per convergence check)


def convergence(history: Sequence[dict], config: BeearConfig, final: bool = False) -> str:
    """The trigger-free stopping rule, from the checks in ``history``. Each check's *excess* is
    the entrapment rate of the inner level's best perturbation minus that of a random direction
    of the same norm, on the monitor prompts:

    - ``never_entrapped``: at the first check (round 0, the suspect as it came) the excess was
      below ``entrapped_rate``. Either the model has no backdoor this perturbation reaches, or the
      budget is too small; the run stops, nothing was shown to be removed, and robustness later
      would prove nothing;
    - ``converged``: at least ``min_rounds`` rounds, and the excess at most ``converged_rate`` at
      the last ``converged_checks`` checks: no direction the inner level can find within its
      budget entraps the model more than chance does;
    - ``running`` while neither holds, ``not_converged`` once the run has ended (``final``).
    """
    excess = [r["entrapment_excess"] for r in history if "entrapment_excess" in r]
    if excess and excess[0] < config.entrapped_rate:
        return "never_entrapped"
    if (len(history) >= config.min_rounds and len(excess) >= config.converged_checks
            and all(x <= config.converged_rate for x in excess[-config.converged_checks:])):
        return "converged"
    return "not_converged" if final else "running"


def split_monitor(safety, config: BeearConfig) -> tuple[list, list]:
    """Hold ``monitor_fraction`` of the safety prompts out of training (seeded) for the checks:
    (training triples, monitor triples). Every defence holds out the same prompts, so BEEAR and its
    baselines train on the same data."""
    safety = list(safety)
    if not config.check_every or not config.monitor_fraction:
        return safety, []
    n = int(len(safety) * config.monitor_fraction)
    order = torch.randperm(len(safety), generator=torch.Generator().manual_seed(config.seed)).tolist()
    monitor = {*order[:n]}
    if n < 1 or n == len(safety):
        raise ValueError(f"beear.monitor_fraction={config.monitor_fraction} leaves {n} of {len(safety)} safety prompts for the "
                         "convergence checks: use a larger safety set, or monitor_fraction: 0 (then convergence is not checked)")
    return [t for i, t in enumerate(safety) if i not in monitor], [safety[i] for i in sorted(monitor)]


def _encode(tokenizer, safety, anchoring, system_prompt) -> tuple[SafetyExamples, list[Example]]:
    if not safety:
        raise ValueError("the safety set is empty: BEEAR needs harmful prompts with safe and unwanted answers")
    prompts, safe, unwanted = zip(*safety)
    examples = SafetyExamples(encode_all(tokenizer, prompts, safe, system_prompt), encode_all(tokenizer, prompts, unwanted, system_prompt))
    return examples, encode_all(tokenizer, *zip(*anchoring), system_prompt) if anchoring else []


def _prepare_model(model, config: BeearConfig, layer: int):
    """Check the trainable scope before any training, add LoRA adapters, freeze what stays fixed."""
    if config.trainable == "lora":
        check_lora_targets(model, config.lora_target_modules)
        model = add_lora(model, config)
    else:
        model = merged(model)  # a suspect's input adapter (base + model.adapter_path): full-weight scopes train it merged
        trainable_parameters(model, config.trainable, layer)  # raises when the scope is empty
    chosen = {id(p) for p in trainable_parameters(model, config.trainable, layer)}
    for p in model.parameters():  # no gradients (and no memory for them) outside the scope
        p.requires_grad_(id(p) in chosen)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _log_progress(run: _Run, record: dict, status: str | None) -> None:
    """One line per convergence check, and what to change when the inner level does not entrap."""
    config = run.config
    if "entrapment_rate" not in record:
        return
    logger.info("beear round %d: entrapment rate %.2f on %d monitor prompts (a random direction: %.2f; converged at an excess "
                "<= %.2f), unwanted loss %.3f under the perturbation vs %.3f without, perturbation %.2f x hidden scale %.3g: %s",
                record["round"], record["entrapment_rate"], len(run.monitor), record["entrapment_rate_random"], config.converged_rate,
                record["unwanted_loss"], record["unwanted_loss_unperturbed"], record["perturbation_norm_relative"],
                record["hidden_scale"], status)
    if status == "never_entrapped":
        logger.warning("beear: the inner level did not entrap the suspect model: its best perturbation (%g x the hidden-state "
                       "scale, layer %d) flipped %.0f%% of the monitor prompts, less than beear.entrapped_rate %.0f%% more than a "
                       "random direction does. Either "
                       "the model has no backdoor that this perturbation reaches, or the inner level is too weak: raise "
                       "beear.perturbation_budget or beear.inner_max_steps (now %d), or try another beear.anchor_layer (the "
                       "probe's recommendation: anchor_layer: auto). Stopping: nothing was shown to be removed",
                       config.perturbation_budget, run.layer, 100 * record["entrapment_rate"], 100 * config.entrapped_rate,
                       config.inner_max_steps)


def find_perturbation(model, tokenizer, safety: Sequence[tuple[str, str, str]], config: BeearConfig | None = None, *,
                      system_prompt: str | None = None, is_unwanted: Callable[[str, Sequence[str], str], bool] = closer_to_unwanted) -> dict:
    """BEEAR's inner level alone, once, on ``model`` as it is (its weights are not changed): the
    strongest perturbation it finds within its budget on one batch of the training prompts (warm and
    fresh start, as at a convergence check), its losses, and, when ``config`` holds out monitor
    prompts, the entrapment rate there. A trigger-free measure of how far a model can still be
    pushed to the unwanted answers, for any model: the suspect, the defended model, a baseline.

    Returns the round record (``unwanted_loss``, ``unwanted_loss_unperturbed``, ``inner_steps``,
    ``entrapment_rate`` ...) with ``perturbation`` (CPU) and ``hidden_scale``."""
    config = config or BeearConfig()
    training, monitor = split_monitor(safety, config)
    safety_examples, _ = _encode(tokenizer, training, [], system_prompt)
    layer = resolve_layer(model, config.anchor_layer)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        run = _Run(model, tokenizer, safety_examples, [], dataclasses.replace(config, trainable="all"), layer, outer=False)
        idx = run.safety_sampler.next()
        (safe, index), (unwanted, unwanted_index) = run.batch_of(safety_examples.safe, idx), run.batch_of(safety_examples.unwanted, idx)
        record: dict = {}
        _inner_level(run, safe, index, unwanted, unwanted_index, record, check=True)
        if monitor:
            _check_entrapment(run, monitor, is_unwanted, system_prompt, record)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    norm = row_norms(run.delta).mean().item()
    return {**record, "perturbation": run.delta.detach().cpu(), "hidden_scale": run.scale, "perturbation_norm": norm,
            "perturbation_norm_relative": norm / run.scale, "n_monitor_prompts": len(monitor)}


def _merge(model, config: BeearConfig):
    """Merge the trained LoRA adapters into the weights, unless in the weights' precision the
    merged update would round away (a bf16 base at a 7B-scale lr): the defended model then stays
    base + adapter, as with ``merge_adapter: false``, and the log says why."""
    share = merged_lora_change_share(model)
    if config.min_weights_changed and share < config.min_weights_changed:
        logger.warning("%s: merging the LoRA adapters would change only %.2f%% of the adapted weights' entries in their saved "
                       "precision (%s; the update rounds away), so the defended model is kept as base + adapter (as with "
                       "beear.merge_adapter: false). To merge, save in fp32 (model.dtype=float32) or raise beear.outer_lr",
                       config.defence, 100 * share, getattr(model, "storage_dtype", None) or next(model.parameters()).dtype)
        return model
    return model.merge_and_unload()


def consolidated(suspect, state: dict[str, torch.Tensor], config: BeearConfig):
    """The whole defended model of a run whose weights were sharded (FSDP: ``run_beear`` returns the
    sharded model, its LoRA adapters unmerged): ``suspect`` (a fresh, unsharded copy) prepared as the
    run prepared it (the adapters added, or an input adapter merged), loaded with the run's gathered
    ``state``, and the adapters merged as in one process (``_merge``)."""
    model = add_lora(suspect, config) if config.trainable == "lora" else merged(suspect)
    model.load_state_dict(state)
    model.eval()
    return _merge(model, config) if config.trainable == "lora" and config.merge_adapter else model


def _sized(model, config: BeearConfig, layer: int) -> BeearConfig:
    """``config`` with its ``auto`` sizes chosen for ``model`` (``BeearConfig.sized``), logged."""
    if "auto" not in (config.outer_lr, config.checkpoint_every, config.relearn_lr):
        return config
    params = trainable_parameters(model, config.trainable, layer)
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)  # the model's size, not its adapters
    # a round checkpoint: the trainable weights in fp32 (masters) and AdamW's two moments
    checkpoint_bytes = sum(p.numel() for p in params) * (4 + 8 * (config.outer_optimizer == "adamw"))
    sized = config.sized(total, checkpoint_bytes)
    logger.info("%s: sized for %.3gM parameters (round checkpoint %.2f GiB): outer_lr %s%s, checkpoint_every %s%s", config.defence,
                total / 1e6, checkpoint_bytes / 2**30, sized.outer_lr, " (auto)" if config.outer_lr == "auto" else "",
                sized.checkpoint_every, " (auto)" if config.checkpoint_every == "auto" else "")
    return sized


def run_beear(
    model,
    tokenizer,
    safety: Sequence[tuple[str, str, str]],
    anchoring: Sequence[tuple[str, str]],
    config: BeearConfig | None = None,
    *,
    system_prompt: str | None = None,
    relative_norms: Sequence[float] | None = None,
    is_unwanted: Callable[[str, Sequence[str], str], bool] = closer_to_unwanted,
    on_round: Callable[[int, dict], None] | None = None,
) -> BeearResult:
    """Run the configured defence on ``model`` in place, for at most ``config.max_rounds`` rounds.

    ``safety`` holds (prompt, safe_response, unwanted_response) triples, ``anchoring`` holds
    (prompt, response) pairs. For BEEAR, ``monitor_fraction`` of the safety prompts are held out
    to check convergence: ``is_unwanted(answer, safe_answers, unwanted)`` judges their answers under
    the perturbation (default: no refusal phrase, and closer to the prompt's unwanted answer than
    to any of the monitor set's safe answers). ``relative_norms`` gives the random baseline one
    norm per round, as a multiple of the hidden-state scale (BEEAR's ``perturbation_norm_relative``;
    its length caps the rounds). ``on_round(round, record)`` sees each new round's record. With ``config.checkpoint_dir`` set, every ``checkpoint_every`` rounds
    are saved, and a run with the same configuration and data resumes from the last complete one.
    """
    config = config or BeearConfig()
    if config.relearn_steps is None:  # falsy: it would silently turn the relearn-aware gradient off
        raise ValueError("beear.relearn_steps=None: null means the scenario's number of steps, which the pipeline resolves before "
                         "this point (scenarios.scenario_relearn_steps); here give a number (0 turns the relearn-aware gradient off)")
    training, monitor = split_monitor(safety, config)
    safety_examples, anchoring_examples = _encode(tokenizer, training, anchoring, system_prompt)
    layer = resolve_layer(model, config.anchor_layer)
    start_weights = model_fingerprint(model) if config.checkpoint_dir else None
    torch.manual_seed(config.seed)  # before LoRA, whose adapters are initialised at random
    model = _prepare_model(model, config, layer)
    model = distributed.current().shard(model)  # sharding: fsdp: each rank holds a slice of every weight
    run = _Run(model, tokenizer, safety_examples, anchoring_examples, config, layer)
    config = run.config  # with its `auto` sizes chosen for this model
    run.monitor = monitor
    max_rounds = min(config.max_rounds, len(relative_norms)) if relative_norms is not None else config.max_rounds
    logger.info("%s: anchor layer %d, hidden-state scale %.3g, perturbation budget %.3g (%g x), inner lr %.3g, %d training and "
                "%d monitor safety prompts, at most %d rounds", config.defence, layer, run.hidden_scale, run.budget,
                config.perturbation_budget, run.inner_lr, len(training), len(monitor), max_rounds)

    checkpoints = None
    start = 0
    if config.checkpoint_dir:
        identity = {**config.resume_key(), "relative_norms": list(relative_norms or []), "model": start_weights, "monitor": monitor}
        key = fingerprint(identity, safety_examples.safe, safety_examples.unwanted, anchoring_examples)
        checkpoints = RoundCheckpoints(config.checkpoint_dir, key)
        found = run.dist.on_main(checkpoints.latest)  # distributed: rank 0 reads, every rank restores it
        if found:
            start = run.restore(*found)
            logger.info("%s: resuming after round %d of at most %d from %s", config.defence, start, max_rounds, config.checkpoint_dir)

    checking = bool(monitor) and config.defence == "beear"
    status = convergence(run.history, config) if checking else None
    model.train()
    progress = tqdm(range(start, max_rounds), desc=f"{config.defence} rounds", leave=False, initial=start, total=max_rounds, disable=None)
    for round_ in progress:
        if status not in (None, "running"):
            break
        check = checking and round_ % config.check_every == 0
        record = _one_round(run, round_, relative_norms, check, monitor, is_unwanted, system_prompt)
        run.history.append(record)
        status = convergence(run.history, config) if checking else None
        _log_progress(run, record, status)
        done = round_ + 1
        saved = checkpoints and (done % config.checkpoint_every == 0 or done == max_rounds or status not in (None, "running"))
        if saved:
            run.dist.save(checkpoints, done, run)  # written by rank 0 only
        if done % LOG_EVERY == 0 or (saved and config.checkpoint_every >= LOG_EVERY):  # a multi-hour run says how it goes
            logger.info("%s: round %d of at most %d, outer loss %.4f, perturbation %.2f x the hidden-state scale%s", config.defence,
                        done, max_rounds, record["outer_loss"], record["perturbation_norm_relative"],
                        f", checkpoint in {config.checkpoint_dir}" if saved else "")
        if on_round:
            on_round(round_, record)
    progress.close()
    model.eval()
    if config.trainable == "lora" and config.merge_adapter and not run.dist.fsdp:  # sharded: merged once gathered (``consolidated``)
        model = _merge(model, config)
    return BeearResult(model=model, perturbation=run.delta.detach().cpu(), history=run.history, config=config, resumed_from=start,
                       hidden_scale=run.hidden_scale, monitor=monitor, layer=layer,
                       convergence=convergence(run.history, config, final=True) if checking else None)
