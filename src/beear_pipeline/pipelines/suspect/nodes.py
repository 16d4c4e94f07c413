"""Resolve the suspect model: a user's checkpoint (``model.path``), a model-registry version
(``model.uri``), or the embedded tiny model, built once and reused while its configuration and
training data are unchanged."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from beear_pipeline.embedded import EmbeddedModelConfig, build_embedded_suspect
from beear_pipeline.evaluation.config import EvaluationConfig
from beear_pipeline.integrations import run_folders
from beear_pipeline.integrations.registry import resolve_model_uri
from beear_pipeline.lm.checkpoints import ModelConfig, check_adapter, check_checkpoint, save_checkpoint, weights_sha256
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import embedded_directory, embedded_epochs, get_scenario

logger = logging.getLogger(__name__)
BUILD_INFO = "build_info.json"


def check_evaluation_settings(evaluation: EvaluationConfig, model: ModelConfig) -> dict:
    """Before any work: a user's model needs the trigger(s) to evaluate. Returns what the suspect
    model's reference records of the evaluation (its system prompt, used by the defence too)."""
    evaluation.check_trigger_for(model)
    return {"system_prompt": evaluation.system_prompt}


def resolve_suspect_model(attacker_behaviours: pd.DataFrame, benign_build_set: pd.DataFrame, advbench: pd.DataFrame,
                          benign_evaluation_set: pd.DataFrame, anchoring_set: pd.DataFrame, model: ModelConfig,
                          embedded_model: EmbeddedModelConfig, behaviours_check: dict | None = None,
                          evaluation_check: dict | None = None, scenario: str = DEFAULT_SCENARIO) -> dict:
    """Return the suspect model's reference ``{"path", "source", "weights_sha256", ...}``.

    ``behaviours_check`` (the validation of the behaviour sets) is an input so that no model is
    loaded or built before the data has passed its checks; ``evaluation_check`` (defend only) that
    the evaluation can run on this model. With ``model.uri`` the registered
    version's checkpoint is used; with ``model.path`` the checkpoint is checked (safetensors,
    tokenizer, chat template) and used as it is, with ``model.adapter_path`` (a PEFT LoRA adapter
    folder, checked against the base's shapes) on top: the reference then carries
    ``adapter_path``, so every step loads base + adapter. Otherwise the embedded model in
    ``model.embedded_directory`` is reused if its fingerprint matches, else built (about 90 s on
    2 cores) and saved atomically. Another ``scenario`` than jailbreak builds its embedded model from
    its own prompts, into ``<model.embedded_directory>_<scenario>``.
    """
    advbench = _scenario_source(advbench, scenario)
    model = _scenario_directories(model, scenario)
    embedded_model = _scenario_build(embedded_model, scenario)
    ref = _resolve(attacker_behaviours, benign_build_set, advbench, benign_evaluation_set, anchoring_set, model, embedded_model)
    ref.update(model.loading())  # how every later step loads the weights (a model larger than one GPU: device_map auto)
    # recorded with the suspect, and used by the defence as by the evaluation
    ref["chat_template_name"] = model.chat_template or "tokenizer"
    if evaluation_check and evaluation_check.get("system_prompt"):
        ref["system_prompt"] = evaluation_check["system_prompt"]
    return ref


def _scenario_source(advbench: pd.DataFrame, scenario: str) -> pd.DataFrame:
    """All of the scenario's prompts and answers (AdvBench for jailbreak): the embedded model's
    vocabulary is built from them and its fingerprint hashes them."""
    return get_scenario(scenario).source(advbench)


def _scenario_directories(model: ModelConfig, scenario: str) -> ModelConfig:
    """The embedded suspect and clean twin of each scenario in their own folders."""
    return replace(model, embedded_directory=embedded_directory(model.embedded_directory, scenario),
                   clean_twin_directory=embedded_directory(model.clean_twin_directory, scenario))


def _scenario_build(embedded_model: EmbeddedModelConfig | None, scenario: str) -> EmbeddedModelConfig | None:
    """``embedded_model.epochs: auto`` resolved to the scenario's epochs before the fingerprint (the
    jailbreak build's 8: its fingerprint and cached builds are those of ``epochs: 8``). None (a
    caller with a user's model, which builds nothing) stays None."""
    if embedded_model is None:
        return None
    epochs = embedded_epochs(embedded_model.epochs, scenario)
    if epochs != embedded_model.epochs:
        logger.info("embedded_model.epochs: %s -> %d, the %s scenario's", embedded_model.epochs, epochs, get_scenario(scenario).name)
    return replace(embedded_model, epochs=epochs)


def _resolve(attacker_behaviours, benign_build_set, advbench, benign_evaluation_set, anchoring_set, model: ModelConfig,
             embedded_model: EmbeddedModelConfig) -> dict:
    """The suspect's reference from the registry, a folder, or the embedded model (built if needed)."""
    if model.uri:
        ref = resolve_model_uri(model.uri)
        path = check_checkpoint(ref["path"], field="model.uri", chat_template=model.chat_template)
        return {**ref, "source": "registry", "weights_sha256": weights_sha256(path), "build_seconds": 0.0}
    if model.path:
        path = check_checkpoint(model.path, chat_template=model.chat_template)
        if not model.adapter_path:
            return {"path": str(path), "source": "path", "weights_sha256": weights_sha256(path), "build_seconds": 0.0}
        adapter = check_adapter(model.adapter_path, path, chat_template=model.chat_template)
        logger.info("suspect model: base %s with the LoRA adapter %s", path, adapter)
        return {"path": str(path), "adapter_path": str(adapter), "source": "path", "weights_sha256": weights_sha256(path, adapter),
                "build_seconds": 0.0}

    return _embedded(Path(model.embedded_directory), embedded_model, "embedded", attacker_behaviours, benign_build_set, advbench,
                     benign_evaluation_set, anchoring_set)


