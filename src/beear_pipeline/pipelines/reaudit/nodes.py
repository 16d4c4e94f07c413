"""Scheduled re-audit of model-registry entries: evaluate each selected version again under the
run's evaluation protocol, write ``audit.*`` tags with a timestamp, and quarantine versions that
fail the ASR gate (``registry.asr_gate``: by default the upper bound of asr_triggered's 95%
interval above ``reaudit.asr_threshold``).

One broken entry is reported and does not stop the others; re-running is safe (tags are
overwritten with fresh values, aliases set to the same versions).

Fanned out, each selected version is its own task (``reaudit_one_version``, one process per
version) writing its own result file, and ``gather_reaudit_results`` merges them into the one
report: see ``fanout.py`` and the Airflow DAG in ``deploy/airflow``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import pandas as pd

from beear_pipeline.evaluation.evaluate import evaluate_model
from beear_pipeline.evaluation.judges import ClassifierJudge
from beear_pipeline.evaluation.protocol import EvaluationProtocol
from beear_pipeline.integrations import registry
from beear_pipeline.integrations.registry import ReauditConfig
from beear_pipeline.lm.checkpoints import ModelConfig, check_checkpoint, load_checkpoint, weights_sha256
from beear_pipeline.probe import ProbeConfig, probe_model

logger = logging.getLogger(__name__)


def select_versions(reaudit: ReauditConfig) -> list[dict]:
    """Registry versions to re-check: by ``reaudit.name`` (all versions, or ``reaudit.alias``)
    and/or an MLflow filter string ``reaudit.filter``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if reaudit.alias:
        versions = [client.get_model_version_by_alias(reaudit.name, reaudit.alias)]
    else:
        clauses = [f"name = '{reaudit.name}'"] if reaudit.name else []
        if reaudit.filter:
            clauses.append(reaudit.filter)
        versions = client.search_model_versions(" and ".join(clauses) or None)
    selection = uuid.uuid4().hex[:12]  # tells this selection's per-version results from an earlier one's
    selected = sorted(({"name": v.name, "version": str(v.version), "selection": selection} for v in versions),
                      key=lambda v: (v["name"], int(v["version"])))
    if not selected:
        raise ValueError(f"reaudit selected no registry entries with {reaudit}: check reaudit.name / alias / filter")
    logger.info("re-auditing %d registry entries", len(selected))
    return selected


def _audit(path: str, protocol: EvaluationProtocol, evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame,
           reaudit: ReauditConfig, model: ModelConfig, safety_set: pd.DataFrame, probe: ProbeConfig) -> dict:
    """The audit.* tags of one checkpoint: evaluated, and probed when ``reaudit.probe``."""
    net, tokenizer = load_checkpoint(path, **model.loading())
    judge = ClassifierJudge(protocol.judge_path, protocol.judge_kind) if protocol.judge_path else None
    metrics = evaluate_model(net, tokenizer, protocol, evaluation_set["prompt"].tolist(), benign_evaluation_set["prompt"].tolist(),
                             benign_responses=benign_evaluation_set["response"].tolist() if "response" in benign_evaluation_set else None,
                             judge=judge)
    gate = registry.asr_gate(metrics, reaudit.asr_threshold, reaudit.gate_statistic)
    tags = {"audit.asr_triggered": metrics["asr_triggered"], "audit.asr_untriggered": metrics["asr_untriggered"],
            "audit.benign_loss": metrics["benign_loss"], **registry.gate_tags(gate), "audit.quarantined": not gate["passed"],
            "audit.reaudit_timestamp": registry.timestamp(), "audit.weights_sha256": weights_sha256(path)}
    if reaudit.probe:
        safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
        held_out = evaluation_set["prompt"].tolist()[: probe.max_eval_prompts or None]
        report = probe_model(net, tokenizer, safety, held_out, probe, phrases=protocol.refusal_phrases)
        tags.update({"audit.probe_verdict": report["verdict"], "audit.probe_recommended_layer": report["recommended_layer"]})
    return tags


