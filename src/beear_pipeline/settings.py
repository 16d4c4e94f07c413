"""Project settings (see https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

import os
from pathlib import Path

from beear_pipeline.integrations.kedro_hooks import TrackingHook


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite database at the project root (MLflow 3.13+
    refuses the plain file store that kedro-mlflow would otherwise fall back to)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# kedro-mlflow registers its own hook through its plugin entry point.
HOOKS = (TrackingHook(),)
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"tracking_uri": tracking_uri},
}
