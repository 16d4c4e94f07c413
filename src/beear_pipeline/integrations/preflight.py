"""Checks that stop a run within seconds of the command, before anything slow starts.

A bad ``model.path`` (missing folder, pickle-only weights, no tokenizer or chat template), an
adapter that does not fit, a trigger missing for a user's model, a layer outside the model's
depth, or a run that will not fit the device's memory or the disk (the memory plan) used to surface only after the behaviour data had been built and validated and the
tracking database set up (34-43 s on a 2-core machine, issue 12). ``PreflightHook`` runs these
checks first, on the configuration and on the checkpoint's small files (``config.json``, file
names): it reads no weights and opens no tracking database. Every check is also made again
where the work happens, so an in-process ``KedroSession`` without this hook fails the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

SUSPECT_NODE = "resolve_suspect_model"
"""The node that resolves (and later stages load) the suspect: a pipeline with it needs these checks."""


class PreflightError(ValueError):
    """The configuration cannot work: the message names the setting and the fix."""


def checkpoint_depth(path: str | Path) -> int | None:
    """The number of decoder layers from a checkpoint's ``config.json`` (None if it does not say)."""
    config = json.loads((Path(path) / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal wrappers keep the decoder's shape there
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def preflight(params: dict) -> dict:
    """Check the suspect model's settings against the configuration; returns what was checked.

    Raises ``PreflightError`` (or the checkpoint's ``CheckpointError``) naming the setting and the
    fix. Cheap: no weights are read, torch is not needed."""
    from beear_pipeline.beear.config import BeearConfig, DistributedConfig, check_hardening
    from beear_pipeline.embedded import EmbeddedModelConfig
    from beear_pipeline.evaluation.config import EvaluationConfig
    from beear_pipeline.lm import checkpoints
    from beear_pipeline.lm.checkpoints import ModelConfig
    from beear_pipeline.lm.plan import PlanConfig, preflight_plan
    from beear_pipeline.lm.residual import layer_index
    from beear_pipeline.probe.config import ProbeConfig
    from beear_pipeline.scenarios import scenario_anchor_layer

    model = _typed(params, "model", ModelConfig)
    evaluation = _typed(params, "evaluation", EvaluationConfig)
    try:
        evaluation.check_trigger_for(model)  # what the suspect step checks again in-process
    except ValueError as e:
        raise PreflightError(str(e)) from None
    checked: dict = {"model": "embedded"}
    beear = _typed(params, "beear", BeearConfig)
    try:  # beear.anchor_layer: null is the scenario's layer: the layer checked and planned is the one the run will use
        anchor, _ = scenario_anchor_layer(beear.anchor_layer, params.get("scenario"))
    except ValueError as e:  # an unknown scenario
        raise PreflightError(str(e)) from None
    beear = dataclasses.replace(beear, anchor_layer=anchor)
    if "distributed" in params:  # a combination a distributed defence refuses: here, not after the probe has run
        distributed = _typed(params, "distributed", DistributedConfig)
        try:
            check_hardening(beear, distributed.num_processes)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        checked["distributed"] = f"{distributed.num_processes} process(es), sharding {distributed.sharding}"
    if model.reference_path:  # the clean twin of a user's model
        checkpoints.check_checkpoint(model.reference_path, "model.reference_path", model.chat_template)
        checked["reference_model"] = str(model.reference_path)
    if model.path:
        checkpoints.check_checkpoint(model.path, "model.path", model.chat_template)
        if model.adapter_path:  # its files and its shapes against the base's (file headers only)
            checkpoints.check_adapter(model.adapter_path, model.path, chat_template=model.chat_template)
        depth = checkpoint_depth(model.path)
        checked["model"] = str(model.path)
    elif model.uri:
        return {**checked, "model": model.uri}  # a registry version is resolved (and checked) by the suspect node
    else:
        depth = _typed(params, "embedded_model", EmbeddedModelConfig).num_layers
    if depth is None:
        return checked
    if beear.anchor_layer != "auto":
        checked["anchor_layer"] = layer_index(beear.anchor_layer, depth, "beear.anchor_layer")
    if "probe" in params:
        probe = _typed(params, "probe", ProbeConfig)
        checked["probe_layers"] = [layer_index(spec, depth, "probe.layers") for spec in probe.layers]
    checked["layers"] = depth
    plan = _typed(params, "plan", PlanConfig)
    if model.path and plan.before_loading:  # memory and disk, from config.json alone (lm/plan.py)
        planned = preflight_plan(model.path, beear, plan.sequence_length, plan.output_dir,
                                 device=None if plan.device == "auto" else plan.device, dtype=model.dtype,
                                 device_map=model.device_map, headroom=plan.headroom)
        checked["plan_peak_gib"] = round(planned.peak_device_bytes / 2**30, 3)
    return checked


def _typed(params: dict, block: str, cls):
    """``params[block]`` as ``cls``: Kedro may hand over the typed object already, or a mapping."""
    from beear_pipeline.configuration import from_mapping

    value = params.get(block)
    return value if isinstance(value, cls) else from_mapping(cls, block, dict(value or {}))


def requested_pipelines() -> list[str] | None:
    """The pipelines this session is about to run, or None when it runs none (a notebook or
    ``kedro jupyter`` loading the context, ``kedro catalog``). ``kedro run`` without
    ``--pipeline`` runs ``__default__``."""
    import click
    from kedro.framework.project import pipelines

    # Kedro 1.7 stores the names a run requests before it creates the context (no public accessor);
    # a plain `kedro run` requests none, so the command itself tells a run from a context load
    requested = getattr(pipelines, "_requested_pipelines", None)
    if requested:
        return list(requested)
    command = click.get_current_context(silent=True)
    return ["__default__"] if command is not None and command.command.name == "run" else None


def needs_suspect(names: list[str]) -> bool:
    from kedro.framework.project import pipelines

    return any(name in pipelines and any(n.name == SUSPECT_NODE for n in pipelines[name].nodes) for name in names)


class PreflightHook:
    """Runs ``preflight`` before every other hook (kedro-mlflow's set-up included) when a run's
    pipeline resolves the suspect model; loading a context without running (a notebook, a
    preset's parameters) checks nothing."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        names = requested_pipelines()
        if names is None or not needs_suspect(names):
            return
        checked = preflight(context.params)
        logger.info("Preflight checks passed for %s: %s", "+".join(names), checked)
