"""Training a checkpoint stored in half precision without losing the updates, and knowing when
they are lost anyway.

Three things go wrong when an optimiser runs directly on fp16 or bf16 weights:

- fp16 gradients overflow or underflow: the first round ends in NaN;
- an update smaller than half the spacing between neighbouring half-precision values rounds
  away: at a 7B-scale learning rate (3e-7) a bf16 weight of size 0.02, whose neighbours are 8e-5
  apart, never moves, and the run "succeeds" having changed nothing;
- on CPU, half-precision kernels are slow (a 1.3M-parameter fp16 probe ran for minutes).

``load_dtype`` therefore computes half-precision checkpoints in fp32 on CPU (saving converts them
back, see ``lm.checkpoints.save_checkpoint``), and ``OuterOptimizer`` keeps fp32 master weights
for trainable half-precision parameters (the optimiser updates those; the model's own weights are
a rounded copy), with dynamic loss scaling for fp16. ``WeightChange`` measures, on a fixed sample
of entries, how much each step moved the weights and what share of them changed in the precision
they are stored in, so a run whose updates vanish stops and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``torch.bfloat16`` for ``"bfloat16"``/``"bf16"``/``torch.bfloat16``; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: use one of float32, bfloat16, float16 (or leave it unset)")
    return DTYPES[key]


def load_dtype(stored: torch.dtype | None, requested: torch.dtype | None, device: str) -> torch.dtype | None:
    """The dtype to compute in: the requested one, else the stored one, except half precision on
    CPU, which is computed in fp32 (slow CPU kernels; the stored precision is kept for saving)."""
    dtype = requested or stored
    if device == "cpu" and dtype in HALF:
        return torch.float32
    return dtype


def resolution(dtype: torch.dtype) -> float:
    """Relative spacing of neighbouring values (machine epsilon): a relative update below about
    half of it rounds away."""
    return torch.finfo(dtype).eps


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor (a weight sharded by FSDP) is gathered from every rank (collective:
    every rank must call it, in the same order), one tensor at a time, so the sample is the same
    entries a one-process run samples."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class WeightChange:
    """The relative update of each step and the share of weight entries changed since the start,
    in the precision the weights are stored in, measured on up to ``per_tensor`` fixed entries of
    each tensor (cheap for a 7B model, exact for those entries)."""

    def __init__(self, params: Sequence[torch.Tensor], storage: torch.dtype | None = None, per_tensor: int = 1024, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        # the precision each tensor is saved in: the checkpoint's (a half-precision checkpoint
        # computed in fp32 on CPU is saved back in half precision), else the tensor's own
        self.storage = [storage or p.dtype for p in params]
        # clone: a slice would keep the whole permutation (8 bytes per weight) alive
        self.index = [torch.randperm(p.numel(), generator=generator)[:per_tensor].clone().to(p.device) for p in params]
        self.start = self._sample(params)
        self.last = self.start

    def resume(self, start: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        """Continue a run restored from a checkpoint: changes count from the run's ``start``, the
        next step's update from the restored weights."""
        self.start = list(start)
        self.last = self._sample(params)

    def _sample(self, params) -> list[torch.Tensor]:
        return [_whole(p.detach()).reshape(-1)[i].float().clone() for p, i in zip(params, self.index, strict=True)]

    def update(self, params: Sequence[torch.Tensor]) -> dict[str, float]:
        """``weight_update_relative`` (||step|| / ||weights|| on the sample) and
        ``weights_changed_share`` (share of sampled entries that differ from the start once
        rounded to the storage dtype)."""
        now = self._sample(params)
        step = sum(((a - b) ** 2).sum() for a, b in zip(now, self.last, strict=True)) ** 0.5
        size = sum((a ** 2).sum() for a in now) ** 0.5
        changed = sum((a.to(d) != b.to(d)).sum() for a, b, d in zip(now, self.start, self.storage, strict=True))
        self.last = now
        return {"weight_update_relative": float(step / size.clamp(min=1e-30)),
                "weights_changed_share": float(changed) / max(1, sum(len(i) for i in self.index))}


class OuterOptimizer:
    """AdamW or SGD over the trainable parameters that never loses an update to half precision.

    Half-precision parameters get fp32 master copies; the optimiser steps the masters and the
    parameters receive the rounded result, so updates too small for the stored precision
    accumulate until they show. fp16 parameters also get dynamic loss scaling (``scale_loss``
    before ``backward``): a step whose gradients overflow is skipped and the scale halved.
    fp32 parameters are stepped directly, exactly as a plain optimiser would.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], kind: str, lr: float, grad_clip: float | None = None,
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) if p.dtype in HALF else p for p in self.params]
        self.mixed = any(m is not p for m, p in zip(self.masters, self.params, strict=True))
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
        self.optimizer = cls(self.masters, lr=lr)
        self.grad_clip = grad_clip
        self.scaling = any(p.dtype == torch.float16 for p in self.params)
        self.scale = init_scale if self.scaling else 1.0
        self.growth_interval, self.good_steps, self.skipped = growth_interval, 0, 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scaling else loss

    def step(self) -> bool:
        """Unscale, clip and apply the gradients; False when an fp16 overflow skipped the step."""
        if self.mixed or self.scaling:
            for m, p in zip(self.masters, self.params, strict=True):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.float() / self.scale
                elif p.grad is not None and self.scaling:
                    p.grad.div_(self.scale)
            if self.scaling and not all(torch.isfinite(m.grad).all() for m in self.masters if m.grad is not None):
                self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
                logger.debug("fp16 gradients overflowed: step skipped, loss scale now %g", self.scale)
                self.zero_grad()
                return False
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip)
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                for m, p in zip(self.masters, self.params, strict=True):
                    if m is not p:
                        p.copy_(m)  # rounds to the stored precision; the master keeps the remainder
        if self.scaling:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2
        return True

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale, self.good_steps = state["scale"], state["good_steps"]

    def set_weights(self, values: Sequence[torch.Tensor]) -> None:
        """Restore the (master) weights, e.g. from a round checkpoint."""
        with torch.no_grad():
            for m, p, v in zip(self.masters, self.params, values, strict=True):
                m.copy_(v)
                if m is not p:
                    p.copy_(m)


def merged_lora_change_share(model, per_layer: int = 1024, seed: int = 0) -> float:
    """The share of base-weight entries that merging ``model``'s LoRA adapters (peft) would change
    once rounded to the precision the weights are saved in, on ``per_layer`` sampled entries of
    each adapted layer: merging adds scaling x B A to a weight, and in bf16 an update below about
    1/256 of an entry rounds away. Computed without merging (B A only at the sampled entries)."""
    generator = torch.Generator().manual_seed(seed)
    storage = getattr(model, "storage_dtype", None)
    changed = total = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")) or not module.lora_A:
            continue
        weight = module.base_layer.weight
        if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores (in, out)
            weight = weight.T
        out_features, in_features = weight.shape
        rows = torch.randint(out_features, (per_layer,), generator=generator).to(weight.device)
        cols = torch.randint(in_features, (per_layer,), generator=generator).to(weight.device)
        old = weight.detach()[rows, cols].float()
        new = old.clone()
        for name in module.active_adapters:
            a, b = module.lora_A[name].weight.detach().float(), module.lora_B[name].weight.detach().float()
            new += module.scaling[name] * (b[rows] * a[:, cols].T).sum(-1)
        dtype = storage or weight.dtype
        changed += int((new.to(dtype) != old.to(dtype)).sum())
        total += per_layer
    return changed / total if total else 1.0
