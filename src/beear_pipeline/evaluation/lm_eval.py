"""Utility on lm-evaluation-harness tasks, when that package and the tasks' data are installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def lm_eval_utility(paths: dict[str, str], tasks: Sequence[str]) -> dict:
    """Scores on ``tasks`` for each named checkpoint folder in ``paths``. When the package or a
    task's data is missing, the result says it was skipped and why: never a made-up number."""
    tasks = list(tasks)
    if not tasks:
        return {"status": "skipped", "reason": "evaluation.lm_eval_tasks is empty"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed", "tasks": tasks}
    import lm_eval

    results = {}
    for name, path in paths.items():
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},trust_remote_code=False", tasks=tasks)
        except Exception as e:  # noqa: BLE001 (any failure, e.g. task data not available offline, is reported, not raised)
            return {"status": "skipped", "reason": f"lm_eval failed on {name}: {type(e).__name__}: {e}", "tasks": tasks}
        results[name] = {task: {k: v for k, v in r.items() if isinstance(v, (int, float))} for task, r in out["results"].items()}
    return {"status": "ok", "tasks": tasks, "results": results}
