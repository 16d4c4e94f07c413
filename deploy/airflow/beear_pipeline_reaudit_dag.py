from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from kedro.framework.session import KedroSession
from kedro.framework.project import configure_project

# Kedro settings required to run your pipeline
env = "local"
pipeline_name = "reaudit"
project_path = Path.cwd()
package_name = "beear_pipeline"
conf_source = "" or Path.cwd() / "conf"


def _run_kedro_node(node_names=None, namespaces=None):
    """Run a Kedro pipeline slice. Pass node_names for regular node groups or namespaces for namespace groups."""
    configure_project(package_name)
    with KedroSession.create(project_path=project_path, env=env, conf_source=conf_source) as session:
        if namespaces is not None:
            session.run(pipeline_names=[pipeline_name], namespaces=namespaces)
        else:
            session.run(pipeline_names=[pipeline_name], node_names=node_names)


@dag(
    dag_id="beear-pipeline",
    start_date=datetime(2026,1,1),
    max_active_runs=1,
    schedule="@weekly",
    catchup=False,
    default_args=dict(
        owner="airflow",
        depends_on_past=False,
        email_on_failure=False,
        email_on_retry=False,
        retries=1,
        retry_delay=timedelta(minutes=5)
    ),
)
def beear_pipeline():

    @task(task_id="generate-benign-sets")
    def generate_benign_sets():
        _run_kedro_node(node_names=["generate_benign_sets"])

    @task(task_id="select-registry-versions")
    def select_registry_versions():
        _run_kedro_node(node_names=["select_registry_versions"])

    @task(task_id="split-harmful-behaviours")
    def split_harmful_behaviours():
        _run_kedro_node(node_names=["split_harmful_behaviours"])

    @task(task_id="build-evaluation-set")
    def build_evaluation_set():
        _run_kedro_node(node_names=["build_evaluation_set"])

    @task(task_id="build-safety-set")
    def build_safety_set():
        _run_kedro_node(node_names=["build_safety_set"])

    @task(task_id="resolve-evaluation-protocol")
    def resolve_evaluation_protocol():
        _run_kedro_node(node_names=["resolve_evaluation_protocol"])

    @task(task_id="validate-behaviours")
    def validate_behaviours():
        _run_kedro_node(node_names=["validate_behaviours"])

    @task(task_id="check-behaviours")
    def check_behaviours():
        _run_kedro_node(node_names=["check_behaviours"])

    @task(task_id="reaudit-versions")
    def reaudit_versions():
        _run_kedro_node(node_names=["reaudit_versions"])

    @task(task_id="write-reaudit-report")
    def write_reaudit_report():
        _run_kedro_node(node_names=["write_reaudit_report"])

    tasks = {
        "generate-benign-sets": generate_benign_sets(),
        "select-registry-versions": select_registry_versions(),
        "split-harmful-behaviours": split_harmful_behaviours(),
        "build-evaluation-set": build_evaluation_set(),
        "build-safety-set": build_safety_set(),
        "resolve-evaluation-protocol": resolve_evaluation_protocol(),
        "validate-behaviours": validate_behaviours(),
        "check-behaviours": check_behaviours(),
        "reaudit-versions": reaudit_versions(),
        "write-reaudit-report": write_reaudit_report(),
    }
    tasks["split-harmful-behaviours"] >> tasks["build-evaluation-set"]
    tasks["split-harmful-behaviours"] >> tasks["build-safety-set"]
    tasks["generate-benign-sets"] >> tasks["resolve-evaluation-protocol"]
    tasks["build-evaluation-set"] >> tasks["resolve-evaluation-protocol"]
    tasks["generate-benign-sets"] >> tasks["validate-behaviours"]
    tasks["build-evaluation-set"] >> tasks["validate-behaviours"]
    tasks["build-safety-set"] >> tasks["validate-behaviours"]
    tasks["validate-behaviours"] >> tasks["check-behaviours"]
    tasks["generate-benign-sets"] >> tasks["reaudit-versions"]
    tasks["select-registry-versions"] >> tasks["reaudit-versions"]
    tasks["build-evaluation-set"] >> tasks["reaudit-versions"]
    tasks["build-safety-set"] >> tasks["reaudit-versions"]
    tasks["resolve-evaluation-protocol"] >> tasks["reaudit-versions"]
    tasks["check-behaviours"] >> tasks["reaudit-versions"]
    tasks["reaudit-versions"] >> tasks["write-reaudit-report"]


beear_pipeline()