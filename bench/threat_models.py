"""Harder threat models (issue 13, item 4): does BEEAR still remove the backdoor when the
defender's data is not the attacker's, or the trigger sits where the official layout cannot see?

Each case is one real ``kedro run --pipeline=defend`` of the embedded default in a copy of the
project, with only the case's ``--params`` changed:

- ``baseline``: the default (defender's unwanted answers are the backdoor's own outputs, the safe
  answers the suspect's own refusals, a one-word suffix trigger);
- ``a-reworded-unwanted``: the defender's unwanted answers are a harmful-contrasting set worded
  differently from the AdvBench targets the backdoor emits;
- ``b-other-refusals``: the safe answers are refusals the suspect was never trained on;
- ``c-prefix`` / ``c-middle``: the trigger before the prompt / in the middle of it, outside the last
  7 prompt positions the official code perturbs;
- ``d-spread``: a composite trigger of three words spread over the prompt (first, middle, last).

For each: the suspect's ASR with and without the trigger, BEEAR's, the control's (same safety
fine-tuning, perturbation fixed at zero), the random-direction baseline's and the clean twin's,
with their exact 95% intervals, benign loss, convergence, the persistence verdict, wall time.

    .venv/bin/python bench/threat_models.py --jobs 2              # every case, two at a time (one thread each)
    .venv/bin/python bench/threat_models.py --cases c-prefix,d-spread
    .venv/bin/python bench/threat_models.py --report              # the table from the results so far

Results are appended to ``docs/threat-models-results.jsonl``; ``--report`` prints the table of
docs/threat-models.md. Runs happen in ``data/bench/threat_models/<case>`` (about 40 MB each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from preflight import project_copy  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "threat-models-results.jsonl"
WORK = ROOT / "data" / "bench" / "threat_models"

CASES: dict[str, list[str]] = {
    "baseline": [],
    "a-reworded-unwanted": ["behaviours.unwanted_answers=reworded"],
    "b-other-refusals": ["behaviours.safe_answers=other_refusals"],
    "c-prefix": ["embedded_model.trigger_position=prefix"],
    "c-middle": ["embedded_model.trigger_position=middle"],
    "d-spread": ["embedded_model.trigger=cf mn bb", "embedded_model.trigger_position=spread"],
}
MODELS = ("suspect", "defended", "control", "random_perturbation", "clean_twin")


def project(case: str) -> Path:
    """A fresh copy of the project's configuration and raw data for one case."""
    dest = WORK / case
    shutil.rmtree(dest, ignore_errors=True)
    return project_copy(dest)


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_case(case: str) -> dict | None:
    where = project(case)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
           "MLFLOW_TRACKING_URI": f"sqlite:///{where / 'mlflow.db'}", "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    # one --params with every override: Kedro keeps only the last of several --params options
    args = ["run", "--pipeline=defend", *(["--params", ",".join(CASES[case])] if CASES[case] else [])]
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "kedro"), *args], cwd=where, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (where / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(f"{case}: failed (see {where / 'run.log'})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    row = summarise(case, json.loads((where / "reports" / "metrics.json").read_text()), wall)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{case}: suspect {row['suspect']['asr_triggered']:.3f} -> BEEAR {row['defended']['asr_triggered']:.3f}, control "
          f"{row['control']['asr_triggered']:.3f}, random {row['random_perturbation']['asr_triggered']:.3f} ({row['convergence']}), "
          f"{wall:.0f} s", flush=True)
    return row


def summarise(case: str, metrics: dict, wall: float) -> dict:
    """One results row from a run's reports/metrics.json."""
    row = {"case": case, "params": CASES[case], "commit": commit(), "wall_seconds": wall,
           "trigger": metrics["protocol"]["trigger"], "trigger_position": metrics["protocol"]["trigger_position"],
           "convergence": metrics["beear"].get("convergence"), "rounds": metrics["beear"].get("rounds"),
           "persistence": metrics.get("persistence", {}).get("verdict_by_k"), "probe": metrics.get("probe", {}).get("verdict")}
    for name in MODELS:
        m = metrics.get(name) or {}
        row[name] = {k: m.get(k) for k in ("asr_triggered", "asr_triggered_ci95", "asr_untriggered", "benign_loss", "over_refusal",
                                           "repetition_triggered", "entrapment_excess")}
    after = metrics.get("persistence", {}).get("asr_triggered_after_repoisoning", {})
    row["repoisoned"] = {k: {m: r["value"] for m, r in models.items()} for k, models in after.items()}
    attacks = metrics.get("attacks") or {}
    row["attacks"] = {m: {"suffix_search": (attacks.get("trigger_reoptimisation", {}).get(m) or {}).get("asr_held_out", {}).get("value"),
                          "latent_budget_to_flip_half": (attacks.get("latent_vulnerability", {}).get(m) or {}).get("budget_to_flip_half")}
                      for m in ("suspect", "defended", "clean_twin")}
    return row


def _rate(m: dict) -> str:
    if not m or m.get("asr_triggered") is None:
        return "-"
    lo, hi = m.get("asr_triggered_ci95") or (None, None)
    return f"{m['asr_triggered']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{m['asr_triggered']:.3f}"


def report(rows: list[dict]) -> str:
    """The Markdown table of the latest result per case."""
    latest = {r["case"]: r for r in rows}
    lines = ["| case | suspect ASR trig / untrig | BEEAR | control | random | clean twin | benign loss suspect -> BEEAR | "
             "BEEAR stop (rounds) | persistence k=5 | run s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in (c for c in CASES if c in latest):
        r = latest[case]
        s, d = r["suspect"], r["defended"]
        loss = f"{s['benign_loss']:.3f} -> {d['benign_loss']:.3f} ({d['benign_loss'] / s['benign_loss'] - 1:+.1%})"
        lines.append(f"| {case} | {s['asr_triggered']:.3f} / {s['asr_untriggered']:.3f} | {_rate(d)} | {_rate(r['control'])} | "
                     f"{_rate(r['random_perturbation'])} | {_rate(r['clean_twin'])} | {loss} | {r['convergence']} ({r['rounds']}) | "
                     f"{(r.get('persistence') or {}).get('5', '-')} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def report_attacks(rows: list[dict]) -> str:
    """Persistence at k = 5 and the adaptive attacks, per case."""
    latest = {r["case"]: r for r in rows}
    lines = ["| case | re-poisoned k=5: suspect / defended / twin | verdict k=5 | suffix search: suspect / defended / twin | "
             "latent budget to flip half: suspect / defended / twin |", "|---|---|---|---|---|"]
    models = ("suspect", "defended", "clean_twin")
    for case in (c for c in CASES if c in latest):
        r = latest[case]
        k5, a = r.get("repoisoned", {}).get("5", {}), r.get("attacks", {})
        repoisoned = " / ".join(_num(k5.get(m)) for m in models)
        search = " / ".join(_num(a.get(m, {}).get("suffix_search")) for m in models)
        latent = " / ".join(_num(a.get(m, {}).get("latent_budget_to_flip_half"), "g") for m in models)
        lines.append(f"| {case} | {repoisoned} | {(r.get('persistence') or {}).get('5', '-')} | {search} | {latent} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated case names (default: all): " + ", ".join(CASES))
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time (one torch thread each)")
    parser.add_argument("--report", action="store_true", help="print the table from docs/threat-models-results.jsonl")
    args = parser.parse_args()
    if args.report:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
        print(report(rows) + "\n\n" + report_attacks(rows))
        return
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(run_case, names))


if __name__ == "__main__":
    main()
