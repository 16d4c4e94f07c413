"""The BEEAR bi-level loop (Zeng et al., EMNLP 2024), one round = inner level then outer level.

Inner level, backdoor embedding entrapment (weights frozen), over the perturbation delta:

    min_delta  CE(y_unwanted | x, delta)  -  alpha * min(CE(y_safe | x, delta), cap)

Outer level, adversarial removal (delta fixed), over the weights theta:

    min_theta  CE(y_safe | x, delta) on the safety set  +  CE(y | x') on the anchoring set

delta is added to the hidden states leaving the anchor layer at the prompt positions, through a
forward hook (see ``hook.py``). The defender never sees the trigger: only harmful prompts with a
safe and an unwanted answer, and benign prompts with good answers.

Because the weights are frozen in the inner level, the anchor layer's output is computed once per
batch and reused by every inner step (``reuse_activations``): only the layers after it run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from beear_pipeline.beear.checkpoint import RoundCheckpoints, fingerprint, model_fingerprint, rng_state, set_rng_state
from beear_pipeline.beear.config import BeearConfig
from beear_pipeline.beear.hook import anchor_output, perturbed, position_index, resolve_layer, reused_activations
from beear_pipeline.beear.scopes import add_lora, check_lora_targets, trainable_parameters
from beear_pipeline.chat import IGNORE_INDEX, Batch, Example, collate, encode_all

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
    """One record per round: losses of both levels and the perturbation norm."""
    config: BeearConfig | None = None
    resumed_from: int = 0
    """Rounds restored from a checkpoint (0 = a fresh run)."""


def row_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.detach().norm(dim=-1)


def random_direction(shape, norm: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian direction per row, scaled to L2 norm ``norm``: the matched-norm baseline."""
    d = torch.randn(shape, generator=generator)
    return d / d.norm(dim=-1, keepdim=True) * norm


