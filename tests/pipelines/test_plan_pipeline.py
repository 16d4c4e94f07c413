"""``kedro run --pipeline=plan``: the memory and disk plan from a folder that holds only a
config.json (no weights, no tokenizer), through the real CLI on a copy of the project, with the
plan written to its catalog datasets and its figures logged to the MLflow tracking database; then
the node alone on the embedded model and with ``plan.check``."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import project_copy, raw_params, typed_params

from beear_pipeline.lm.plan import PlanError
from beear_pipeline.pipeline_registry import register_pipelines
from beear_pipeline.pipelines.plan.nodes import plan_removal_run

ROOT = Path(__file__).resolve().parents[2]
LLAMA_2_7B = ROOT / "tests" / "data" / "configs" / "llama-2-7b" / "config.json"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project's configuration and raw data, so runs do not touch the checkout."""
    return project_copy(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    """Llama-2-7B's config.json and nothing else."""
    folder = tmp_path_factory.mktemp("llama-2-7b")
    shutil.copy(LLAMA_2_7B, folder / "config.json")
    return folder


def kedro_plan(project: Path, params: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "DO_NOT_TRACK": "1",
           "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "400"}
    return subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--pipeline=plan", "--params", params],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def logged_metrics(database: Path) -> dict[str, float]:
    """The metrics of the last run in an MLflow sqlite tracking database."""
    with sqlite3.connect(database) as db:
        run = db.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()[0]
        return dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run,)).fetchall())


def logged_params(database: Path) -> dict[str, str]:
    """The parameters of the last run in an MLflow sqlite tracking database."""
    with sqlite3.connect(database) as db:
        run = db.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()[0]
        return dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run,)).fetchall())


def test_plan_is_registered_apart_from_defend():
    pipelines = register_pipelines()
    assert [n.name for n in pipelines["plan"].nodes] == ["plan_removal_run"]
    assert "plan_removal_run" not in {n.name for n in pipelines["defend"].nodes}


def test_kedro_run_plans_a_config_only_checkpoint(project, config_only):
    done = kedro_plan(project, f"model.path={config_only},plan.device=cuda,plan.device_memory_gib=141,beear.batch_size=8,"
                               "beear.anchoring_batch_size=8,beear.trainable=lora")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| **peak device memory** |" in done.stdout  # printed for the user, not only logged
    report = json.loads((project / "data" / "08_reporting" / "plan.json").read_text())
    assert report["shape"]["parameters"] == 6_738_415_616 and report["shape"]["storage_dtype"] == "float16"
    assert report["beear"]["trainable"] == "lora" and report["device"] == "cuda" and report["sequence_length"] == 256
    assert report["fits"] is True and report["verdict"] == "It fits a 141 GiB cuda device."
    table = (project / "reports" / "plan.md").read_text()
    assert table.startswith(f"# Memory and disk plan: {config_only.name}") and "| weights | 12.70 GiB |" in table  # 12.55 fp16 + LoRA in fp32
    metrics = logged_metrics(project / "mlflow.db")
    assert metrics["plan.peak_device_gib"] == pytest.approx(report["peak_device_bytes"] / 2**30, abs=1e-3)
    assert metrics["plan.disk_gib"] == pytest.approx(report["disk_bytes"] / 2**30, abs=1e-3)
    assert metrics["plan.fits"] == 1.0 and metrics["plan.weights_gib"] == pytest.approx(12.7002, abs=1e-3)  # the peak part's weights: fp16 + fp32 LoRA
    # conf/base's beear.anchor_layer: null is logged as the layer used (the default scenario's 0.3 = layer 9 of 32) and its source
    params = logged_params(project / "mlflow.db")
    assert (params["beear.anchor_layer"], params["beear.anchor_layer_source"]) == ("0.3", "scenario jailbreak")
    assert report["anchor_layer"] == 9 and report["beear"]["anchor_layer"] == 0.3


def test_kedro_run_with_check_stops_naming_the_fix(project, config_only):
    done = kedro_plan(project, f"model.path={config_only},plan.device=cuda,plan.device_memory_gib=80,plan.check=true")
    assert done.returncode != 0
    output = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert "PlanError" in output and f"{config_only.name} will not fit" in output
    assert "Fix: beear.gradient_checkpointing=true ->" in output and "(fits)" in output


@pytest.fixture
def params():
    return typed_params(raw_params())


def test_the_embedded_model_is_planned_from_its_recipe(params, advbench, tmp_path):
    model = params["model"].__class__(embedded_directory=str(tmp_path / "not-built"))
    report, table = plan_removal_run(model, params["embedded_model"], params["beear"], params["plan"], advbench)
    assert report["source"] == "the embedded model's recipe (not built yet)" and report["shape"]["name"] == "embedded"
    shape = report["shape"]
    assert (shape["hidden"], shape["layers"], shape["intermediate"]) == (128, 4, 344) and 900 < shape["vocab"] < 1500
    assert report["peak_device_bytes"] < 3 * 2**30 and "| **disk needed** |" in table


def test_the_plan_is_made_at_the_scenarios_layer_when_the_anchor_layer_is_null(params, advbench, tmp_path):
    """conf/base's ``beear.anchor_layer: null``: the plan node resolves it through the scenario
    (code 0.6 = layer 2 of the embedded model's 4, jailbreak 0.3 = layer 1); a value given wins."""
    import dataclasses

    assert params["beear"].anchor_layer is None
    assert "params:scenario" in register_pipelines()["plan"].nodes[0].inputs
    model = params["model"].__class__(embedded_directory=str(tmp_path / "not-built"))

    def layer(beear, scenario):
        report, table = plan_removal_run(model, params["embedded_model"], beear, params["plan"], advbench, scenario)
        assert report["beear"]["anchor_layer"] is not None and f"anchor layer {report['anchor_layer']}" in table
        return report["anchor_layer"]

    assert layer(params["beear"], "jailbreak") == 1 and layer(params["beear"], "code") == 2
    assert layer(dataclasses.replace(params["beear"], anchor_layer=0.3), "code") == 1


def test_check_raises_with_the_fix(params, advbench, config_only):
    model = params["model"].__class__(path=str(config_only))
    plan = params["plan"].__class__(device="cuda", device_memory_gib=24, check=True)
    with pytest.raises(PlanError, match=r"device memory: .* Fix: .*beear.trainable=lora"):
        plan_removal_run(model, params["embedded_model"], params["beear"], plan, advbench)
