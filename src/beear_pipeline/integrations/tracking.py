"""MLflow logging that is a no-op outside a run, so nodes also work without tracking (tests, a
plain SequentialRunner), and in every rank but 0 of a torchrun job (docs/distributed.md)."""

from __future__ import annotations

import os

import mlflow


def _active() -> bool:
    return mlflow.active_run() is not None and os.environ.get("RANK", "0") == "0"


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log the numeric values of ``metrics`` to the active MLflow run, if there is one."""
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric and _active():
        mlflow.log_metrics(numeric, step=step)


def log_params(params: dict) -> None:
    """Log ``params`` to the active MLflow run, if there is one (values as text)."""
    if params and _active():
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def set_tags(tags: dict) -> None:
    """Set ``tags`` on the active MLflow run, if there is one."""
    if tags and _active():
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})