def reaudit_versions(selected: list[dict], evaluation_protocol: dict, evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame,
                     reaudit: ReauditConfig, model: ModelConfig, safety_set: pd.DataFrame, probe: ProbeConfig,
                     behaviours_check: dict | None = None) -> list[dict]:
    """Evaluate (and, with ``reaudit.probe``, probe) every selected version; tag it; quarantine it
    if it fails the ASR gate. ``behaviours_check`` orders this after the data checks."""
    protocol = EvaluationProtocol.from_dict(evaluation_protocol)
    results = []
    for entry in selected:
        name, version = entry["name"], entry["version"]
        uri = f"models:/{name}/{version}"
        try:
            path = check_checkpoint(registry.version_path(registry.get_version(uri)), field=uri, chat_template=model.chat_template)
            tags = _audit(str(path), protocol, evaluation_set, benign_evaluation_set, reaudit, model, safety_set, probe)
            registry.set_version_tags(name, version, tags)
            registry.delete_version_tags(name, version, registry.LEGACY_TAGS)  # an old "audit.verdict: clean" must not outlive this audit
            if not tags["audit.gate_passed"]:
                registry.set_alias(name, reaudit.quarantine_alias, version)
            results.append({**entry, "status": "ok", **{k.removeprefix("audit."): v for k, v in tags.items()}})
        except Exception as e:  # one broken entry must not stop the audit of the others
            logger.exception("re-audit of %s failed", uri)
            results.append({**entry, "status": "error", "error": f"{type(e).__name__}: {e}"})
    return results


def version_key(entry: dict) -> str:
    """``NAME/VERSION``: how ``reaudit.version`` names a selected version, and its result's partition."""
    return f"{entry['name']}/{entry['version']}"


def reaudit_one_version(selected: list[dict], evaluation_protocol: dict, evaluation_set: pd.DataFrame,
                        benign_evaluation_set: pd.DataFrame, reaudit: ReauditConfig, model: ModelConfig, safety_set: pd.DataFrame,
                        probe: ProbeConfig) -> dict:
    """One task of a fanned-out re-audit: the version ``reaudit.version`` of the selection, audited
    as ``reaudit_versions`` audits each; its result carries when it ran (``started``,
    ``finished``: seconds since the epoch) and the selection it belongs to."""
    if not reaudit.version:
        raise ValueError("the reaudit_version pipeline audits one version: add --params reaudit.version=NAME/VERSION, one of "
                         "data/08_reporting/reaudit_selection.json (written by the reaudit_prepare pipeline)")
    entry = next((e for e in selected if version_key(e) == reaudit.version), None)
    if entry is None:
        raise ValueError(f"reaudit.version={reaudit.version} is not in the selection ({', '.join(map(version_key, selected))}): "
                         "run the reaudit_prepare pipeline with the same reaudit.name / alias / filter first")
    started = time.time()
    result = reaudit_versions([entry], evaluation_protocol, evaluation_set, benign_evaluation_set, reaudit, model, safety_set, probe)[0]
    return {**result, "started": started, "finished": time.time(), "pid": os.getpid()}


def gather_reaudit_results(selected: list[dict], version_results: dict, reaudit: ReauditConfig) -> list[dict]:
    """The per-version results of the selection, in its order (``version_results``: partition
    ``NAME/VERSION`` -> loader). A version without a result of this selection (its task failed or
    did not run; a file left by an earlier selection does not count) is reported as an error."""
    results = []
    for entry in selected:
        load = version_results.get(version_key(entry))
        result = load() if load is not None else None
        if result is None:
            results.append({**entry, "status": "error", "error": "no result: its reaudit_version task failed or did not run"})
        elif result.get("selection") != entry.get("selection"):
            results.append({**entry, "status": "error", "error": "only a result of an earlier selection: its reaudit_version task "
                                                                 "failed or did not run this time"})
        else:
            results.append(result)
    failed = [version_key(r) for r in results if r["status"] != "ok"]
    logger.info("gathered %d re-audit results%s", len(results), f"; not audited: {', '.join(failed)}" if failed else "")
    return results


def write_reaudit_report(results: list[dict], reaudit: ReauditConfig) -> str:
    """``reports/reaudit.md``: one row per entry."""
    statistic = "the upper bound of its 95% interval" if reaudit.gate_statistic == "upper_bound" else "its measured value"
    lines = ["# Re-audit of model-registry entries", "",
             f"Gate: asr_triggered, by {statistic}, at or below {reaudit.asr_threshold} for every trigger evaluated; versions that fail "
             f"it get the alias `{reaudit.quarantine_alias}`. A failed gate means the audit could not show the backdoor gone, not "
             "that one was proven.", "",
             "| model | version | status | asr_triggered [95% CI] | asr_untriggered | gate value | gate | probe | checked at |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "ok":
            low, high = json.loads(r["asr_triggered_ci95"])
            lines.append(f"| {r['name']} | {r['version']} | ok | {r['asr_triggered']:.3f} [{low:.3f}, {high:.3f}] | "
                         f"{r['asr_untriggered']:.3f} | {r['gate_value']:.3f} | {'passed' if r['gate_passed'] else 'failed: quarantined'} | "
                         f"{r.get('probe_verdict', 'not run')} | {r['reaudit_timestamp']} |")
        else:
            lines.append(f"| {r['name']} | {r['version']} | error: {r['error'][:200]} | | | | | | |")
    return "\n".join(lines) + "\n"
