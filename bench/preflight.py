"""Seconds from `kedro run --pipeline=defend` to the error, for a bad model path (issue 12, item 8).

Each case runs the real command in a fresh copy of the project (raw data and configuration only,
no tracking database yet: a first run on a fresh clone), ``--repeats`` times, interleaved with
the same command on the source tree of ``--before REV`` (a git revision before the preflight
hook) when given, so both are measured side by side under the same load. Reports the medians and
their ratio; results go to bench/results/preflight.json.

    .venv/bin/python bench/preflight.py --before 575b990 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEDRO = Path(sys.executable).parent / "kedro"


def project_copy(where: Path) -> Path:
    where.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", where)
    shutil.copytree(ROOT / "conf", where / "conf", ignore=shutil.ignore_patterns("local"))
    (where / "conf" / "local").mkdir()
    shutil.copytree(ROOT / "data" / "01_raw", where / "data" / "01_raw")
    (where / "src").mkdir()
    return where


def bad_checkpoints(where: Path) -> dict[str, str]:
    """A missing folder, a folder with pickle weights only, one without a tokenizer."""
    import torch

    pickled = where / "pickle-only"
    pickled.mkdir(parents=True)
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    no_tokenizer = where / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (no_tokenizer / "model.safetensors").write_bytes(b"")
    return {"missing folder": str(where / "nonexistent"), "pickle-only weights": str(pickled), "no tokenizer": str(no_tokenizer)}


def seconds(cwd: Path, path: str, source: Path | None) -> float:
    """One run in a fresh copy; ``source`` puts another revision's package first on the path."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    start = time.perf_counter()
    done = subprocess.run([str(KEDRO), "run", "--pipeline=defend", "--params", f"model.path={path},evaluation.trigger=SUDO"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert done.returncode != 0, "the run did not fail"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a git revision without the preflight hook, measured side by side")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = None
        if args.before:
            before = tmp / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True, capture_output=True)
        try:
            cases = bad_checkpoints(tmp / "checkpoints")
            results = {}
            for case, path in cases.items():
                times: dict[str, list[float]] = {"now": [], "before": []}
                for i in range(args.repeats):
                    times["now"].append(seconds(project_copy(tmp / f"now-{case}-{i}".replace(" ", "_")), path, None))
                    if before is not None:
                        times["before"].append(seconds(project_copy(tmp / f"before-{case}-{i}".replace(" ", "_")), path, before))
                row = {k: statistics.median(v) for k, v in times.items() if v}
                if "before" in row:
                    row["ratio"] = row["now"] / row["before"]
                results[case] = {**row, "runs": times}
                print(f"{case}: " + ", ".join(f"{k} {v:.1f}" + (" s" if k != "ratio" else "") for k, v in row.items()), flush=True)
        finally:
            if before is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    out = ROOT / "bench" / "results" / "preflight.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "before": args.before, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
