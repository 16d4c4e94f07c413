"""Project hooks: what every MLflow run records besides what kedro-mlflow logs."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd
from kedro.framework.hooks import hook_impl

from beear_pipeline.tracking import log_params, set_tags

BEHAVIOUR_SETS = ("safety_set", "anchoring_set", "evaluation_set", "benign_evaluation_set")
LIBRARIES = ("torch", "transformers", "peft", "kedro", "kedro-mlflow", "mlflow", "dvc", "great-expectations", "beear_pipeline")


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def frame_sha256(df: pd.DataFrame) -> str:
    """sha256 of a data set's rows as JSON Lines: the same rows give the same hash anywhere."""
    return hashlib.sha256(df.to_json(orient="records", lines=True, force_ascii=False).encode()).hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_tags(project_path: Path) -> dict[str, str]:
    """Git commit, device and library versions: enough to tell two runs' set-ups apart."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    tags = {"git.commit": _git_commit(project_path), "device": device, "python": platform.python_version()}
    tags.update({f"version.{lib}": _version(lib) for lib in LIBRARIES})
    return tags


class TrackingHook:
    """Tags each MLflow run with its set-up, the suspect model and the behaviour sets, and logs
    typed parameters (dataclasses such as ``BeearConfig``) field by field as ``beear.anchor_layer``
    (kedro-mlflow flattens plain mappings only)."""

    def __init__(self):
        self._project_path = Path.cwd()

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        set_tags(environment_tags(self._project_path))

    @hook_impl
    def before_node_run(self, node, inputs) -> None:
        for name, value in inputs.items():
            if name.startswith("params:") and dataclasses.is_dataclass(value):
                log_params({f"{name.removeprefix('params:')}.{k}": v for k, v in dataclasses.asdict(value).items()})

    @hook_impl
    def after_node_run(self, node, outputs) -> None:
        suspect = outputs.get("suspect_model")
        if isinstance(suspect, dict):
            set_tags({f"suspect.{k}": v for k, v in suspect.items() if k in ("source", "path", "weights_sha256", "uri", "revision")})
        set_tags({f"data.{name}.sha256": frame_sha256(df) for name, df in outputs.items()
                  if name in BEHAVIOUR_SETS and isinstance(df, pd.DataFrame)})
