"""MLflow logging that is a no-op outside a run, so the library and nodes work without tracking."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log numeric ``metrics`` to the active MLflow run, if there is one."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency, but the engine must not need it
        return
    if mlflow.active_run() is None:
        return
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_params(params: dict) -> None:
    """Log ``params`` to the active MLflow run, if there is one (values as text)."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return
    if mlflow.active_run() is not None and params:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def set_tags(tags: dict) -> None:
    """Set ``tags`` on the active MLflow run, if there is one."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return
    if mlflow.active_run() is not None and tags:
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})
