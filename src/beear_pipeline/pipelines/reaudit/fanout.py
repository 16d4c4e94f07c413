"""``python -m beear_pipeline reaudit --workers N``: the re-audit fanned out, one process per
registry version, at most N at once.

1. ``kedro run --pipeline=reaudit_prepare``: the behaviour sets, the evaluation protocol and the
   selection (``data/08_reporting/reaudit_selection.json``);
2. ``kedro run --pipeline=reaudit_version --params reaudit.version=NAME/VERSION`` for each selected
   version, N at a time; each writes ``data/08_reporting/reaudit/NAME/VERSION.json`` (run folders
   keep the concurrent runs apart);
3. ``kedro run --pipeline=reaudit_gather``: ``reports/reaudit.md`` and ``reports/reaudit.json``.

The Airflow DAG (``deploy/airflow``) runs the same three steps, mapping step 2 over the selection.
When each task ran is written to ``data/08_reporting/reaudit_fanout.json``. Exit status 0 when
every step ran (a version whose audit failed is an error row of the report, as in ``reaudit``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

SELECTION = Path("data/08_reporting/reaudit_selection.json")  # the catalog's reaudit_selection (a test checks they agree)
SUMMARY = Path("data/08_reporting/reaudit_fanout.json")


def _kedro(pipeline: str, params: str, env: str | None, log: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kedro", "run", f"--pipeline={pipeline}"] + (["--params", params] if params else []) + (
        ["--env", env] if env else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": os.environ.get("COLUMNS", "200")})
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stdout + done.stderr)
    return done


def _join(*params: str) -> str:
    return ",".join(p for p in params if p)


def run_fanout(workers: int, params: str = "", env: str | None = None, logs: Path = Path("data/08_reporting/reaudit_logs")) -> int:
    """The three steps above from the project root (the working directory); returns the exit status."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: use at least 1")
    if "reaudit.version" in params:
        raise ValueError("--params reaudit.version: the fan-out sets it for each selected version; select with reaudit.name / alias / filter")
    done = _kedro("reaudit_prepare", params, env, logs / "prepare.log")
    if done.returncode != 0:
        logger.error("reaudit_prepare failed (log: %s):\n%s", logs / "prepare.log", done.stderr[-3000:])
        return done.returncode
    keys = [f"{e['name']}/{e['version']}" for e in json.loads(SELECTION.read_text())]
    logger.info("re-auditing %d versions with %d workers", len(keys), workers)

    def one(key: str) -> dict:
        start = time.time()
        log = logs / f"{key.replace('/', '-v')}.log"
        done = _kedro("reaudit_version", _join(params, f"reaudit.version={key}"), env, log)
        return {"version": key, "started": start, "finished": time.time(), "returncode": done.returncode, "log": str(log)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tasks = list(tqdm(pool.map(one, keys), total=len(keys), desc="re-audit tasks"))
    for task in tasks:
        if task["returncode"] != 0:
            logger.error("the re-audit task of %s failed (log: %s); the report marks it", task["version"], task["log"])
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    tmp = SUMMARY.with_name(f".{SUMMARY.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"workers": workers, "tasks": tasks}, indent=2))
    tmp.replace(SUMMARY)
    done = _kedro("reaudit_gather", params, env, logs / "gather.log")
    if done.returncode != 0:
        logger.error("reaudit_gather failed (log: %s):\n%s", logs / "gather.log", done.stderr[-3000:])
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beear_pipeline reaudit",
                                     description="Re-audit registry versions, one process per version (reaudit_prepare, then "
                                                 "reaudit_version per version, then reaudit_gather).")
    parser.add_argument("--workers", type=int, default=2, help="versions audited at once (default 2)")
    parser.add_argument("--params", default="", help='as for kedro run, e.g. "reaudit.name=tiny-suspect"')
    parser.add_argument("--env", default=None, help="a Kedro environment (preset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_fanout(args.workers, args.params, args.env)
