"""Weekly re-audit of the model registry, fanned out: one Airflow task per registry version.

    reaudit-prepare  ->  reaudit-version (mapped: one task per selected version)  ->  reaudit-gather

The same Kedro pipelines as ``python -m beear_pipeline reaudit --workers N``: ``reaudit_prepare``
(behaviour sets, evaluation protocol, the selection), ``reaudit_version`` with
``reaudit.version=NAME/VERSION`` (each writes its own result file), ``reaudit_gather``
(reports/reaudit.md and .json). Airflow's dynamic task mapping (``.expand``) creates the version
tasks from the selection at run time, so M versions run on up to M workers (bounded by the pool
and ``max_active_tis_per_dag``). Run folders keep the concurrent Kedro runs apart.

Written by hand: kedro-airflow generates one task per group of nodes and cannot map a task over
a list known only at run time. Copy this file into Airflow's ``dags/`` folder and set
PROJECT_PATH to the project's folder on the workers (a clone with its DVC remote configured: a
version whose checkpoint folder is not on the worker is pulled by its ``dvc.md5`` tag).
Schedule: conf/base/airflow.yml (a test checks they agree).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

PROJECT_PATH = Path(os.environ.get("BEEAR_PIPELINE_PROJECT", Path.cwd()))
ENV = "local"
PACKAGE = "beear_pipeline"
SELECTION = "data/08_reporting/reaudit_selection.json"  # the catalog's reaudit_selection


def _run_kedro(pipeline: str, runtime_params: dict | None = None) -> None:
    """Run one Kedro pipeline of the project in this task's process."""
    from kedro.framework.project import configure_project
    from kedro.framework.session import KedroSession

    configure_project(PACKAGE)
    with KedroSession.create(project_path=PROJECT_PATH, env=ENV, conf_source=str(PROJECT_PATH / "conf"),
                             runtime_params=runtime_params or {}) as session:
        session.run(pipeline_names=[pipeline])


@dag(
    dag_id="beear-pipeline-reaudit",
    start_date=datetime(2026, 1, 1),
    schedule="@weekly",
    max_active_runs=1,
    catchup=False,
    default_args={"owner": "airflow", "depends_on_past": False, "retries": 1, "retry_delay": timedelta(minutes=5)},
)
def beear_pipeline_reaudit():
    @task(task_id="reaudit-prepare")
    def prepare() -> list[str]:
        _run_kedro("reaudit_prepare")
        return [f"{e['name']}/{e['version']}" for e in json.loads((PROJECT_PATH / SELECTION).read_text())]

    @task(task_id="reaudit-version")
    def audit_version(version: str) -> None:
        _run_kedro("reaudit_version", {"reaudit": {"version": version}})

    # the report is written even when a version's task failed: it marks that version as not audited
    @task(task_id="reaudit-gather", trigger_rule="all_done")
    def gather() -> None:
        _run_kedro("reaudit_gather")

    audited = audit_version.expand(version=prepare())
    audited >> gather()


beear_pipeline_reaudit()
