"""The residual stream that leaves one decoder layer: find the layers, perturb a layer's output,
read it, and reuse it.

Forward hooks on the decoder layer work for every architecture and transformers version, unlike
re-implementing a model's forward pass as the research code does, and they leave accelerate's
dispatch hooks (instance ``forward`` attributes under ``device_map``) alone.
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


LayerSpec = int | float
"""A decoder layer: an index (0-based; negative counts from the top, -1 = last), or a fraction of
the depth written with a decimal point (0.0 = first layer, 0.5 = middle, 1.0 = last), so that one
setting spreads the same way over 4 layers and over 80."""


def layer_index(spec: LayerSpec, n: int, field: str = "beear.anchor_layer") -> int:
    """0-based index of the layer ``spec`` names in a stack of ``n`` decoder layers. A fraction f
    maps to round(f x (n - 1)): 0.3 is layer 1 of 4 and layer 9 of 32."""
    if spec is None:
        raise ValueError(f"{field}=None: null means the scenario's anchor layer, which the pipeline resolves before this "
                         "point (scenarios.scenario_anchor_layer); here give a layer index (0-based, negative from the top) "
                         "or a fraction of the depth such as 0.3")
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise ValueError(f"{field}={spec!r}: use a layer index (0-based, negative from the top) or a fraction of the depth "
                         "such as 0.3; `auto` is resolved from the probe's report by the defend pipeline")
    if isinstance(spec, float):
        if not 0.0 <= spec <= 1.0:
            raise ValueError(f"{field}={spec}: a fraction of the depth must lie in [0.0, 1.0] (write layer indices without a "
                             "decimal point)")
        return round(spec * (n - 1))
    index = spec + n if spec < 0 else spec
    if not 0 <= index < n:
        raise ValueError(f"{field}={spec} is out of range for a model with {n} decoder layers: use 0..{n - 1} "
                         f"(or -{n}..-1 to count from the top, or a fraction of the depth such as 0.3)")
    return index


def resolve_layer(model, anchor_layer: LayerSpec, field: str = "beear.anchor_layer") -> int:
    """0-based index of the anchor layer in ``model`` (see ``layer_index``)."""
    return layer_index(anchor_layer, len(decoder_layers(model)), field)


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
def perturbed(model, layer: int, delta: torch.Tensor, index: torch.Tensor, *, first_pass_only: bool = False):
    """Within the block, add ``delta[index]`` to the output of decoder layer ``layer``.

    ``delta`` has shape (rows, hidden); ``index`` (batch, seq) selects a row per position,
    -1 for none. Gradients flow to ``delta``. With ``first_pass_only`` only the first forward
    pass is perturbed: in generation that is the prompt (prefill); the answer tokens that follow
    are decoded unperturbed.
    """
    passes = []

    def hook(module, args, output):
        if first_pass_only and passes:
            return output
        passes.append(1)
        hidden = output[0] if isinstance(output, tuple) else output
        # with a device_map the anchor layer may live on another device than the inputs
        idx = index.to(hidden.device)
        add = delta.to(hidden.device)[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1)
        hidden = hidden + add.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by the capture hook once the anchor layer has run: the rest of the model is not needed."""

    def __init__(self, output):
        self.output = output


def _detach(output):
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output.detach()


@torch.no_grad()
def anchor_output(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The raw (unperturbed, detached) output of decoder layer ``layer``, computing only the
    layers up to it: a hook stops the forward pass as soon as the anchor layer has returned."""

    def stop(module, args, output):
        raise _Stop(_detach(output))

    handle = decoder_layers(model)[layer].register_forward_hook(stop)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop as captured:
        root = next((m for m in model.modules() if hasattr(m, "reset_iter_state")), None)  # the outermost FSDP module
        if root is not None:
            # an FSDP2 model (beear.distributed.Context.shard) left mid-forward stays "in forward":
            # its root would keep, and never drop, the weights it gathered for this pass
            root.reset_iter_state()
        return captured.output
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} did not run in the forward pass of {type(model).__name__}")


@contextmanager
def reused_activations(model, layer: int, cached):
    """Within the block, decoder layers 0..``layer`` do not compute: each returns ``cached``, the
    anchor layer's output computed once for this batch (``anchor_output``).

    The weights of those layers are frozen in the inner loop, so their output cannot change
    between inner steps; only the embeddings (cheap), the layers after the anchor and the head
    run. Hooks on the anchor layer (``perturbed``) still see and change the cached output, so
    gradients reach the perturbation exactly as in the full forward pass. Layers before the
    anchor return the same cached tensor: their output only feeds the next skipped layer.
    """
    layers = decoder_layers(model)
    patched = layers[: layer + 1]
    # under a device_map, accelerate's dispatch hook is itself an instance ``forward``: keep it to
    # put back, rather than deleting whatever instance attribute is there afterwards
    saved = [module.__dict__.get("forward") for module in patched]
    for module in patched:
        module.forward = lambda *args, **kwargs: cached  # instance attribute shadows the class method
    try:
        yield
    finally:
        for module, forward in zip(patched, saved, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
