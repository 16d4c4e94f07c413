"""DVC sees the project's stages, in order, with their parameters (real DVC, no mocks)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
BIN = Path(sys.executable).parent  # the venv the tests run in


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def test_stages_run_the_kedro_pipelines_in_order():
    done = dvc("dag", "--md")
    assert done.returncode == 0, done.stderr
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["behaviours", "suspect", "defend"]
    assert {"reports/metrics.json": {"cache": False}} in stages["defend"]["metrics"]
    assert all(s["cmd"].startswith("kedro run --pipelines=") for s in stages.values())
    # mermaid: node ids are declared as nodeN["name"], edges as nodeA-->nodeB
    ids = {line.split("[")[0].strip(): line.split('"')[1] for line in done.stdout.splitlines() if '["' in line}
    edges = {(ids[a.strip()], ids[b.strip()]) for a, b in (line.split("-->") for line in done.stdout.splitlines() if "-->" in line)}
    assert {("behaviours", "suspect"), ("suspect", "defend"), ("behaviours", "defend")} <= edges


def test_declared_parameters_exist_in_the_parameter_files():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for entry in stage.get("params", []):
            for path, keys in entry.items():
                declared = yaml.safe_load((ROOT / path).read_text())
                assert set(keys) <= set(declared), (path, keys)


def test_metrics_live_in_a_git_tracked_folder():
    ignored = subprocess.run(["git", "check-ignore", "-q", "reports/metrics.json"], cwd=ROOT)
    assert ignored.returncode == 1, "reports/metrics.json must not be git-ignored, or `dvc exp show` shows '!'"
