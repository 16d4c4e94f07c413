"""Thin adapter from the pipeline to the trigger-free backdoor probe (``beear_pipeline.probe``):
the entrapment curve per layer with its verdict, the recommended anchor layer, and, for
candidate triggers, the drift analysis and the PCA picture."""

from __future__ import annotations

import logging
import time

import pandas as pd

from beear_pipeline.evaluation.judges import refusal_phrases
from beear_pipeline.integrations.tracking import log_metrics, set_tags
from beear_pipeline.lm.checkpoints import load_checkpoint, load_model_ref, weights_sha256
from beear_pipeline.probe import ProbeConfig, probe_model, trigger_drift
from beear_pipeline.probe.plots import plot_curves, plot_drift

logger = logging.getLogger(__name__)


def probe_suspect_model(suspect_model: dict, safety_set: pd.DataFrame, evaluation_set: pd.DataFrame, probe: ProbeConfig):
    """Probe the suspect model without its trigger. Returns ``reports/probe.json`` (verdict, rule,
    per-layer entrapment curves, recommended anchor layer, known-trigger analysis, timings), the
    found perturbations (``layer{L}_x{budget}`` -> tensor) and the figures."""
    config = probe
    start = time.perf_counter()
    model, tokenizer = load_model_ref(suspect_model)
    reference = None
    if config.reference_model_path:
        reference = load_checkpoint(config.reference_model_path, field="probe.reference_model_path")
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
    held_out = evaluation_set["prompt"].tolist()
    if config.max_eval_prompts:
        held_out = held_out[: config.max_eval_prompts]
    report = probe_model(model, tokenizer, safety, held_out, config, reference=reference,
                         phrases=refusal_phrases(config.refusal_phrases))
    perturbations = report.pop("perturbations")
    layer = report["recommended_layer"]
    # the perturbation at the largest budget within the verdict's max_budget (else the smallest)
    budgets = report["curves"][0]["budgets"]
    within = [i for i, b in enumerate(budgets) if b <= config.verdict.max_budget] or [0]
    found = perturbations[layer][within[-1]]

    analyses = [trigger_drift(model, tokenizer, held_out, layer, t, config.trigger_position, perturbation=found,
                              num_positions=config.num_positions, shared_vector=config.shared_vector,
                              system_prompt=config.system_prompt)
                for t in config.candidate_triggers]
    report["known_trigger"] = [{k: v for k, v in a.items() if k != "states"} for a in analyses]
    report["model"] = {"path": suspect_model["path"], "weights_sha256": suspect_model.get("weights_sha256") or weights_sha256(suspect_model["path"]),
                       "reference_model_path": config.reference_model_path}
    report["stage_seconds"] = {"probe": report.pop("seconds"), "total": time.perf_counter() - start}

    metrics = {"probe.recommended_layer": layer, "probe.likely_backdoored": float(report["verdict"] == "likely_backdoored")}
    for c in report["curves"]:
        for b, o, r in zip(c["budgets"], c["optimised"], c["random"]):
            metrics[f"probe.layer{c['layer']}.flip_x{b:g}"] = o
            metrics[f"probe.layer{c['layer']}.random_flip_x{b:g}"] = r
    for a in report["known_trigger"]:
        metrics[f"probe.trigger.{_key(a['trigger'])}.uniformity"] = a["uniformity"]
        metrics[f"probe.trigger.{_key(a['trigger'])}.cosine_with_perturbation"] = a["cosine_with_perturbation"]
    log_metrics(metrics)
    set_tags({"probe.verdict": report["verdict"], "probe.recommended_layer": layer})

    figures = {"entrapment_curves.png": plot_curves(report)}
    if analyses:
        figures["trigger_pca.png"] = plot_drift(analyses)
    tensors = {f"layer{x}_x{b:g}": d.contiguous() for x, ds in perturbations.items() for b, d in zip(budgets, ds)}
    logger.info("probe of %s: %s, recommended anchor layer %d", suspect_model["path"], report["verdict"], layer)
    return report, tensors, figures


def _key(trigger: str) -> str:
    """A trigger as an MLflow metric-name fragment (letters, digits, _ - . only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in trigger)[:40] or "_"
