"""Project hooks: what every MLflow run records besides what kedro-mlflow logs."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl

from beear_pipeline.integrations.tracking import log_params, set_tags

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


# how each behaviour set is used, as MLflow's dataset-input context
DATASET_CONTEXT = {"safety_set": "training", "anchoring_set": "training", "evaluation_set": "evaluation",
                   "benign_evaluation_set": "evaluation"}


def model_label(suspect: dict) -> str:
    """A short name for the suspect model in run names: the registered name and version, the
    checkpoint folder's name, or ``embedded``."""
    if suspect.get("uri"):
        return f"{suspect.get('name', suspect['uri'])} v{suspect.get('version', '?')}"
    return "embedded" if suspect.get("source") == "embedded" else Path(str(suspect.get("path", "model"))).name


class TrackingHook:
    """Makes each MLflow run easy to find and compare: named after the pipeline and the suspect
    model, tagged with its set-up and the suspect model, the behaviour sets logged as dataset
    inputs, typed parameters (dataclasses such as ``BeearConfig``) logged field by field as
    ``beear.anchor_layer`` (kedro-mlflow flattens plain mappings only), and the experiment marked
    as model development so the UI opens on runs, not on MLflow 3's GenAI overview."""

    def __init__(self):
        self._project_path = Path.cwd()
        self._pipeline = "__default__"

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
        self._pipeline = "+".join(n for n in names if n) or "__default__"
        set_tags(environment_tags(self._project_path))
        run = mlflow.active_run()
        if run is not None:
            set_tags({"mlflow.runName": self._pipeline})
            mlflow.MlflowClient().set_experiment_tag(run.info.experiment_id, "mlflow.experimentKind", "custom_model_development")

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
            set_tags({"mlflow.runName": f"{self._pipeline} · {model_label(suspect)}"})
        sets = {name: df for name, df in outputs.items() if name in BEHAVIOUR_SETS and isinstance(df, pd.DataFrame)}
        set_tags({f"data.{name}.sha256": frame_sha256(df) for name, df in sets.items()})
        if sets and mlflow.active_run() is not None:
            for name, df in sets.items():  # the Datasets column of the runs table, and the run's inputs
                mlflow.log_input(mlflow.data.from_pandas(df, name=name, digest=frame_sha256(df)[:8]), context=DATASET_CONTEXT[name])
