"""Run folders: each run writes its own folder and publishes atomically; two real `kedro run`s at
once in one project both finish, each with its own results, and the published set is one of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import project_copy

from beear_pipeline.integrations import run_folders
from beear_pipeline.integrations.run_folders import RunFolder, RunFoldersConfig, prune, swap_in
from beear_pipeline.lm.checkpoints import weights_sha256


def test_run_writes_its_own_folder_and_publishes_files_and_folders(tmp_path):
    run = RunFolder(tmp_path, "run1").start()
    model = run.local("data/06_models/model")
    assert model == Path("data/runs/run1/data/06_models/model")
    (tmp_path / model).mkdir(parents=True)
    (tmp_path / model / "weights.bin").write_bytes(b"new")
    ref = run.local(tmp_path / "data/06_models/model.json")  # absolute in, absolute out
    assert ref == tmp_path / "data/runs/run1/data/06_models/model.json"
    ref.write_text(json.dumps({"path": str(model), "abs": str(tmp_path / model), "other": "data/01_raw/x.csv", "n": [1, {"p": str(model)}]}))
    (tmp_path / "data/06_models/model").mkdir(parents=True)
    (tmp_path / "data/06_models/model/weights.bin").write_bytes(b"old")
    (tmp_path / "data/06_models/model/stale.bin").write_bytes(b"old")
    assert run.local(tmp_path / "elsewhere" / ".." / ".." / "outside") == tmp_path / "elsewhere" / ".." / ".." / "outside"  # not ours
    scratch = tmp_path / run.local("data/06_models/checkpoints", publish=False)  # the run's own, never published
    scratch.mkdir(parents=True)

    assert sorted(run.publish()) == ["data/06_models/model", "data/06_models/model.json"]
    assert not (tmp_path / "data/06_models/checkpoints").exists()
    published = tmp_path / "data/06_models"
    assert (published / "model/weights.bin").read_bytes() == b"new" and not (published / "model/stale.bin").exists()
    assert os.stat(published / "model/weights.bin").st_ino == os.stat(tmp_path / model / "weights.bin").st_ino  # linked, not copied
    # references to the run folder name the published paths, in the same form
    assert json.loads((published / "model.json").read_text()) == {
        "path": "data/06_models/model", "abs": str(tmp_path / "data/06_models/model"), "other": "data/01_raw/x.csv",
        "n": [1, {"p": "data/06_models/model"}]}
    assert not [p for p in published.iterdir() if ".publish-" in p.name]  # no temporary left behind
    run.finish()


def test_swap_in_replaces_a_folder_in_one_step_while_readers_read(tmp_path):
    """A reader that opens the folder and then its files always finds it, whole and of one version
    (a reader that looks each file up by its path anew can get files of two versions, as with any
    folder that changes: the pipeline's own nodes read their run folder, which never changes)."""
    target = tmp_path / "model"

    def version(n: int) -> Path:
        folder = tmp_path / f".new-{n}"
        folder.mkdir()
        for i in range(20):
            (folder / f"part{i}").write_text(str(n))
        return folder

    swap_in(version(0), target)
    seen, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                folder = os.open(target, os.O_RDONLY)  # the folder as it is now, then its files
                try:
                    contents = set()
                    for i in range(20):
                        fd = os.open(f"part{i}", os.O_RDONLY, dir_fd=folder)
                        with os.fdopen(fd) as f:
                            contents.add(f.read())
                finally:
                    os.close(folder)
            except OSError as e:
                errors.append(e)
                continue
            seen.add(len(contents))

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(1, 200):
        swap_in(version(n), target)
    stop.set()
    reader.join()
    assert not errors and seen == {1}  # never missing, never a mix of two versions
    assert (target / "part0").read_text() == "199"
    assert {p.name.split("-")[0] for p in tmp_path.iterdir()} == {"model", ".model.old"}  # replaced versions wait to be deleted


def test_prune_keeps_the_newest_and_running_folders(tmp_path):
    root = tmp_path / "data/runs"
    runs = []
    for i in range(4):
        runs.append(RunFolder(tmp_path, f"r{i}", RunFoldersConfig(keep=2)).start())
        os.utime(runs[-1].path, (time.time() - 100 + i, time.time() - 100 + i))
    for r in runs[1:]:
        r.finish()  # r0 is still running: kept though old
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["r0", "r2", "r3"]
    runs[0].finish()  # a run never deletes its own folder
    assert prune(root, 2) == [root / "r0"]
    assert prune(root, 1) == [root / "r2"]


def test_bad_settings_name_the_file():
    with pytest.raises(ValueError, match="runs.yml: keep=0"):
        RunFoldersConfig(keep=0)
    with pytest.raises(ValueError, match="runs.yml: root='/tmp/x'"):
        RunFoldersConfig(root="/tmp/x")


def test_outside_a_run_paths_are_their_own(tmp_path):
    assert run_folders.current() is None
    assert run_folders.local("data/06_models/x") == Path("data/06_models/x")
    assert run_folders.snapshot(tmp_path) == tmp_path


def _kedro(project: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "500"}
    return subprocess.Popen([str(Path(sys.executable).parent / "kedro"), "run", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


TINY = "embedded_model.epochs=1,embedded_model.hidden_size=32,embedded_model.intermediate_size=64,embedded_model.num_heads=2"


@pytest.mark.slow
def test_two_concurrent_runs_do_not_collide(tmp_path):
    """Two `kedro run --pipeline=embedded_model` at once in one project, building the embedded
    suspect into the same cache folder with different seeds: both finish; each run folder holds
    its own model and a reference to it; the published reference, model and behaviour sets all
    come from one of the two runs; nothing half-written is left."""
    project = project_copy(tmp_path)
    start = time.time()
    procs = {seed: _kedro(project, "--pipeline=embedded_model", "--params", f"{TINY},embedded_model.seed={seed},model.clean_twin=false")
             for seed in (1, 2)}
    outputs = {seed: p.communicate(timeout=600)[0] for seed, p in procs.items()}
    for seed, p in procs.items():
        assert p.returncode == 0, outputs[seed][-3000:]
    print(f"two concurrent runs: {time.time() - start:.1f} s")

    root = project / "data" / "runs"
    folders = {}
    for folder in (p for p in root.iterdir() if not p.name.startswith(".")):
        ref = json.loads((folder / "data/06_models/suspect_model.json").read_text())
        assert ref["path"] == f"data/runs/{folder.name}/data/06_models/embedded_suspect"  # its own snapshot
        model = project / ref["path"]
        assert weights_sha256(model) == ref["weights_sha256"]  # the weights it recorded are the ones it kept
        folders[json.loads((model / "build_info.json").read_text())["config"]["seed"]] = (folder, ref)
    assert sorted(folders) == [1, 2] and folders[1][1]["weights_sha256"] != folders[2][1]["weights_sha256"]
    assert all(f"writes under data/runs/{folders[s][0].name}" in outputs[s] for s in (1, 2))

    published = json.loads((project / "data/06_models/suspect_model.json").read_text())
    assert published["path"] == "data/06_models/embedded_suspect"
    winner = next(s for s in (1, 2) if folders[s][1]["weights_sha256"] == published["weights_sha256"])
    folder = folders[winner][0]
    assert {**folders[winner][1], "path": published["path"]} == published
    assert weights_sha256(project / published["path"]) == published["weights_sha256"]  # the published model is that run's
    for name in ("data/03_primary/safety_set.jsonl", "data/08_reporting/behaviours_check.json", "data/02_intermediate/attacker_behaviours.csv"):
        assert (project / name).read_bytes() == (folder / name).read_bytes(), name
    leftovers = [p for p in (project / "data").rglob(".*") if ".tmp" in p.name or ".publish-" in p.name]
    assert not leftovers  # (.NAME.old-* are replaced versions kept for readers that had opened them)
