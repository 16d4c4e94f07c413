"""Registry out: register the suspect and the defended model with audit tags; promote the
defended one (alias ``defended``) only if it passes the gate."""

from __future__ import annotations

import logging
from pathlib import Path

from beear_pipeline.integrations import registry, run_folders
from beear_pipeline.integrations.dvc_artifacts import dvc_tags
from beear_pipeline.integrations.registry import RegistryConfig
from beear_pipeline.lm.checkpoints import bundle_adapter, weights_sha256

logger = logging.getLogger(__name__)


def _run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _bundle(suspect_model: dict, snapshot_dir: str) -> Path:
    """A suspect given as base + adapter is registered as one adapter folder that names its local base."""
    target = Path(snapshot_dir) / f"{suspect_model['weights_sha256'][:16]}-adapter"
    return target if target.is_dir() else bundle_adapter(suspect_model["path"], suspect_model["adapter_path"], target)


def _dvc(path: str) -> dict:
    """``dvc.md5`` / ``dvc.path`` when the checkpoint at ``path`` is published as a DVC-tracked
    output (the embedded suspect, ``data/06_models/defended``): another machine then pulls exactly
    this version with DVC (``registry.version_path``). Hashing reads the weights once. Not for a
    LoRA adapter folder: it names its base by a local path, which does not travel."""
    if (Path(path) / "adapter_config.json").is_file():
        return {}
    run = run_folders.current()
    return dvc_tags(path, run_folders.published(path), run.project if run else Path.cwd())


def register_models(suspect_model: dict, defended_model: dict, metrics: dict, registry_params: RegistryConfig) -> dict:
    """Register both versions under ``registry.name`` (no-op, said so, when it is null).

    Both carry the ASR gate's outcome and what it checked (``audit.gate_passed``,
    ``audit.gate_statistic``, ``audit.gate_value``, ``audit.gate_threshold``,
    ``audit.gate_triggers``); the defended one also the whole promotion decision
    (``audit.promoted``, ``audit.promotion``: ASR gate, utility, convergence) and, in a scenario
    whose judge measures valid code, ``audit.valid_code_utility_lost``."""
    name = registry_params.name
    if not name:
        logger.info("registry.name is not set: nothing registered (set it to register the defended model)")
        return {"registered": False, "reason": "registry.name is not set"}
    threshold, statistic = registry_params.asr_threshold, registry_params.gate_statistic
    run_id, now = _run_id(), registry.timestamp()
    suspect, defended = metrics["suspect"], metrics["defended"]

    if suspect_model.get("uri"):  # the suspect already lives in the registry
        source_version = suspect_model["version"]
    else:
        if suspect_model.get("adapter_path"):
            path = _bundle(suspect_model, registry_params.snapshot_dir)
        else:
            path = registry.snapshot(suspect_model["path"], registry_params.snapshot_dir, suspect_model["weights_sha256"][:16])
        source_version = registry.register_checkpoint(name, path, {
            "audit.role": "suspect", "audit.asr_triggered": suspect["asr_triggered"],
            "audit.asr_untriggered": suspect["asr_untriggered"], **registry.gate_tags(registry.asr_gate(suspect, threshold, statistic)),
            "audit.weights_sha256": suspect_model["weights_sha256"], "audit.run_id": run_id, "audit.timestamp": now,
            **({} if suspect_model.get("adapter_path") else _dvc(suspect_model["path"])),
        }, run_id)

    sha = weights_sha256(defended_model["path"])
    path = registry.snapshot(defended_model["path"], registry_params.snapshot_dir, sha[:16])
    converged = (metrics.get("beear") or {}).get("converged")
    valid_code = metrics.get("valid_code")
    promote, reason = registry.promotion_decision(defended, suspect, threshold, registry_params.max_benign_loss_increase, converged,
                                                  statistic, valid_code)
    version = registry.register_checkpoint(name, path, {
        "audit.role": "defended", "audit.asr_triggered": defended["asr_triggered"],
        "audit.asr_untriggered": defended["asr_untriggered"],
        "audit.benign_loss_change": registry.benign_loss_change(defended, suspect), "audit.converged": converged,
        "audit.convergence": (metrics.get("beear") or {}).get("convergence"),
        **({"audit.valid_code_utility_lost": valid_code["utility_lost"]} if valid_code else {}),
        **registry.gate_tags(registry.asr_gate(defended, threshold, statistic)), "audit.source_version": source_version,
        "audit.weights_sha256": sha, "audit.run_id": run_id, "audit.timestamp": now, "audit.promoted": promote, "audit.promotion": reason,
        **_dvc(defended_model["path"]),
    }, run_id)
    if promote:
        registry.set_alias(name, "defended", version)
        logger.info("promoted %s version %s to alias 'defended': %s", name, version, reason)
    else:
        logger.warning("%s version %s registered WITHOUT the alias 'defended': %s", name, version, reason)
    return {"registered": True, "name": name, "suspect_version": source_version, "defended_version": version,
            "promoted": promote, "reason": reason}
