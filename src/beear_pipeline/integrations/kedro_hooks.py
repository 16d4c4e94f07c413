"""Project hooks: what every MLflow run records besides what kedro-mlflow logs."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl

from beear_pipeline.integrations import run_folders
from beear_pipeline.integrations.run_folders import RunFolder, RunFoldersConfig
from beear_pipeline.integrations.tracking import log_params, set_tags

logger = logging.getLogger(__name__)

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


def ui_address(experiment_id: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs table (or of one run) in the MLflow UI, in its "Model
    training" view: MLflow 3's UI otherwise opens on the GenAI overview, which lists no runs."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def logged_fields(block: str, config, scenario: str | None) -> dict:
    """A typed parameter block's fields as the run logs them: ``beear.anchor_layer`` is the layer the
    run uses (``null`` resolved to the scenario's, ``scenarios.scenario_anchor_layer``) and
    ``beear.anchor_layer_source`` says where it came from (``scenario code``, or
    ``beear.anchor_layer`` for a value given; ``auto`` is logged as it is, the layer the probe
    chose being reports/metrics.json's ``probe.anchor_layer_used``); ``beear.relearn_steps`` and
    ``beear.relearn_steps_source`` likewise (``scenarios.SCENARIO_BEEAR``)."""
    fields = dataclasses.asdict(config)
    if block == "beear":
        from beear_pipeline.scenarios import SCENARIO_BEEAR, scenario_beear

        for name in SCENARIO_BEEAR:
            fields[name], fields[f"{name}_source"] = scenario_beear(name, fields[name], scenario)
    return fields


class TrackingHook:
    """Makes each MLflow run easy to find and compare: named after the pipeline and the suspect
    model, tagged with its set-up and the suspect model, the behaviour sets logged as dataset
    inputs, typed parameters (dataclasses such as ``BeearConfig``) logged field by field as
    ``beear.anchor_layer`` (kedro-mlflow flattens plain mappings only), the experiment marked as
    model development, and at the end the address of the run in the UI.

    MLflow 3.17's UI keeps a per-browser switch between "GenAI" and "Model training" that starts
    on GenAI and ignores the experiment's kind, so a plain experiment link opens the GenAI
    overview with no runs on it; the address logged here carries ``workflowType=machine_learning``,
    which opens the runs table."""

    def __init__(self):
        self._project_path = Path.cwd()
        self._pipeline = "__default__"
        self._run: tuple[str, str] | None = None  # (experiment id, run id) of the pipeline's MLflow run
        self._scenario: str | None = None  # the run's ``scenario`` parameter, for nodes that do not take it

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)
        self._scenario = context.params.get("scenario")

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
        self._pipeline = "+".join(n for n in names if n) or "__default__"
        set_tags(environment_tags(self._project_path))
        run = mlflow.active_run()
        if run is not None:
            set_tags({"mlflow.runName": self._pipeline})
            self._run = (run.info.experiment_id, run.info.run_id)
            mlflow.MlflowClient().set_experiment_tag(run.info.experiment_id, "mlflow.experimentKind", "custom_model_development")

    @hook_impl
    def after_pipeline_run(self, run_params) -> None:
        # kedro-mlflow may have closed the run already (hook order), so the ids were kept
        if self._run is not None:
            logger.info("MLflow run of %r: with `mlflow ui` running, open %s", self._pipeline, ui_address(*self._run))

    @hook_impl
    def before_node_run(self, node, inputs) -> None:
        scenario = inputs.get("params:scenario", self._scenario)
        for name, value in inputs.items():
            if name.startswith("params:") and dataclasses.is_dataclass(value):
                block = name.removeprefix("params:")
                log_params({f"{block}.{k}": v for k, v in logged_fields(block, value, scenario).items()})

    @hook_impl
    def after_node_run(self, node, outputs) -> None:
        suspect = outputs.get("suspect_model")
        if isinstance(suspect, dict):
            set_tags({f"suspect.{k}": v for k, v in suspect.items() if k in ("source", "path", "adapter_path", "weights_sha256", "uri", "revision")})
            set_tags({"mlflow.runName": f"{self._pipeline} · {model_label(suspect)}"})
        sets = {name: df for name, df in outputs.items() if name in BEHAVIOUR_SETS and isinstance(df, pd.DataFrame)}
        set_tags({f"data.{name}.sha256": frame_sha256(df) for name, df in sets.items()})
        if sets and mlflow.active_run() is not None:
            for name, df in sets.items():  # the Datasets column of the runs table, and the run's inputs
                mlflow.log_input(mlflow.data.from_pandas(df, name=name, digest=frame_sha256(df)[:8]), context=DATASET_CONTEXT[name])


def _create_tracking_store(uri: str) -> None:
    """Create a sqlite tracking store under a lock: two runs starting at once on a new database
    would both run MLflow's schema migrations and one fails ("duplicate column name")."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    with run_folders.locked(database):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


class RunFolderHook:
    """Each run writes under its own folder and publishes its results atomically when it ends
    (``integrations/run_folders.py``): two ``kedro run``s in one project, a scheduled re-audit
    beside a defence, never write the same file.

    Before the pipeline runs, every local file dataset the pipeline *produces* is pointed at
    ``data/runs/<MLflow run id>/<its usual path>`` (what it only reads, such as the behaviour sets
    a DVC stage prepared earlier, is read from the usual place). After the run, or after a
    failure for the nodes that finished, the run folder is published. Settings:
    ``conf/base/runs.yml``."""

    def __init__(self):
        self._project = Path.cwd()
        self._config = RunFoldersConfig()

    @hook_impl(tryfirst=True)  # before kedro-mlflow's, which opens the tracking store
    def after_context_created(self, context) -> None:
        from kedro.config import MissingConfigException

        self._project = Path(context.project_path)
        _create_tracking_store(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self._project / 'mlflow.db'}")
        try:
            raw = dict(context.config_loader["runs"])
        except (KeyError, MissingConfigException):
            raw = {}
        try:
            self._config = RunFoldersConfig(**raw)
        except TypeError as e:
            raise ValueError(f"conf/base/runs.yml: {e} (fields: enabled, root, keep)") from e

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        if not self._config.enabled:
            return
        active = mlflow.active_run()  # kedro-mlflow's hook (a plugin: it runs before the project's) started it
        run = RunFolder(self._project, active.info.run_id if active else run_folders.new_run_id(), self._config).start()
        redirected = []
        for name in sorted(pipeline.all_outputs()):
            dataset = catalog.get(name)
            if dataset is not None and run_folders.redirect_dataset(dataset, run) is not None:
                redirected.append(name)
        run_folders.set_current(run)
        set_tags({"run.folder": run.relative})
        logger.info("this run writes under %s (%d datasets); its results are published when it ends", run.relative, len(redirected))

    @hook_impl
    def after_pipeline_run(self, run_params) -> None:
        self._end()

    @hook_impl
    def on_pipeline_error(self, error, run_params) -> None:
        self._end()

    @staticmethod
    def _end() -> None:
        run = run_folders.current()
        if run is None:
            return
        try:
            run.publish()
        finally:
            run_folders.set_current(None)
            run.finish()
