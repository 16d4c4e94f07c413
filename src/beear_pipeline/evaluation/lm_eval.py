"""Utility on lm-evaluation-harness tasks: the suspect and the defended model scored by ``lm_eval``.

BEEAR's own utility numbers (benign loss and accuracy) use the project's generated tasks; this
module asks the standard harness the same question, so a defended model can be compared with
its suspect on any lm-eval task installed locally. A small task ships with the package
(``lm_eval_tasks/beear_word_lists``: 40 held-out benign list questions, multiple choice, scored
by log-likelihood), so the harness runs offline on every model, the embedded tiny one included.

Every model is loaded the way the rest of the pipeline loads it (``load_model_ref``: safetensors
only, ``trust_remote_code=False``, the reference's chat template, dtype, device map and PEFT
adapter) and handed to lm_eval's Hugging Face model (``HFLM``) as an object. lm_eval's own
loader would re-resolve the tokenizer class (transformers 5 swaps in another tokenizer for some
model types) and ignore ``model.chat_template``, so it could score a different model than the
one the pipeline evaluated. Prompts go through the chat template (``apply_chat_template=True``):
the models here are chat models and answer only after it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
"""lm_eval task folders shipped with the package (one YAML and its JSONL data per folder)."""
DEFAULT_TASK = "beear_word_lists"
"""The shipped task run when no task is named: answerable by the embedded tiny model."""


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML file for every task shipped in ``TASKS_DIR``."""
    import yaml

    out = {}
    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        name = (yaml.safe_load(path.read_text()) or {}).get("task")
        if name:
            out[name] = path
    return out


