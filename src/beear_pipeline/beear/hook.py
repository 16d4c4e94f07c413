"""Adding a perturbation to the residual stream that leaves one decoder layer.

A forward hook on the decoder layer works for every architecture and transformers version,
unlike re-implementing a model's forward pass as the research code does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ``ModuleList`` as long as ``num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def resolve_layer(model, anchor_layer: int) -> int:
    """0-based index of the anchor layer; a negative index counts from the top (-1 = last)."""
    n = len(decoder_layers(model))
    index = anchor_layer + n if anchor_layer < 0 else anchor_layer
    if not 0 <= index < n:
        raise ValueError(
            f"beear.anchor_layer={anchor_layer} is out of range for a model with {n} decoder layers: "
            f"use 0..{n - 1} (or -{n}..-1 to count from the top)"
        )
    return index


def position_index(prompt_end: torch.Tensor, seq_len: int, num_positions: int | None, shared: bool) -> torch.Tensor:
    """Map each (row, position) to a row of the perturbation, or -1 where nothing is added.

    ``num_positions=None`` perturbs every position before ``prompt_end``; otherwise only the last
    ``num_positions`` prompt positions, the first of which takes perturbation row 0. With
    ``shared=True`` every perturbed position takes row 0 (one vector for all positions).
    Rows shorter than ``num_positions`` use the last rows of the perturbation.
    """
    pos = torch.arange(seq_len, device=prompt_end.device).unsqueeze(0)  # (1, S)
    end = prompt_end.unsqueeze(1)  # (B, 1)
    if num_positions is None:
        # all prompt positions; the padded rows' leading pads are harmless: masked in attention
        index = torch.where(pos < end, torch.zeros_like(pos), torch.full_like(pos, -1))
    else:
        offset = pos - (end - num_positions)  # 0 .. T-1 inside the window
        inside = (offset >= 0) & (pos < end)
        index = torch.where(inside, torch.zeros_like(offset) if shared else offset, torch.full_like(offset, -1))
    return index.expand(prompt_end.size(0), seq_len)


@contextmanager
def perturbed(model, layer: int, delta: torch.Tensor, index: torch.Tensor):
    """Within the block, add ``delta[index]`` to the output of decoder layer ``layer``.

    ``delta`` has shape (rows, hidden); ``index`` (batch, seq) selects a row per position,
    -1 for none. Gradients flow to ``delta``.
    """

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        add = delta[index.clamp(min=0)] * (index >= 0).unsqueeze(-1)
        hidden = hidden + add.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
