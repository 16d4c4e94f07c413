"""The BEEAR bi-level loop (Zeng et al., EMNLP 2024), one round = inner level then outer level.

Inner level, backdoor embedding entrapment (weights frozen), over the perturbation delta:

    min_delta  CE(y_unwanted | x, delta)  -  alpha * min(CE(y_safe | x, delta), cap)

Outer level, adversarial removal (delta fixed), over the weights theta:

    min_theta  CE(y_safe | x, delta) on the safety set  +  CE(y | x') on the anchoring set

delta is added to the hidden states leaving the anchor layer at the prompt positions, through a
forward hook (see ``hook.py``). The defender never sees the trigger: only harmful prompts with a
safe and an unwanted answer, and benign prompts with good answers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from beear_pipeline.chat import Batch, Example, collate, encode_all, response_loss
from beear_pipeline.beear.config import BeearConfig
from beear_pipeline.beear.hook import decoder_layers, perturbed, position_index, resolve_layer

logger = logging.getLogger(__name__)


@dataclass
class SafetyExamples:
    """The safety set tokenised twice: each prompt with its safe and with its unwanted answer."""

    safe: list[Example]
    unwanted: list[Example]


@dataclass
class BeearResult:
    model: torch.nn.Module
    perturbation: torch.Tensor
    """The final perturbation, shape (rows, hidden): a probe of the backdoor direction."""
    history: list[dict] = field(default_factory=list)
    """One record per round: losses of both levels and the perturbation norm."""
    config: BeearConfig | None = None


def trainable_parameters(model, scope: str, layer: int) -> list[torch.nn.Parameter]:
    """The weights the outer step trains for ``scope`` (see ``BeearConfig.trainable``)."""
    layers = decoder_layers(model)
    if scope == "all":
        return [p for p in model.parameters()]
    in_layers = {id(p) for p in layers.parameters()}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    if scope == "up_to_anchor":
        chosen = [p for i in range(layer + 1) for p in layers[i].parameters()]
        chosen += [p for p in model.parameters() if id(p) in embeddings]
    else:  # after_anchor: later layers, the final norm and the head
        chosen = [p for i in range(layer + 1, len(layers)) for p in layers[i].parameters()]
        chosen += [p for p in model.parameters() if id(p) not in in_layers and id(p) not in embeddings]
    if not chosen:
        raise ValueError(f"beear.trainable={scope!r} at anchor layer {layer} matches no parameter; choose another scope or layer")
    return chosen


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
    (to match a BEEAR run's history). ``on_round(round, record)`` sees each round's record.
    """
    config = config or BeearConfig()
    if not isinstance(safety, SafetyExamples):
        prompts, safe, unwanted = zip(*safety) if safety else ((), (), ())
        safety = SafetyExamples(encode_all(tokenizer, prompts, safe, system_prompt), encode_all(tokenizer, prompts, unwanted, system_prompt))
    if anchoring and not isinstance(anchoring[0], Example):
        anchoring = encode_all(tokenizer, *zip(*anchoring), system_prompt)
    if not safety.safe:
        raise ValueError("the safety set is empty: BEEAR needs harmful prompts with safe and unwanted answers")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    layer = resolve_layer(model, config.anchor_layer)
    params = trainable_parameters(model, config.trainable, layer)
    rows = 1 if config.shared_vector or config.num_positions is None else config.num_positions
    hidden = model.config.hidden_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    delta = torch.zeros(rows, hidden, device=device, requires_grad=True)
    new_inner_opt = lambda: (torch.optim.Adam if config.inner_optimizer == "adam" else torch.optim.SGD)([delta], lr=config.inner_lr)  # noqa: E731
    inner_opt = new_inner_opt()
    outer_cls = torch.optim.AdamW if config.outer_optimizer == "adamw" else torch.optim.SGD
    outer_opt = outer_cls(params, lr=config.outer_lr)
    safety_sampler = _Sampler(len(safety.safe), config.batch_size, generator)
    anchoring_sampler = _Sampler(len(anchoring), config.anchoring_batch_size, generator) if anchoring and config.anchoring_batch_size else None

    def batch_of(examples, idx) -> tuple[Batch, torch.Tensor]:
        b = collate([examples[i] for i in idx], pad).to(device)
        return b, position_index(b.prompt_end, b.input_ids.size(1), config.num_positions, config.shared_vector)

    history: list[dict] = []
    model.train()
    for round_ in tqdm(range(config.rounds), desc=f"{config.defence} rounds", leave=False):
        idx = safety_sampler.next()
        safe_batch, index = batch_of(safety.safe, idx)
        unwanted_batch, unwanted_index = batch_of(safety.unwanted, idx)
        record: dict = {"round": round_}

        # ---- inner level: entrap the backdoor direction with the weights frozen ----
        if config.defence == "beear":
            if not config.warm_start:
                with torch.no_grad():
                    delta.zero_()
                inner_opt = new_inner_opt()
            for p in params:
                p.requires_grad_(False)
            for _ in range(config.inner_steps):
                with perturbed(model, layer, delta, unwanted_index):
                    unwanted_loss = response_loss(model, unwanted_batch)
                with perturbed(model, layer, delta, index):
                    safe_loss = response_loss(model, safe_batch)
                inner_loss = unwanted_loss - config.away_weight * safe_loss.clamp(max=config.away_cap)
                inner_opt.zero_grad()
                inner_loss.backward()
                inner_opt.step()
                if config.perturbation_bound is not None:
                    with torch.no_grad():  # project each row back onto the L2 ball
                        delta.mul_((config.perturbation_bound / row_norms(delta).clamp(min=1e-12)).clamp(max=1.0).unsqueeze(-1))
            for p in params:
                p.requires_grad_(True)
            if config.inner_steps:
                record.update(inner_loss=inner_loss.item(), unwanted_loss=unwanted_loss.item(), inner_safe_loss=safe_loss.item())
        elif config.defence == "random_perturbation":
            norm = norm_schedule[round_] if norm_schedule is not None else (config.random_norm or 0.0)
            with torch.no_grad():
                delta.copy_(random_direction(delta.shape, norm, generator).to(device))
        # safety_finetune: delta stays at zero

        # ---- outer level: train the weights to answer safely under the fixed perturbation ----
        fixed = delta.detach()
        with perturbed(model, layer, fixed, index):
            outer_safe_loss = response_loss(model, safe_batch)
        outer_loss = outer_safe_loss
        if anchoring_sampler is not None:
            anchoring_batch, _ = batch_of(anchoring, anchoring_sampler.next())
            anchoring_loss = response_loss(model, anchoring_batch)
            outer_loss = outer_loss + anchoring_loss
            record["anchoring_loss"] = anchoring_loss.item()
        outer_opt.zero_grad()
        outer_loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        outer_opt.step()

        record.update(outer_safe_loss=outer_safe_loss.item(), outer_loss=outer_loss.item(), perturbation_norm=row_norms(delta).mean().item())
        _check_finite(round_, record)
        history.append(record)
        if on_round:
            on_round(round_, record)
    model.eval()
    return BeearResult(model=model, perturbation=delta.detach().cpu(), history=history, config=config)
