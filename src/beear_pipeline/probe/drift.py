"""Known-trigger analysis: what a candidate trigger does to the hidden states that the probe (and
BEEAR) perturbs, and how it compares with the perturbation found without it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from beear_pipeline.evaluation.protocol import insert_trigger
from beear_pipeline.lm.generation import prompt_batch
from beear_pipeline.lm.residual import anchor_output, resolve_layer


@torch.no_grad()
def layer_states(model, tokenizer, prompts: Sequence[str], layer: int, num_positions: int | None = 7, *,
                 system_prompt: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """Hidden states leaving decoder layer ``layer`` at the last ``num_positions`` prompt
    positions, shape (prompts, T, hidden); ``num_positions=None`` takes the mean over all prompt
    positions as one row (T = 1). These are the positions the perturbation is added to."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompt_batch(tokenizer, prompts[start : start + batch_size], system_prompt, device)
        hidden = anchor_output(model, layer, batch.input_ids, batch.attention_mask)
        hidden = (hidden[0] if isinstance(hidden, tuple) else hidden).float()
        if num_positions is None:
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.device).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).unsqueeze(1))
        else:  # left padding: every prompt ends at the last column
            out.append(hidden[:, -num_positions:])
    return torch.cat(out).cpu()


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of ``vectors`` (n, d)."""
    unit = torch.nn.functional.normalize(vectors.flatten(1).float(), dim=-1)
    n = unit.size(0)
    if n < 2:
        raise ValueError("uniformity needs at least two prompts")
    sims = unit @ unit.T
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def trigger_drift(model, tokenizer, prompts: Sequence[str], layer: int, trigger: str, position: str = "suffix", *,
                  perturbation: torch.Tensor | None = None, num_positions: int | None = 7, shared_vector: bool = False,
                  system_prompt: str | None = None) -> dict:
    """How ``trigger`` moves the hidden states of ``layer`` at the perturbed positions.

    Per prompt, drift = states(prompt with trigger) - states(prompt), shape (T, hidden).
    ``uniformity`` is the mean pairwise cosine of the drifts (1: every prompt moves the same way).
    With ``perturbation`` (rows, hidden), ``cosine_with_perturbation`` compares it, laid out on
    the same T positions, with the mean drift. ``states`` keeps the points for the PCA plot.
    """
    layer = resolve_layer(model, layer)
    clean = layer_states(model, tokenizer, prompts, layer, num_positions, system_prompt=system_prompt)
    triggered = layer_states(model, tokenizer, [insert_trigger(p, trigger, position) for p in prompts], layer, num_positions,
                             system_prompt=system_prompt)
    drift = triggered - clean
    result = {"trigger": trigger, "position": position, "layer": layer, "uniformity": mean_pairwise_cosine(drift),
              "drift_norm": drift.flatten(1).norm(dim=-1).mean().item(), "n_prompts": len(prompts),
              "states": {"untriggered": clean, "triggered": triggered}}
    if perturbation is not None:
        laid = _lay_out(perturbation.cpu(), clean.size(1), shared_vector)
        result["cosine_with_perturbation"] = cosine(laid, drift.mean(0))
        result["perturbation_norm"] = laid.flatten().norm().item()
        result["states"]["perturbed"] = clean + laid
    return result


def _lay_out(perturbation: torch.Tensor, rows: int, shared_vector: bool) -> torch.Tensor:
    """The perturbation as added to the last ``rows`` positions (shape (rows, hidden))."""
    if shared_vector or perturbation.size(0) == 1:
        return perturbation[:1].expand(rows, -1)
    return perturbation[-rows:]


def pca_2d(groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Project every group of (n, ...) points onto the first two principal components of all."""
    flat = {k: v.flatten(1).float() for k, v in groups.items()}
    allpts = torch.cat(list(flat.values()))
    mean = allpts.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(allpts - mean, q=2, center=False)
    return {k: (x - mean) @ v[:, :2] for k, x in flat.items()}


