"""The re-audit schedule: the Airflow DAG maps one task per selected registry version over the
project's fan-out pipelines, with the schedule of conf/base/airflow.yml. Airflow itself is not
installed here (about 400 MB): the DAG's structure is read from its source, and the Kedro side of
its per-version task (runtime parameters naming the version's result file) runs for real."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import project_copy

from beear_pipeline.pipeline_registry import register_pipelines
from beear_pipeline.pipelines.reaudit import fanout

ROOT = Path(__file__).parents[2]
DAG = ROOT / "deploy" / "airflow" / "beear_pipeline_reaudit_dag.py"


def _tasks(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
            and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "task" for d in n.decorator_list)}


def _pipelines_run(fn: ast.FunctionDef) -> list[str]:
    return [c.args[0].value for c in ast.walk(fn) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "_run_kedro"]


def test_dag_fans_out_one_task_per_selected_version():
    source = DAG.read_text()
    tree = ast.parse(source)
    tasks = _tasks(tree)
    assert {name: _pipelines_run(fn) for name, fn in tasks.items()} == {
        "prepare": ["reaudit_prepare"], "audit_version": ["reaudit_version"], "gather": ["reaudit_gather"]}
    assert {p for fn in tasks.values() for p in _pipelines_run(fn)} <= set(register_pipelines())
    # audit_version is mapped over what prepare returns (the selection), and gather follows it
    expand = next(c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "expand")
    assert expand.func.value.id == "audit_version" and expand.keywords[0].arg == "version"
    assert getattr(expand.keywords[0].value.func, "id", "") == "prepare"
    assert "audited >> gather()" in source and 'trigger_rule="all_done"' in source
    assert f'SELECTION = "{fanout.SELECTION.as_posix()}"' in source
    # the per-version task passes the version as the runtime parameter reaudit.version
    assert 'runtime_params=runtime_params' in source and '{"reaudit": {"version": version}}' in source


def test_dag_schedule_is_the_configured_one():
    config = yaml.safe_load((ROOT / "conf/base/airflow.yml").read_text())["reaudit"]
    source = DAG.read_text()
    assert f'schedule="{config["schedule"]}"' in source and f"max_active_runs={config['max_active_runs']}" in source
    assert f"start_date=datetime({', '.join(map(str, config['start_date']))})" in source


KEDRO_SESSION = """
import json, sys
from pathlib import Path
from kedro.framework.project import configure_project
from kedro.framework.session import KedroSession
configure_project("beear_pipeline")
with KedroSession.create(project_path=Path.cwd(), env="local", runtime_params={"reaudit": {"version": "tiny/3"}}) as session:
    context = session.load_context()
    print("RESULT=" + json.dumps({"file": str(context.catalog.get("reaudit_version_result")._filepath),
                                  "version": context.params["reaudit"].version}))
"""


def test_the_version_tasks_session_names_the_versions_result_file(tmp_path):
    """What audit_version does in Airflow, up to running the node: a Kedro session with
    runtime_params {"reaudit": {"version": ...}} (in a fresh process: a session configures logging globally)."""
    project = project_copy(tmp_path)
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", KEDRO_SESSION], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT="))[len("RESULT="):])
    assert got == {"file": str(project / "data/08_reporting/reaudit/tiny/3.json"), "version": "tiny/3"}


def test_dag_imports_in_airflow():
    pytest.importorskip("airflow", reason="Apache Airflow is not installed here (about 400 MB); the DAG's structure is tested above")
    import importlib.util

    spec = importlib.util.spec_from_file_location("reaudit_dag", DAG)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
