"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import torch

from beear_pipeline.beear import decoder_layers
from beear_pipeline.chat import collate, encode


def two_example_batch(tokenizer, side: str = "right"):
    """Two prompt/response pairs of different lengths, padded on ``side``."""
    examples = [encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem"), encode(tokenizer, "Explain how", "Sure")]
    return collate(examples, tokenizer.pad_token_id, padding_side=side)


def layer_inputs(model, batch):
    """The hidden states entering each decoder layer, captured by pre-hooks: the input of layer
    i + 1 is exactly the residual stream that leaves layer i, perturbation included."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return seen


def strip_chat_template(path):
    """Remove the chat template from a saved checkpoint's tokenizer, wherever it was written."""
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).exists():
            (path / name).unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def triples(safety_set) -> list[tuple[str, str, str]]:
    """A safety-set frame as (prompt, safe_response, unwanted_response) triples."""
    return list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
