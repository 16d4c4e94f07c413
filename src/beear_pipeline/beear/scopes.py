"""Which weights the outer step trains (``BeearConfig.trainable``), for any decoder.

Parameters are placed by registration order relative to the decoder layer list: what is
registered before the first layer (token and position embeddings, e.g. GPT-2's ``wpe``) sits
before the anchor; what comes after the last layer (final norm, head) sits after it. A weight
tied between the embedding and the head is registered first as the embedding, so it counts as
"before": training it would change every hidden state, including those before the anchor.
"""

from __future__ import annotations

import logging

import torch

from beear_pipeline.lm.residual import decoder_layers

logger = logging.getLogger(__name__)


def parameter_sections(model) -> dict[str, list[torch.nn.Parameter]]:
    """Split the model's (deduplicated) parameters into ``before``, ``layer.<i>`` and ``after``."""
    layers = decoder_layers(model)
    owner = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    sections: dict[str, list[torch.nn.Parameter]] = {"before": [], "after": []}
    seen_layer = False
    for p in model.parameters():  # registration order; a tied weight appears once, first place
        if id(p) in owner:
            seen_layer = True
            sections.setdefault(f"layer.{owner[id(p)]}", []).append(p)
        else:
            sections["after" if seen_layer else "before"].append(p)
    return sections


def trainable_parameters(model, scope: str, layer: int) -> list[torch.nn.Parameter]:
    """The weights the outer step trains for ``scope`` (see ``BeearConfig.trainable``)."""
    if scope == "lora":  # the adapters peft added, everything else is frozen by peft
        chosen = [p for n, p in model.named_parameters() if "lora_" in n]
    elif scope == "all":
        chosen = list(model.parameters())
    else:
        sections = parameter_sections(model)
        n = len(decoder_layers(model))
        picked = range(layer + 1) if scope == "up_to_anchor" else range(layer + 1, n)
        chosen = [p for i in picked for p in sections.get(f"layer.{i}", [])]
        chosen += sections["before"] if scope == "up_to_anchor" else sections["after"]
    if not chosen:
        raise ValueError(
            f"beear.trainable={scope!r} at anchor layer {layer} matches no parameter of {type(model).__name__}; "
            "choose another scope (all, up_to_anchor, after_anchor, lora) or another beear.anchor_layer"
        )
    return chosen


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def check_lora_targets(model, targets) -> None:
    """Fail before any training when a LoRA target module is not in this architecture."""
    if isinstance(targets, str):
        return  # "all-linear" or a regular expression: peft resolves it
    names = _module_names(model)
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(
            f"beear.lora_target_modules: {missing} not found in {type(model).__name__}; "
            f"its linear modules are {linear} (or use 'all-linear')"
        )


def add_lora(model, config):
    """Wrap ``model`` with LoRA adapters from ``config`` (peft): only the adapters train.

    A model that already carries a LoRA adapter (a suspect given as base + ``model.adapter_path``)
    keeps it: that adapter's weights are what trains, no second adapter is stacked on it, and the
    defended model has the input adapter's shape (``config.lora_rank``, ``lora_alpha``,
    ``lora_dropout`` and ``lora_target_modules`` apply only to a new adapter)."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "peft_config"):
        adapter = model.peft_config[model.active_adapter]
        targets = getattr(adapter, "target_modules", None)
        logger.info("beear.trainable: lora trains the suspect's own adapter (rank %s on %s); beear.lora_* set a new adapter "
                    "only", getattr(adapter, "r", "?"), targets if isinstance(targets, str) else sorted(targets or []))
        return model
    check_lora_targets(model, config.lora_target_modules)
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
