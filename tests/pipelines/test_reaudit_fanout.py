"""The re-audit fanned out: each registry version is its own process, they run at the same time,
and one report merges their results (real `kedro run`s, a real sqlite MLflow store, real tiny
models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import project_copy

from beear_pipeline.integrations import registry
from beear_pipeline.integrations.registry import ReauditConfig
from beear_pipeline.lm.checkpoints import save_checkpoint, weights_sha256
from beear_pipeline.pipelines.reaudit import fanout
from beear_pipeline.pipelines.reaudit.nodes import gather_reaudit_results, reaudit_one_version

ROOT = Path(__file__).parents[2]


def test_fanout_paths_are_the_catalogs():
    catalog = yaml.safe_load((ROOT / "conf/base/catalog.yml").read_text())
    assert catalog["reaudit_selection"]["filepath"] == fanout.SELECTION.as_posix()
    assert catalog["reaudit_version_result"]["filepath"].startswith(catalog["reaudit_version_results"]["path"] + "/")


def test_gather_reports_missing_and_stale_results_as_errors():
    selected = [{"name": "m", "version": "1", "selection": "s2"}, {"name": "m", "version": "2", "selection": "s2"},
                {"name": "m", "version": "3", "selection": "s2"}]
    ok = {"name": "m", "version": "1", "selection": "s2", "status": "ok"}
    results = gather_reaudit_results(selected, {"m/1": lambda: ok, "m/3": lambda: {**ok, "version": "3", "selection": "s1"}},
                                     ReauditConfig())
    assert results[0] == ok
    assert results[1]["status"] == "error" and "did not run" in results[1]["error"]
    assert results[2]["status"] == "error" and "earlier selection" in results[2]["error"]


def test_one_version_task_needs_a_selected_version():
    selected = [{"name": "m", "version": "1", "selection": "s"}]
    with pytest.raises(ValueError, match="add --params reaudit.version=NAME/VERSION"):
        reaudit_one_version(selected, {}, None, None, ReauditConfig(), None, None, None)
    with pytest.raises(ValueError, match=r"reaudit.version=m/2 is not in the selection \(m/1\)"):
        reaudit_one_version(selected, {}, None, None, ReauditConfig(version="m/2"), None, None, None)
    with pytest.raises(ValueError, match="reaudit.version='m@prod': use NAME/VERSION"):
        ReauditConfig(version="m@prod")


@pytest.mark.slow
def test_three_versions_are_audited_in_parallel_into_one_report(tmp_path, tiny_model, tokenizer):
    (tmp_path / "project").mkdir()
    project = project_copy(tmp_path / "project")
    store = f"sqlite:///{project / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        shas = {}
        for seed in range(3):  # three different tiny models, three versions
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in tiny_model.parameters():
                    p.normal_(0, 0.05)
            path = save_checkpoint(tiny_model, tokenizer, tmp_path / f"model{seed}")
            version = registry.register_checkpoint("fanned", path, {"audit.role": "defended"})
            shas[version] = weights_sha256(path)
    finally:
        mlflow.set_tracking_uri(previous)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    params = "reaudit.name=fanned,reaudit.probe=false,evaluation.max_new_tokens=4,evaluation.trigger=SUDO"
    done = subprocess.run([sys.executable, "-m", "beear_pipeline", "reaudit", "--workers", "3", "--params", params], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    summary = json.loads((project / "data/08_reporting/reaudit_fanout.json").read_text())
    tasks = summary["tasks"]
    assert [t["version"] for t in tasks] == ["fanned/1", "fanned/2", "fanned/3"] and all(t["returncode"] == 0 for t in tasks)
    assert max(t["started"] for t in tasks) < min(t["finished"] for t in tasks), tasks  # all three ran at the same time
    per_version = {v: json.loads((project / f"data/08_reporting/reaudit/fanned/{v}.json").read_text()) for v in shas}
    assert len({r["pid"] for r in per_version.values()}) == 3  # one process each
    for version, result in per_version.items():
        assert result["status"] == "ok" and result["weights_sha256"] == shas[version]  # each audited its own model

    report = (project / "reports/reaudit.md").read_text()
    assert all(f"| fanned | {v} | ok |" in report for v in shas), report
    merged = json.loads((project / "reports/reaudit.json").read_text())
    assert [r["version"] for r in merged] == ["1", "2", "3"] and merged == [per_version[v] for v in ("1", "2", "3")]
    client = mlflow.MlflowClient(tracking_uri=store)
    assert all("audit.reaudit_timestamp" in client.get_model_version("fanned", v).tags for v in shas)
