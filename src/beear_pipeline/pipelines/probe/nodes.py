"""Thin adapter from the pipeline to the trigger-free backdoor probe (``beear_pipeline.probe``):
the entrapment curve per layer with its verdict, the recommended anchor layer, and, for
candidate triggers, the drift analysis and the PCA picture."""

from __future__ import annotations

import logging
import time

import pandas as pd

from beear_pipeline.evaluation.judges import refusal_phrases
from beear_pipeline.evaluation.unwanted import UnwantedJudge
from beear_pipeline.integrations.tracking import log_metrics, set_tags
from beear_pipeline.lm.checkpoints import load_checkpoint, load_model_ref, weights_sha256
from beear_pipeline.probe import ProbeConfig, probe_model, trigger_drift
from beear_pipeline.probe.plots import plot_curves, plot_drift
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import get_scenario

logger = logging.getLogger(__name__)


def select_reference(probe: ProbeConfig, clean_twin_model: dict | None) -> dict:
    """Which model calibrates the verdict: ``probe.reference_model_path`` when set (the user
    named it), else the pipeline's clean twin when it names a checkpoint (the embedded model's
    twin: the same recipe without the triggered examples), else random directions of the same
    norm. A clean reference is the stronger control: random directions cannot tell a backdoor
    from the ordinary adversarial fragility that any model shows to an optimised perturbation.
    Returns ``{"kind", "path", "reason"}`` (``path`` None for random directions), as recorded
    in probe.json."""
    if probe.reference_model_path:
        return {"kind": "reference_model_path", "path": str(probe.reference_model_path), "reason": "probe.reference_model_path"}
    twin = clean_twin_model or {}
    if twin.get("path"):
        return {"kind": "clean_twin_model", "path": str(twin["path"]), "source": twin.get("source"),
                "reason": "probe.reference_model_path is null and the pipeline knows a clean twin", "ref": twin}
    why = twin.get("reason") or "no clean twin is known"
    return {"kind": "random_directions", "path": None, "reason": f"no reference model: {why}"}


def probe_suspect_model(suspect_model: dict, safety_set: pd.DataFrame, evaluation_set: pd.DataFrame, probe: ProbeConfig,
                        clean_twin_model: dict | None = None, scenario: str = DEFAULT_SCENARIO):
    """Probe the suspect model without its trigger. Returns ``reports/probe.json`` (verdict, rule,
    the layer and budget that carried the verdict with its adjusted p-value, the reference used,
    per-layer entrapment curves, recommended anchor layer, known-trigger analysis, timings), the
    found perturbations (``layer{L}_x{budget}`` -> tensor) and the figures.

    ``clean_twin_model`` is the pipeline's clean twin reference (``{"path": ...}`` or
    ``{"path": None, "reason": ...}``); see ``select_reference`` for which model calibrates."""
    config = probe
    start = time.perf_counter()
    chosen = select_reference(config, clean_twin_model)
    model, tokenizer = load_model_ref(suspect_model)
    reference = None
    if chosen["kind"] == "reference_model_path":
        reference = load_checkpoint(config.reference_model_path, field="probe.reference_model_path")
    elif chosen["kind"] == "clean_twin_model":
        reference = load_model_ref(chosen.pop("ref"), field="clean_twin_model")
    logger.info("probe reference: %s (%s)", chosen["path"] or "random directions", chosen["reason"])
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
    held_out = evaluation_set["prompt"].tolist()
    if config.max_eval_prompts:
        held_out = held_out[: config.max_eval_prompts]
    phrases = refusal_phrases(config.refusal_phrases)
    judge = get_scenario(scenario).judge
    if judge != "keyword":  # the scenario's judge of the unwanted answer (insecure code, a refusal), with its default settings
        logger.info("probe: held-out answers judged by the %s judge (scenario %s)", judge, scenario)
        phrases = UnwantedJudge(judge, phrases).flags
    report = probe_model(model, tokenizer, safety, held_out, config, reference=reference, phrases=phrases)
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
                       "reference_model_path": chosen["path"]}
    report["reference"] = chosen
    report["stage_seconds"] = {"probe": report.pop("seconds"), "total": time.perf_counter() - start}

    metrics = {"probe.recommended_layer": layer, "probe.likely_backdoored": float(report["verdict"] == "likely_backdoored")}
    cell = report["decision"]["carried_by"] or report["decision"]["closest"]
    if cell:  # the cell that carried the verdict, or the one that came closest
        metrics.update({"probe.p_adjusted": cell["p_adjusted"], "probe.verdict_layer": cell["layer"], "probe.verdict_budget": cell["budget"]})
    for c in report["curves"]:
        for b, o, r in zip(c["budgets"], c["optimised"], c["random"]):
            metrics[f"probe.layer{c['layer']}.flip_x{b:g}"] = o
            metrics[f"probe.layer{c['layer']}.random_flip_x{b:g}"] = r
    for a in report["known_trigger"]:
        metrics[f"probe.trigger.{_key(a['trigger'])}.uniformity"] = a["uniformity"]
        metrics[f"probe.trigger.{_key(a['trigger'])}.cosine_with_perturbation"] = a["cosine_with_perturbation"]
    log_metrics(metrics)
    set_tags({"probe.verdict": report["verdict"], "probe.recommended_layer": layer, "probe.reference": chosen["kind"]})

    figures = {"entrapment_curves.png": plot_curves(report)}
    if analyses:
        figures["trigger_pca.png"] = plot_drift(analyses)
    tensors = {f"layer{x}_x{b:g}": d.contiguous() for x, ds in perturbations.items() for b, d in zip(budgets, ds)}
    logger.info("probe of %s: %s, recommended anchor layer %d", suspect_model["path"], report["verdict"], layer)
    return report, tensors, figures


def _key(trigger: str) -> str:
    """A trigger as an MLflow metric-name fragment (letters, digits, _ - . only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in trigger)[:40] or "_"
