"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import torch

from beear_pipeline.lm.chat import collate, encode
from beear_pipeline.lm.residual import decoder_layers


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


CONF = __import__("pathlib").Path(__file__).parents[1] / "conf"


def raw_params(**overrides: dict) -> dict:
    """conf/base parameters as Kedro's OmegaConfigLoader reads them, with ``overrides`` merged
    into each top-level block (``raw_params(beear={"max_rounds": 2})``)."""
    from kedro.config import OmegaConfigLoader

    params = OmegaConfigLoader(conf_source=str(CONF), base_env="base", default_run_env="base")["parameters"]
    for key, values in overrides.items():
        params[key] = _merge(params.get(key, {}), values)
    return params


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def typed_params(params: dict) -> dict:
    """``params`` converted exactly as ``kedro run`` converts them: every block that a node of the
    registered pipelines annotates with a dataclass becomes that dataclass."""
    from kedro.validation.parameter_validator import ParameterValidator

    from beear_pipeline.pipeline_registry import register_pipelines

    return ParameterValidator(register_pipelines()).validate_raw_params(params)


def params(**overrides: dict) -> dict:
    """conf/base parameters with ``overrides``, typed as Kedro types them."""
    return typed_params(raw_params(**overrides))


def project_copy(dest):
    """A copy of the project's configuration and raw data in ``dest``, so ``kedro run`` there
    does not touch the checkout (the package itself is installed)."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "pyproject.toml", dest)
    shutil.copytree(root / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    shutil.copytree(root / "data" / "01_raw", dest / "data" / "01_raw")
    (dest / "src").mkdir()  # Kedro wants a source folder
    return dest
