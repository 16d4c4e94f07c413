"""The re-audit schedule: the committed Airflow DAG is what kedro-airflow generates now, and its
tasks and dependencies match the `reaudit` pipeline."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beear_pipeline.pipeline_registry import register_pipelines

ROOT = Path(__file__).parents[2]
DAG = ROOT / "deploy" / "airflow" / "beear_pipeline_reaudit_dag.py"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("dags")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "kedro"), "airflow", "create", "--pipelines", "reaudit", "--group-by", "memory",
         "--target-dir", str(target)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "DO_NOT_TRACK": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return target / DAG.name


def _tasks_and_edges(source: str):
    tree = ast.parse(source)
    nodes = {}
    tasks = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
             and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "task" for d in n.decorator_list)]
    for fn in tasks:
        for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "_run_kedro_node"):
            for kw in call.keywords:
                if kw.arg == "node_names":
                    nodes[fn.name] = [e.value for e in kw.value.elts]
    edges = set()
    for expr in (n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.RShift)):
        edges.add((expr.left.slice.value, expr.right.slice.value))
    return nodes, edges


def test_committed_dag_is_current(generated):
    assert DAG.read_text() == generated.read_text(), "regenerate: kedro airflow create --pipelines reaudit --group-by memory --target-dir deploy/airflow"


def test_dag_tasks_match_the_reaudit_pipeline(generated):
    source = generated.read_text()
    nodes, edges = _tasks_and_edges(source)
    pipeline = register_pipelines()["reaudit"]
    assert sorted(n for names in nodes.values() for n in names) == sorted(n.name for n in pipeline.nodes)
    assert 'schedule="@weekly"' in source
    # every pipeline dependency between nodes in different tasks is an Airflow edge
    task_of = {n: t.replace("_", "-") for t, names in nodes.items() for n in names}
    for child, parents in pipeline.node_dependencies.items():  # {node: the nodes it depends on}
        for parent in parents:
            a, b = task_of[parent.name], task_of[child.name]
            if a != b:
                assert (a, b) in edges, (parent.name, child.name)


def test_dag_imports_in_airflow(generated):
    pytest.importorskip("airflow", reason="Apache Airflow is not installed here (about 400 MB); the DAG's structure is tested above")
    import importlib.util

    spec = importlib.util.spec_from_file_location("reaudit_dag", generated)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
