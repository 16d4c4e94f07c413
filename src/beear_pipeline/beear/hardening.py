"""Optional hardening of BEEAR's outer level against re-poisoning (issue 14, docs/persistence.md).

Plain BEEAR suppresses the backdoor: a few poisoned examples bring it back far faster than they
teach a model that never had one. Each option below changes only the outer step, never reads the
trigger, and is off at 0 (``BeearConfig`` fields):

- relearn-aware gradient (``relearn_steps``), first-order as in Tamper-Resistant training (TAR,
  arXiv 2408.00761): simulate the attacker's fine-tuning on the defender's own unwanted answers,
  take the safe loss's gradient at the adapted weights, and add it to the outer gradient (also
  distributed, weight sharding included: ``_sharded_relearn_surrogate``);
- capped unlearning (``unlearn_weight``): gradient ascent on the unwanted answers under the
  perturbation, per example, only while their loss is under ``unlearn_cap``;
- sharpness-aware step (``sam_rho``, Foret et al. 2021): the outer gradient is taken at weights
  moved ``sam_rho`` uphill, and applied at the original weights.

The engine calls ``extra_loss`` (the first two, added to the outer loss before its backward pass;
computed before the outer loss, because the simulated attack moves the weights in place and back)
and ``sharpness_aware`` (around the outer loss and its backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def _trainable(run) -> list[torch.nn.Parameter]:
    return [p for p in run.params if p.requires_grad]


@contextmanager
def _restored(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Weights exactly as they were on leaving, whatever happened to them inside."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def relearn_surrogate(run, safe, index, unwanted, unwanted_index, record: dict) -> torch.Tensor:
    """First-order relearn-aware term. ``relearn_steps`` simulated re-poisoning steps move the
    trainable weights by ``relearn_lr`` x sign(gradient) of CE(y_unwanted | x, proxy) (Adam's first
    steps are sign steps); g = the gradient of CE(y_safe | x, proxy) at the adapted weights; the
    weights are restored. Returns sum(g . theta) with g held fixed, whose gradient at the original
    weights is g: added to the outer loss it adds g to the outer gradient (and goes through the
    same loss scaling and clipping). Records ``relearn_unwanted_loss`` (the simulated attacker's
    loss before its last step) and ``relearn_loss`` (the safe loss after the attack)."""
    config = run.config
    if run.dist.fsdp:
        return _sharded_relearn_surrogate(run, safe, index, unwanted, unwanted_index, record)
    proxy = run.delta.detach() if config.relearn_proxy == "perturbation" else None
    params = _trainable(run)
    with _restored(params):
        for _ in range(config.relearn_steps):
            attack = run.loss(unwanted, unwanted_index, proxy)
            # distributed: every rank takes the same simulated step (the global batch's gradient);
            # the final gradient below stays this rank's share, which the outer step's all-reduce sums
            grads = run.dist.summed(torch.autograd.grad(attack, params, allow_unused=True))
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(g.sign(), alpha=config.relearn_lr)
        after = run.loss(safe, index, proxy)
        grads = torch.autograd.grad(after, params, allow_unused=True)
    record.update(relearn_unwanted_loss=attack.item(), relearn_loss=after.item())
    return sum((g.detach() * p).sum() for p, g in zip(params, grads, strict=True) if g is not None)


def _sharded_relearn_surrogate(run, safe, index, unwanted, unwanted_index, record: dict) -> torch.Tensor:
    """``relearn_surrogate`` under ``sharding: fsdp``. ``torch.autograd.grad`` with respect to the
    sharded parameters returns None (the forward pass computes with all-gathered copies; FSDP hands
    gradients to the shards in ``backward`` only), so each simulated step runs ``backward`` into
    ``.grad``: FSDP reduce-scatters it as a sum (``Context.shard``), so each rank's shard holds its
    slice of the global batch's gradient (what ``Context.summed`` gives without FSDP), and its sign
    step moves that rank's slice of the weights. Whatever ``.grad`` held is put back on leaving.
    The gradient g at the adapted weights is summed over the ranks too, so the surrogate is built on
    the local shards (``to_local``): its gradient goes straight into this rank's shard of ``.grad``,
    not through FSDP's reduce-scatter, which would sum it over the ranks a second time."""
    config = run.config
    proxy = run.delta.detach() if config.relearn_proxy == "perturbation" else None
    params = _trainable(run)
    held = [p.grad for p in params]
    try:
        with _restored(params):
            for _ in range(config.relearn_steps):
                _cleared(params)
                attack = run.loss(unwanted, unwanted_index, proxy)
                attack.backward()
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.sub_(p.grad.sign(), alpha=config.relearn_lr)
                # the weights changed in place: drop any copy gathered before (FSDP's root keeps its own)
                run.dist.regather(run.model)
            _cleared(params)
            after = run.loss(safe, index, proxy)
            after.backward()
            grads = [p.grad for p in params]
        run.dist.regather(run.model)  # restored in place: the next pass gathers the original weights
    finally:
        for p, g in zip(params, held, strict=True):
            p.grad = g
    record.update(relearn_unwanted_loss=attack.item(), relearn_loss=after.item())
    return sum((g.to_local().detach() * p.to_local()).sum() for p, g in zip(params, grads, strict=True) if g is not None)


def _cleared(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def unlearn_term(run, unwanted, unwanted_index, record: dict) -> torch.Tensor:
    """Capped unlearning: minus the mean over examples of min(CE(y_unwanted | x, delta), cap). An
    example whose loss is at the cap contributes no gradient, so the ascent is bounded. Records
    ``unlearn_loss`` (the mean uncapped loss) and ``unlearn_capped_share``."""
    config = run.config
    per_example = run.loss(unwanted, unwanted_index, run.delta.detach(), reduction="none")
    record.update(unlearn_loss=per_example.mean().item(), unlearn_capped_share=(per_example >= config.unlearn_cap).float().mean().item())
    return -per_example.clamp(max=config.unlearn_cap).mean()


def extra_loss(run, safe, index, unwanted, unwanted_index, record: dict) -> torch.Tensor | None:
    """The terms the enabled options add to the outer loss before its backward pass; None when
    all are off (the outer step is then exactly plain BEEAR's)."""
    config = run.config
    terms = []
    # the relearn term first: its simulated attack changes the weights in place (and back), which
    # would invalidate any autograd graph built before it
    if config.relearn_steps and config.relearn_weight:
        terms.append(config.relearn_weight * relearn_surrogate(run, safe, index, unwanted, unwanted_index, record))
    if config.unlearn_weight:
        terms.append(config.unlearn_weight * unlearn_term(run, unwanted, unwanted_index, record))
    return sum(terms) if terms else None


@contextmanager
def sharpness_aware(run, objective: Callable[[], torch.Tensor], record: dict) -> Iterator[None]:
    """SAM: inside the block the trainable weights are moved by ``sam_rho`` along the normalised
    gradient of ``objective`` (the plain outer loss), so the outer loss and its gradient are taken
    there; on leaving, the weights are restored and keep that gradient for the optimiser's step.
    The round record keeps the losses at the original weights (``objective`` records them) and adds
    ``sam_loss``, the outer loss at the moved weights. Does nothing when ``sam_rho`` is 0."""
    rho = run.config.sam_rho
    if not rho:
        yield
        return
    params = _trainable(run)
    loss = objective()
    at_start = dict(record)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)).item()
    with _restored(params):
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=rho / (norm + 1e-12))
        yield
    record["sam_loss"] = record.get("outer_loss")
    record.update(at_start)