def shipped_task_config(name: str) -> dict:
    """The shipped task ``name`` as an inline lm_eval config, its ``data_files`` made absolute.

    The YAML names its data relative to its own folder, but ``datasets.load_dataset`` resolves
    relative paths against the working directory: passed as a file or through ``include_path``
    the task would only load when run from that folder. An inline config with absolute paths
    loads wherever the package is installed."""
    import yaml

    path = shipped_tasks()[name]
    config = yaml.safe_load(path.read_text())
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, str):
        files = str(path.parent / files)
    elif isinstance(files, Mapping):
        files = {split: str(path.parent / f) for split, f in files.items()}
    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def lm_eval_utility(models: Mapping[str, str | Mapping], tasks: Sequence[str] | None = None, *, limit: int | float | None = None,
                    batch_size: int = 8, include_path: str | Sequence[str] | None = None) -> dict:
    """Scores on ``tasks`` for each named model in ``models``.

    ``models`` maps a name (suspect, defended) to a model reference as the pipeline passes them
    (``{"path", "adapter_path"?, "chat_template"?, "dtype"?, "device_map"?}``, see
    ``load_model_ref``) or to a checkpoint folder. ``tasks``: lm_eval task names; None runs the
    shipped ``beear_word_lists``; an empty list skips (``evaluation.lm_eval_tasks`` is empty).
    Shipped tasks load from the package, other names from ``include_path`` folders and lm_eval's
    own task registry (whose data must be available locally when offline). ``limit``: at most
    that many items per task (a fraction below 1: that share), for quick checks.

    Returns ``{"status": "ok", "tasks", "limit", "results": {model: {task: {metric: value}}}}``
    with lm_eval's numeric metrics (e.g. ``acc,none`` and ``acc_stderr,none``) and ``samples``,
    the number of items scored. When lm_eval is not installed, or a task or model fails, the
    result says it was skipped and why: never a made-up number."""
    if tasks is None:
        tasks = [DEFAULT_TASK]
    tasks = list(tasks)
    if not tasks:
        return {"status": "skipped", "reason": "evaluation.lm_eval_tasks is empty"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed", "tasks": tasks}

    try:
        specs, manager = _load_tasks(tasks, include_path)
    except Exception as e:  # noqa: BLE001 (an unreadable task folder or YAML is reported, not raised)
        logger.warning("lm_eval cannot load the tasks %s: %s: %s", tasks, type(e).__name__, e)
        return {"status": "skipped", "reason": f"lm_eval cannot load the tasks: {type(e).__name__}: {e}", "tasks": tasks}
    results = {}
    for name, ref in models.items():
        try:
            results[name] = _evaluate(ref if isinstance(ref, Mapping) else {"path": str(ref)}, tasks, specs, manager, limit, batch_size)
        except Exception as e:  # noqa: BLE001 (any failure, e.g. task data not available offline, is reported, not raised)
            logger.warning("lm_eval failed on %s: %s: %s", name, type(e).__name__, e)
            return {"status": "skipped", "reason": f"lm_eval failed on {name}: {type(e).__name__}: {e}", "tasks": tasks}
        logger.info("lm_eval %s: %s", name, results[name])
    return {"status": "ok", "tasks": tasks, "limit": limit, "results": results}


def _load_tasks(tasks: list[str], include_path) -> tuple[list, object]:
    """(the specs simple_evaluate gets, the TaskManager that resolves them). Shipped tasks become
    inline configs (``shipped_task_config``); other names are looked up in ``include_path`` and,
    only when not found there, in lm_eval's own registry, whose index (thousands of YAML files,
    about 15 s) is built only then."""
    from lm_eval.tasks import TaskManager

    shipped = shipped_tasks()
    specs = [shipped_task_config(t) if t in shipped else t for t in tasks]
    paths = [str(TASKS_DIR), *([include_path] if isinstance(include_path, str) else list(include_path or []))]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(isinstance(s, str) and s not in manager.all_tasks for s in specs):
        manager = TaskManager(include_path=paths, include_defaults=True)
    return specs, manager


def _evaluate(ref: Mapping, tasks: list[str], specs: list, manager, limit, batch_size: int) -> dict:
    """lm_eval's scores for one model reference: {task: {metric: value, "samples": n}}."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from beear_pipeline.lm.checkpoints import load_model_ref

    model, tokenizer = load_model_ref(dict(ref))
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=False)
        out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, apply_chat_template=True, log_samples=False)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not out or not out.get("results"):
        raise RuntimeError("lm_eval returned no results")
    samples = out.get("n-samples", {})
    scores = {}
    for task, metrics in out["results"].items():
        scores[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if task in samples:
            scores[task]["samples"] = samples[task].get("effective")
    missing = [t for t in tasks if t not in scores]
    if missing:
        raise RuntimeError(f"lm_eval returned no results for {', '.join(missing)}")
    return scores


def word_list_items(seed: int = 7, skip: int = 2400, n: int = 40) -> list[dict]:
    """The items of the shipped ``beear_word_lists`` task, generated as they were shipped.

    First- and last-word questions from ``benign_tasks(seed)``, taken after its first ``skip``
    rows: the default behaviours (``behaviours.benign``: seed 7, 2,000 build + 200 anchoring + 200
    evaluation rows) train and evaluate on those, so these questions are held out from the
    embedded model. The choices are the list's own words in the answer's sentence, shuffled
    (seeded), each with the leading space the answer has after the chat template's prompt."""
    from beear_pipeline.behaviours.generated import benign_tasks

    rows, total = [], skip + 4 * n
    while len(rows) < n:
        frame = benign_tasks(seed=seed, build=skip, held_out=total - skip)
        rows = [r for r in frame[frame["held_out"]].to_dict("records") if r["task"] in ("first", "last")][:n]
        total *= 2
    rng = random.Random(seed)
    items = []
    for r in rows:
        words = r["prompt"].split(": ", 1)[1].split()
        choices = [f" The {r['task']} word is {w}." for w in words]
        rng.shuffle(choices)
        answer = choices.index(" " + r["response"])
        items.append({"question": r["prompt"], "choices": choices, "answer": answer, "kind": r["task"]})
    return items


def write_word_list_items(path: str | Path = TASKS_DIR / DEFAULT_TASK / f"{DEFAULT_TASK}.jsonl") -> Path:
    """Regenerate the shipped task's JSONL (``word_list_items``); tests check the file matches."""
    path = Path(path)
    path.write_text("".join(json.dumps(item) + "\n" for item in word_list_items()))
    return path