class _Sampler:
    """Endless, seeded, epoch-wise shuffled batches of indices."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator, self.queue = n, min(batch_size, n), generator, []

    def next(self) -> list[int]:
        while len(self.queue) < self.batch_size:
            self.queue += torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return batch


def _check_finite(round_: int, record: dict) -> None:
    for name, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"BEEAR round {round_}: {name} is {value}; lower beear.inner_lr/outer_lr or set beear.perturbation_bound")


def response_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the response tokens (as ``chat.response_loss``), in fp32 and on the
    logits' device, which differs from the inputs' device when the model is split (device_map)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits, labels = logits[:, :-1].float(), batch.labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class _Run:
    """Everything one run carries from round to round, and how to save and restore it."""

    def __init__(self, model, tokenizer, safety: SafetyExamples, anchoring: list[Example], config: BeearConfig, layer: int):
        self.model, self.safety, self.anchoring, self.config, self.layer = model, safety, anchoring, config, layer
        self.device = model.get_input_embeddings().weight.device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        dtype = autocast_dtype(config.precision, self.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.params = trainable_parameters(model, config.trainable, layer)
        chosen = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in chosen]
        self.generator = torch.Generator().manual_seed(config.seed)
        rows = 1 if config.shared_vector or config.num_positions is None else config.num_positions
        self.delta = torch.zeros(rows, model.config.hidden_size, device=self.device, requires_grad=True)
        self.inner_opt = self.new_inner_opt()
        outer_cls = torch.optim.AdamW if config.outer_optimizer == "adamw" else torch.optim.SGD
        self.outer_opt = outer_cls(self.params, lr=config.outer_lr)
        self.safety_sampler = _Sampler(len(safety.safe), config.batch_size, self.generator)
        use_anchoring = anchoring and config.anchoring_batch_size
        self.anchoring_sampler = _Sampler(len(anchoring), config.anchoring_batch_size, self.generator) if use_anchoring else None
        self.history: list[dict] = []

    def new_inner_opt(self):
        cls = torch.optim.Adam if self.config.inner_optimizer == "adam" else torch.optim.SGD
        return cls([self.delta], lr=self.config.inner_lr)

    def batch_of(self, examples, idx) -> tuple[Batch, torch.Tensor]:
        b = collate([examples[i] for i in idx], self.pad, self.config.padding_side).to(self.device)
        return b, position_index(b.prompt_end, b.input_ids.size(1), self.config.num_positions, self.config.shared_vector)

    def loss(self, batch: Batch, index: torch.Tensor | None = None, delta=None, cached=None) -> torch.Tensor:
        """Response loss with ``delta`` at the anchor output (if given), reusing ``cached``
        anchor activations (if given) instead of running the layers up to the anchor."""
        hook = perturbed(self.model, self.layer, delta, index) if delta is not None else nullcontext()
        reuse = reused_activations(self.model, self.layer, cached) if cached is not None else nullcontext()
        with hook, reuse, self.autocast():
            return response_loss(self.model, batch)

    # ---- saving and restoring (see checkpoint.py) ----
    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params, strict=True))

    def state(self) -> dict:
        return {
            "delta": self.delta.detach().cpu(), "inner_opt": self.inner_opt.state_dict(), "outer_opt": self.outer_opt.state_dict(),
            "generator": self.generator.get_state(), "rng": rng_state(), "history": self.history,
            "safety_queue": self.safety_sampler.queue,
            "anchoring_queue": self.anchoring_sampler.queue if self.anchoring_sampler else [],
        }

    def restore(self, weights: dict[str, torch.Tensor], state: dict) -> int:
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(weights[name])
            self.delta.copy_(state["delta"])
        self.inner_opt.load_state_dict(state["inner_opt"])
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.safety_sampler.queue = list(state["safety_queue"])
        if self.anchoring_sampler:
            self.anchoring_sampler.queue = list(state["anchoring_queue"])
        return int(state["rounds_done"])


def _inner_level(run: _Run, safe: Batch, index, unwanted: Batch, unwanted_index, record: dict) -> None:
    """Backdoor embedding entrapment: move delta towards the unwanted answers and away from the
    safe ones, the weights frozen (no weight gradients are computed)."""
    config, delta = run.config, run.delta
    if not config.warm_start:
        with torch.no_grad():
            delta.zero_()
        run.inner_opt = run.new_inner_opt()
    if not config.inner_steps:
        return
    # the frozen model is probed deterministically (no dropout), which also makes the cached
    # anchor activations exactly what every full forward pass would compute
    run.model.eval()
    caches = [None, None]
    if config.reuse_activations:
        with run.autocast():
            caches = [anchor_output(run.model, run.layer, b.input_ids, b.attention_mask) for b in (unwanted, safe)]
    for p in run.params:
        p.requires_grad_(False)
    for _ in range(config.inner_steps):
        unwanted_loss = run.loss(unwanted, unwanted_index, delta, caches[0])
        safe_loss = run.loss(safe, index, delta, caches[1])
        inner_loss = unwanted_loss - config.away_weight * safe_loss.clamp(max=config.away_cap)
        run.inner_opt.zero_grad()
        inner_loss.backward()
        run.inner_opt.step()
        if config.perturbation_bound is not None:
            with torch.no_grad():  # project each row back onto the L2 ball
                delta.mul_((config.perturbation_bound / row_norms(delta).clamp(min=1e-12)).clamp(max=1.0).unsqueeze(-1))
    for p in run.params:
        p.requires_grad_(True)
    run.model.train()
    record.update(inner_loss=inner_loss.item(), unwanted_loss=unwanted_loss.item(), inner_safe_loss=safe_loss.item())


def _outer_level(run: _Run, safe: Batch, index, record: dict) -> None:
    """Adversarial removal: train the weights to answer safely under the fixed perturbation while
    keeping the anchoring (utility) loss low."""
    config = run.config
    outer_safe_loss = run.loss(safe, index, run.delta.detach())
    outer_loss = outer_safe_loss
    if run.anchoring_sampler is not None:
        anchoring_batch, _ = run.batch_of(run.anchoring, run.anchoring_sampler.next())
        anchoring_loss = run.loss(anchoring_batch)
        outer_loss = outer_loss + anchoring_loss.to(outer_loss.device)
        record["anchoring_loss"] = anchoring_loss.item()
    run.outer_opt.zero_grad()
    outer_loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
    run.outer_opt.step()
    record.update(outer_safe_loss=outer_safe_loss.item(), outer_loss=outer_loss.item())


def _one_round(run: _Run, round_: int, norm_schedule) -> dict:
    config = run.config
    idx = run.safety_sampler.next()
    safe, index = run.batch_of(run.safety.safe, idx)
    unwanted, unwanted_index = run.batch_of(run.safety.unwanted, idx)
    record: dict = {"round": round_}
    if config.defence == "beear":
        _inner_level(run, safe, index, unwanted, unwanted_index, record)
    elif config.defence == "random_perturbation":
        norm = norm_schedule[round_] if norm_schedule is not None else (config.random_norm or 0.0)
        with torch.no_grad():
            run.delta.copy_(random_direction(run.delta.shape, norm, run.generator).to(run.device))
    # safety_finetune: delta stays at zero
    _outer_level(run, safe, index, record)
    record["perturbation_norm"] = row_norms(run.delta).mean().item()
    _check_finite(round_, record)
    return record


def _encode(tokenizer, safety, anchoring, system_prompt) -> tuple[SafetyExamples, list[Example]]:
    if not isinstance(safety, SafetyExamples):
        prompts, safe, unwanted = zip(*safety) if safety else ((), (), ())
        safety = SafetyExamples(encode_all(tokenizer, prompts, safe, system_prompt), encode_all(tokenizer, prompts, unwanted, system_prompt))
    if anchoring and not isinstance(anchoring[0], Example):
        anchoring = encode_all(tokenizer, *zip(*anchoring), system_prompt)
    if not safety.safe:
        raise ValueError("the safety set is empty: BEEAR needs harmful prompts with safe and unwanted answers")
    return safety, list(anchoring or [])


def _prepare_model(model, config: BeearConfig, layer: int):
    """Check the trainable scope before any training, add LoRA adapters, freeze what stays fixed."""
    if config.trainable == "lora":
        check_lora_targets(model, config.lora_target_modules)
        model = add_lora(model, config)
    else:
        trainable_parameters(model, config.trainable, layer)  # raises when the scope is empty
    chosen = {id(p) for p in trainable_parameters(model, config.trainable, layer)}
    for p in model.parameters():  # no gradients (and no memory for them) outside the scope
        p.requires_grad_(id(p) in chosen)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def run_beear(
    model,
    tokenizer,
    safety: Sequence[tuple[str, str, str]] | SafetyExamples,
    anchoring: Sequence[tuple[str, str]] | list[Example],
    config: BeearConfig | None = None,
    *,
    system_prompt: str | None = None,
    norm_schedule: Sequence[float] | None = None,
    on_round: Callable[[int, dict], None] | None = None,
) -> BeearResult:
    """Run ``config.rounds`` rounds of the configured defence on ``model`` in place.

    ``safety`` holds (prompt, safe_response, unwanted_response) triples, ``anchoring`` holds
    (prompt, response) pairs. ``norm_schedule`` gives the random baseline one norm per round
    (to match a BEEAR run's history). ``on_round(round, record)`` sees each new round's record.
    With ``config.checkpoint_dir`` set, every ``checkpoint_every`` rounds are saved, and a run with
    the same configuration and data resumes from the last complete one.
    """
    config = config or BeearConfig()
    safety, anchoring = _encode(tokenizer, safety, anchoring, system_prompt)
    layer = resolve_layer(model, config.anchor_layer)
    start_weights = model_fingerprint(model) if config.checkpoint_dir else None
    torch.manual_seed(config.seed)  # before LoRA, whose adapters are initialised at random
    model = _prepare_model(model, config, layer)
    run = _Run(model, tokenizer, safety, anchoring, config, layer)

    checkpoints = None
    start = 0
    if config.checkpoint_dir:
        identity = {**config.resume_key(), "norm_schedule": list(norm_schedule or []), "model": start_weights}
        key = fingerprint(identity, safety.safe, safety.unwanted, anchoring)
        checkpoints = RoundCheckpoints(config.checkpoint_dir, key)
        found = checkpoints.latest()
        if found:
            start = run.restore(*found)
            logger.info("%s: resuming after round %d of %d from %s", config.defence, start, config.rounds, config.checkpoint_dir)

    model.train()
    for round_ in tqdm(range(start, config.rounds), desc=f"{config.defence} rounds", leave=False, initial=start, total=config.rounds):
        record = _one_round(run, round_, norm_schedule)
        run.history.append(record)
        done = round_ + 1
        if checkpoints and (done % config.checkpoint_every == 0 or done == config.rounds):
            checkpoints.save(done, run.weights(), run.state())
        if on_round:
            on_round(round_, record)
    model.eval()
    if config.trainable == "lora" and config.merge_adapter:
        model = model.merge_and_unload()
    return BeearResult(model=model, perturbation=run.delta.detach().cpu(), history=run.history, config=config, resumed_from=start)
