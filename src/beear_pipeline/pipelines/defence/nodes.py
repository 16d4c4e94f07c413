"""Thin adapters from the pipeline to the BEEAR engine: BEEAR itself and the two baselines
(``safety_finetune``: the same training with the perturbation fixed at zero; and
``random_perturbation``: a fresh random direction each round at BEEAR's per-round norm)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.models import load_model_ref
from beear_pipeline.probe import resolve_anchor_layer
from beear_pipeline.tracking import log_metrics

logger = logging.getLogger(__name__)


def _run(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, config: BeearConfig,
         norm_schedule=None):
    model, tokenizer = load_model_ref(suspect_model)
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
    anchoring = list(zip(anchoring_set["prompt"], anchoring_set["response"], strict=True))
    start = time.perf_counter()
    result = run_beear(model, tokenizer, safety, anchoring, config, norm_schedule=norm_schedule,
                       system_prompt=suspect_model.get("system_prompt"),
                       on_round=lambda r, rec: log_metrics({f"{config.defence}.{k}": v for k, v in rec.items() if k != "round"}, step=r))
    seconds = time.perf_counter() - start
    last = result.history[-1]
    logger.info("%s: %d rounds in %.1f s, final outer loss %.4f, perturbation norm %.2f",
                config.defence, config.rounds, seconds, last["outer_loss"], last["perturbation_norm"])
    history = {"defence": config.defence, "config": config.to_dict(), "seconds": seconds, "resumed_from": result.resumed_from,
               "rounds": result.history}
    return (result.model, tokenizer), result.perturbation, history


def _config(beear: BeearConfig | dict, defence: str, probe_report: dict | None = None) -> BeearConfig:
    """The run's configuration: ``anchor_layer: auto`` resolved from the probe's report, and each
    defence checkpointing into its own sub-folder."""
    config = beear if isinstance(beear, BeearConfig) else BeearConfig.from_dict(beear)
    layer = resolve_anchor_layer(config.anchor_layer, probe_report)
    if config.anchor_layer == "auto":
        logger.info("beear.anchor_layer: auto -> layer %d, as the probe recommends", layer)
    checkpoint_dir = str(Path(config.checkpoint_dir) / defence) if config.checkpoint_dir else None
    return dataclasses.replace(config, defence=defence, checkpoint_dir=checkpoint_dir, anchor_layer=layer)


def defend_with_beear(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, beear: BeearConfig,
                      probe_report: dict | None = None):
    """BEEAR: returns the defended model, the final perturbation and the per-round history."""
    model, perturbation, history = _run(suspect_model, safety_set, anchoring_set, _config(beear, "beear", probe_report))
    return model, {"perturbation": perturbation}, history


def defend_with_safety_finetune(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, beear: BeearConfig,
                                probe_report: dict | None = None):
    """Control: the same data, rounds, batches and optimiser as BEEAR, perturbation fixed at zero."""
    model, _, history = _run(suspect_model, safety_set, anchoring_set, _config(beear, "safety_finetune", probe_report))
    return model, history


def defend_with_random_perturbation(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame,
                                    beear: BeearConfig, probe_report: dict | None, beear_history: dict):
    """Baseline: a random direction each round, matched to BEEAR's perturbation norm per round
    (or ``beear.random_norm`` when set)."""
    config = _config(beear, "random_perturbation", probe_report)
    schedule = None if config.random_norm is not None else [r["perturbation_norm"] for r in beear_history["rounds"]]
    model, _, history = _run(suspect_model, safety_set, anchoring_set, config, norm_schedule=schedule)
    return model, history