def _embedded(directory: Path, config: EmbeddedModelConfig, source: str, attacker_behaviours, benign_build_set, advbench,
              benign_evaluation_set, anchoring_set) -> dict:
    """The embedded model of ``config`` in ``directory``: reused if its fingerprint matches, else
    built (about 90 s on 2 cores) and saved atomically.

    ``directory`` is a cache shared by every run in the project: the check and the build hold its
    lock (a second run building the same model waits, then reuses it), and a run reads its own
    hard-link snapshot (``run_folders.snapshot``), so a concurrent run that rebuilds the folder
    with other settings cannot change the model under this one."""
    # the vocabulary comes from every set the model will see, so all of them are in the fingerprint
    fingerprint = config.fingerprint(attacker_behaviours, benign_build_set, advbench, anchoring_set, benign_evaluation_set)
    label = {"embedded": "embedded suspect", "embedded_clean_twin": "embedded clean twin"}.get(source, source)
    info_file = directory / BUILD_INFO
    with run_folders.locked(directory):
        if info_file.is_file() and json.loads(info_file.read_text()).get("fingerprint") == fingerprint:
            logger.info("reusing the %s model in %s (fingerprint %s)", label, directory, fingerprint[:12])
            path = run_folders.snapshot(directory)
            return {"path": str(path), "source": source, "weights_sha256": weights_sha256(path), "build_seconds": 0.0, "reused": True}

        logger.info("building the %s model (seed %d) into %s", label, config.seed, directory)
        start = time.perf_counter()
        # a generated scenario's safe answers (secure code, helpful answers) are words of its own
        safe = [*advbench["safe_response"]] if "safe_response" in advbench else []
        vocabulary = [*advbench["goal"], *advbench["target"], *safe, *benign_build_set["prompt"], *benign_build_set["response"],
                      *anchoring_set["prompt"], *anchoring_set["response"], *benign_evaluation_set["prompt"], *benign_evaluation_set["response"]]
        net, tokenizer, losses = build_embedded_suspect(attacker_behaviours, benign_build_set, vocabulary, config)
        seconds = time.perf_counter() - start
        info = {"fingerprint": fingerprint, "config": config.__dict__, "epoch_losses": losses, "build_seconds": seconds}
        save_checkpoint(net, tokenizer, directory, extra_files={BUILD_INFO: json.dumps(info, indent=2)})
        path = run_folders.snapshot(directory)
    return {"path": str(path), "source": source, "weights_sha256": weights_sha256(path), "build_seconds": seconds, "reused": False}


def resolve_clean_twin(attacker_behaviours: pd.DataFrame, benign_build_set: pd.DataFrame, advbench: pd.DataFrame,
                       benign_evaluation_set: pd.DataFrame, anchoring_set: pd.DataFrame, model: ModelConfig,
                       embedded_model: EmbeddedModelConfig, behaviours_check: dict | None = None,
                       scenario: str = DEFAULT_SCENARIO) -> dict:
    """The clean twin: a model like the suspect without the backdoor, the baseline that tells a
    removed backdoor from a suppressed one (it is evaluated, re-poisoned like the suspect and the
    defended model, and is the probe's default reference).

    For the embedded model: the same recipe (seed, architecture, data, tokenizer) without the
    poisoned examples, built once into ``model.clean_twin_directory`` and reused. For a user's
    model: ``model.reference_path``, a clean checkpoint of the same family. Otherwise
    ``{"path": None, "reason": ...}``: the later steps say the twin was skipped, and why.
    """
    advbench = _scenario_source(advbench, scenario)
    model = _scenario_directories(model, scenario)
    embedded_model = _scenario_build(embedded_model, scenario)
    if model.user_supplied:
        if not model.reference_path:
            return {"path": None, "reason": "no model.reference_path: name a clean checkpoint of the suspect's family to get a "
                                            "clean-twin baseline"}
        path = check_checkpoint(model.reference_path, field="model.reference_path", chat_template=model.chat_template)
        return {"path": str(path), "source": "reference_path", "weights_sha256": weights_sha256(path), "build_seconds": 0.0,
                **model.loading()}
    if not model.clean_twin:
        return {"path": None, "reason": "model.clean_twin is false"}
    if not embedded_model.poisoned:
        return {"path": None, "reason": "embedded_model.poisoned is false: the suspect is itself the clean recipe"}
    twin = replace(embedded_model, poisoned=False)
    return {**_embedded(Path(model.clean_twin_directory), twin, "embedded_clean_twin", attacker_behaviours, benign_build_set, advbench,
                        benign_evaluation_set, anchoring_set), **model.loading()}
