"""Project settings (see https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

import os
from pathlib import Path

from beear_pipeline.integrations.kedro_hooks import RunFolderHook, TrackingHook
from beear_pipeline.integrations.preflight import PreflightHook


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite database at the project root (MLflow 3.13+
    refuses the plain file store that kedro-mlflow would otherwise fall back to)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# kedro-mlflow registers its own hook through its plugin entry point. PreflightHook runs before
# it (tryfirst), so a bad model path stops the run before the tracking database is set up.
# pluggy calls hooks of the same kind last-registered first: the preflight check (bad input fails
# before anything is set up) comes last here so that it runs before RunFolderHook creates the
# tracking store
HOOKS = (TrackingHook(), RunFolderHook(), PreflightHook())
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"tracking_uri": tracking_uri},
    # conf/base/runs.yml: where each run writes before it publishes (integrations/run_folders.py)
    "config_patterns": {"runs": ["runs*", "runs*/**"]},
}
