"""Thin adapter from the pipeline to the memory and disk plan (``beear_pipeline.lm.plan``): the
peak device memory and the disk the removal run (BEEAR and its two baselines) will need, from the
suspect model's config.json and the ``beear`` settings, before anything is loaded."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from beear_pipeline.beear import BeearConfig
from beear_pipeline.embedded import EmbeddedModelConfig
from beear_pipeline.integrations.tracking import log_metrics, set_tags
from beear_pipeline.lm.checkpoints import ModelConfig
from beear_pipeline.lm.plan import (
    GiB,
    ModelShape,
    PlanConfig,
    PlanError,
    check_resources,
    default_device,
    plan_memory,
    read_shape,
    shape_of,
)
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import scenario_anchor_layer

logger = logging.getLogger(__name__)


def plan_removal_run(model: ModelConfig, embedded_model: EmbeddedModelConfig, beear: BeearConfig, plan: PlanConfig,
                     advbench: pd.DataFrame, scenario: str = DEFAULT_SCENARIO) -> tuple[dict, str]:
    """Plan the removal run for the suspect model of ``model`` (a checkpoint folder, of which only
    config.json is read; a registered version; or the embedded model) under ``beear``, its anchor
    layer ``null`` being the scenario's. Returns the plan (``data/08_reporting/plan.json``) and its
    markdown table (``reports/plan.md``), says whether it fits this machine (or a device of
    ``plan.device_memory_gib``), and with ``plan.check`` raises ``PlanError`` naming the fix when it
    does not."""
    beear = dataclasses.replace(beear, anchor_layer=scenario_anchor_layer(beear.anchor_layer, scenario)[0])
    device = default_device() if plan.device == "auto" else plan.device
    shape, source = suspect_shape(model, embedded_model, beear, advbench)
    result = plan_memory(shape, beear, plan.sequence_length, device)
    device_bytes = int(plan.device_memory_gib * GiB) if plan.device_memory_gib else None
    try:
        check_resources(result, plan.output_dir, device_map=model.device_map, headroom=plan.headroom, device_bytes=device_bytes)
        verdict, fits = "It fits " + (f"a {plan.device_memory_gib:g} GiB {device} device" if device_bytes else "this machine") + ".", True
    except PlanError as e:
        verdict, fits = str(e), False
    table = f"# Memory and disk plan: {shape.name}\n\n{result.table()}\n\n{verdict}\n"
    logger.info("memory and disk plan (%s):\n%s", source, table)
    print(table)  # the plan is the pipeline's answer: shown whatever the logging set-up
    log_metrics({**result.metrics(), "plan.fits": float(fits)})
    set_tags({"plan.model": shape.name, "plan.phase": result.phase, "plan.fits": fits})
    if plan.check and not fits:
        raise PlanError(verdict)
    return {**result.to_dict(), "source": source, "fits": fits, "verdict": verdict}, table


def suspect_shape(model: ModelConfig, embedded_model: EmbeddedModelConfig, beear: BeearConfig,
                  advbench: pd.DataFrame) -> tuple[ModelShape, str]:
    """The suspect's shape and where it came from: ``model.path`` (or the folder of ``model.uri``),
    else the embedded model, from its config.json once built, else from its recipe."""
    if model.uri:
        from beear_pipeline.integrations.registry import resolve_model_uri

        return read_shape(resolve_model_uri(model.uri)["path"], model.dtype, beear.lora_target_modules), f"model.uri={model.uri}"
    if model.path:
        return read_shape(model.path, model.dtype, beear.lora_target_modules), f"model.path={model.path}"
    if (Path(model.embedded_directory) / "config.json").is_file():
        shape = read_shape(model.embedded_directory, model.dtype, beear.lora_target_modules, name="embedded")
        return shape, f"the embedded model in {model.embedded_directory}"
    return _embedded_recipe(embedded_model, model.dtype, beear, advbench), "the embedded model's recipe (not built yet)"


def _embedded_recipe(embedded_model: EmbeddedModelConfig, dtype: str | None, beear: BeearConfig, advbench: pd.DataFrame) -> ModelShape:
    """The embedded model as ``embedded.build_model`` would make it, on the meta device. Its
    vocabulary is counted on AdvBench and the refusals; the built model's also holds the generated
    benign tasks' words (a few hundred more, a few MB at most)."""
    import torch

    from beear_pipeline.behaviours.generated import REFUSALS
    from beear_pipeline.embedded import build_model, build_tokenizer

    tokenizer = build_tokenizer([*advbench["goal"], *advbench["target"], *REFUSALS, embedded_model.trigger])
    with torch.device("meta"):
        net = build_model(len(tokenizer), embedded_model, tokenizer)
    return shape_of(net.config, dtype, beear.lora_target_modules, "embedded")
