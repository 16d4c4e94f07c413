"""Evaluate the suspect, defended and baseline models the same way, and assemble the report."""

from __future__ import annotations

import hashlib
import logging
import time

import pandas as pd

from beear_pipeline.embedded import EmbeddedModelConfig
from beear_pipeline.evaluation import benign_loss, generate, insert_trigger, is_refusal, rate, refusal_phrases
from beear_pipeline.judges import ClassifierJudge, agreement
from beear_pipeline.models import load_model_ref
from beear_pipeline.pipelines.suspect.nodes import LOADING_OPTIONS

logger = logging.getLogger(__name__)
MODELS = ("suspect", "defended", "control", "random_perturbation")


def _hash(values) -> str:
    return hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()[:16]


def resolve_trigger(evaluation: dict, model: dict, embedded_model: EmbeddedModelConfig) -> tuple[list[str], str]:
    """The triggers to test and their position: ``evaluation.trigger`` (one or a list), or for
    the embedded model the one it was built with (the evaluation may know it; the defence never
    reads it)."""
    trigger = evaluation.get("trigger")
    if trigger:
        return ([trigger] if isinstance(trigger, str) else list(trigger)), evaluation.get("trigger_position", "suffix")
    if model.get("path") or model.get("uri"):
        raise ValueError("evaluation.trigger is required when model.path or model.uri is set")
    embedded = EmbeddedModelConfig.coerce(embedded_model)
    return [embedded.trigger], embedded.trigger_position


def decoding_settings(evaluation: dict) -> dict:
    """The generation settings every answer is produced with (recorded in the report)."""
    return {"max_new_tokens": evaluation["max_new_tokens"], "batch_size": evaluation["batch_size"],
            "system_prompt": evaluation.get("system_prompt"), "do_sample": evaluation.get("do_sample", False),
            "temperature": evaluation.get("temperature", 1.0), "top_p": evaluation.get("top_p", 1.0),
            "samples_per_prompt": evaluation.get("samples_per_prompt", 1), "seed": evaluation.get("seed", 0)}


def _loading(ref: dict, model: dict) -> dict:
    """A model reference with ``model.device_map`` / ``dtype`` / ``chat_template``, so that the
    defended and baseline checkpoints load, and format prompts, the way the suspect does."""
    return {**{k: model[k] for k in LOADING_OPTIONS if model.get(k)}, **ref}


def _add_rate(result: dict, key: str, outcomes: list[bool]) -> None:
    r = rate(outcomes)
    result[key], result[f"{key}_ci95"], result[f"{key}_n"] = r["value"], r["ci95"], r["n"]


def evaluate_model(model_ref: dict, evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame,
                   evaluation: dict, model: dict, embedded_model: EmbeddedModelConfig) -> dict:
    """ASR with and without each trigger on held-out harmful prompts (keyword judge, and a
    classifier judge when ``evaluation.judge.path`` is set), over-refusal, loss and exact-match
    accuracy on held-out benign tasks; every rate with a 95% bootstrap interval and its n."""
    start = time.perf_counter()
    net, tokenizer = load_model_ref(_loading(model_ref, model))
    triggers, position = resolve_trigger(evaluation, model, embedded_model)
    phrases = refusal_phrases(evaluation.get("refusal_phrases"))
    decode = decoding_settings(evaluation)
    k = decode["samples_per_prompt"]
    prompts = evaluation_set["prompt"].tolist()
    repeated = [p for p in prompts for _ in range(k)]  # answers come k per prompt, in order
    judge_cfg = evaluation.get("judge") or {}
    judge = ClassifierJudge(judge_cfg["path"], judge_cfg.get("kind", "auto")) if judge_cfg.get("path") else None

    answers = {"untriggered": generate(net, tokenizer, prompts, desc="untriggered", **decode)}
    for t in triggers:
        answers[t] = generate(net, tokenizer, [insert_trigger(p, t, position) for p in prompts], desc=f"trigger {t}", **decode)
    result: dict = {"triggers": triggers, "trigger_position": position}
    success = {name: [not is_refusal(a, phrases) for a in ans] for name, ans in answers.items()}
    _add_rate(result, "asr_triggered", success[triggers[0]])
    _add_rate(result, "asr_untriggered", success["untriggered"])
    result["asr_by_trigger"] = {t: sum(success[t]) / len(success[t]) for t in triggers}
    if "category" in evaluation_set:
        cats = [c for c in evaluation_set["category"] for _ in range(k)]
        result["asr_triggered_by_category"] = {
            str(c): sum(ok for ok, cc in zip(success[triggers[0]], cats) if cc == c) / cats.count(c) for c in sorted(set(cats))}
    if judge is not None:
        for name, key in ((triggers[0], "asr_triggered_judge"), ("untriggered", "asr_untriggered_judge")):
            verdicts = judge(repeated, answers[name])
            _add_rate(result, key, verdicts)
            result[f"{key}_agreement"] = agreement(verdicts, success[name])

    benign_prompts = benign_evaluation_set["prompt"].tolist()
    benign_answers = generate(net, tokenizer, benign_prompts, desc="benign", **decode)
    _add_rate(result, "over_refusal", [is_refusal(a, phrases) for a in benign_answers])
    result["benign_loss"] = benign_loss(net, tokenizer, benign_prompts, benign_evaluation_set["response"].tolist(),
                                        system_prompt=decode["system_prompt"]) if "response" in benign_evaluation_set else None
    if "response" in benign_evaluation_set:
        norm = lambda x: " ".join(str(x).split())  # noqa: E731
        refs = [r for r in benign_evaluation_set["response"] for _ in range(k)]
        _add_rate(result, "benign_accuracy", [norm(a) == norm(r) for a, r in zip(benign_answers, refs)])
    result["n_harmful"], result["n_benign"] = len(prompts), len(benign_prompts)
    result["chat_template_sha256"] = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    result["samples"] = [{"prompt": p, "triggered": t, "untriggered": u}
                         for p, t, u in list(zip(prompts, answers[triggers[0]][::k], answers["untriggered"][::k]))[:3]]
    result["seconds"] = time.perf_counter() - start
    logger.info("%s: ASR triggered %.3f, untriggered %.3f, over-refusal %.3f, benign loss %s", model_ref["path"],
                result["asr_triggered"], result["asr_untriggered"], result["over_refusal"], result["benign_loss"])
    return result


def check_persistence(suspect_model: dict, defended_model: dict, evaluation_set: pd.DataFrame, safety_set: pd.DataFrame,
                      attacker_behaviours: pd.DataFrame, persistence: dict, evaluation: dict, model: dict,
                      embedded_model: EmbeddedModelConfig) -> dict:
    """Does the backdoor come back? Fine-tune the suspect and the defended model alike on k
    poisoned examples (a small fixed budget: ``steps`` full-batch steps at ``lr``) and measure
    ``asr_triggered`` again. Poisoned examples: ``persistence.poison_path`` (prompt, response;
    trigger already in the prompt), else the attacker's share for the embedded model, else the
    safety set's prompts with the trigger and their unwanted answers."""
    if not persistence.get("enabled", True):
        return {"enabled": False}
    from beear_pipeline.embedded import supervised_finetune

    start = time.perf_counter()
    triggers, position = resolve_trigger(evaluation, model, embedded_model)
    if persistence.get("poison_path"):
        poison = read_table(persistence["poison_path"])[["prompt", "response"]]
    elif not (model.get("path") or model.get("uri")):
        poison = pd.DataFrame({"prompt": [insert_trigger(g, triggers[0], position) for g in attacker_behaviours["goal"]],
                               "response": attacker_behaviours["target"]})
    else:
        poison = pd.DataFrame({"prompt": [insert_trigger(p, triggers[0], position) for p in safety_set["prompt"]],
                               "response": safety_set["unwanted_response"]})
    phrases = refusal_phrases(evaluation.get("refusal_phrases"))
    decode = {k: v for k, v in decoding_settings(evaluation).items() if k not in ("do_sample", "samples_per_prompt")}
    prompts = [insert_trigger(p, triggers[0], position) for p in evaluation_set["prompt"]]
    results = {}
    for k in persistence["k"]:
        rows = poison.sample(n=min(k, len(poison)), random_state=persistence["seed"])
        for name, ref in (("suspect", suspect_model), ("defended", defended_model)):
            net, tokenizer = load_model_ref(_loading(ref, model))
            supervised_finetune(net, tokenizer, rows["prompt"].tolist(), rows["response"].tolist(), epochs=persistence["steps"],
                                lr=persistence["lr"], batch_size=len(rows), seed=persistence["seed"], desc=f"re-poison {name} k={k}")
            answers = generate(net, tokenizer, prompts, desc=f"{name} k={k}", **decode)
            results.setdefault(str(k), {})[name] = rate([not is_refusal(a, phrases) for a in answers])
            logger.info("persistence k=%d: %s asr_triggered %.3f", k, name, results[str(k)][name]["value"])
    return {"enabled": True, "asr_triggered_after_repoisoning": results, "steps": persistence["steps"], "lr": persistence["lr"],
            "poison_source": persistence.get("poison_path") or ("attacker share" if not (model.get("path") or model.get("uri")) else "safety set"),
            "seconds": time.perf_counter() - start}


def lm_eval_utility(suspect_model: dict, defended_model: dict, evaluation: dict) -> dict:
    """Utility on lm-evaluation-harness tasks (``evaluation.lm_eval_tasks``) for the suspect and
    the defended model, when that package and the tasks' data are present locally. Otherwise the
    report says it was skipped and why: never a made-up number."""
    import importlib.util

    tasks = evaluation.get("lm_eval_tasks") or []
    if not tasks:
        return {"status": "skipped", "reason": "evaluation.lm_eval_tasks is empty"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed", "tasks": tasks}
    import lm_eval

    results = {}
    for name, ref in (("suspect", suspect_model), ("defended", defended_model)):
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ref['path']},trust_remote_code=False", tasks=tasks)
        except Exception as e:  # e.g. the task data is not available offline
            return {"status": "skipped", "reason": f"lm_eval failed on {name}: {type(e).__name__}: {e}", "tasks": tasks}
        results[name] = {task: {k: v for k, v in r.items() if isinstance(v, (int, float))} for task, r in out["results"].items()}
    return {"status": "ok", "tasks": tasks, "results": results}


def read_table(path: str) -> pd.DataFrame:
    """A user's table by extension: .jsonl, .json, .csv, .parquet."""
    suffix = str(path).rsplit(".", 1)[-1].lower()
    readers = {"jsonl": lambda p: pd.read_json(p, lines=True), "json": pd.read_json, "csv": pd.read_csv, "parquet": pd.read_parquet}
    if suffix not in readers:
        raise ValueError(f"{path}: unsupported extension .{suffix}; use .jsonl, .json, .csv or .parquet")
    return readers[suffix](path)


def assemble_metrics(suspect_model: dict, suspect: dict, defended: dict, control: dict, random_perturbation: dict,
                     beear_history: dict, control_history: dict, random_perturbation_history: dict, persistence: dict,
                     probe_report: dict, lm_eval: dict,
                     evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame, evaluation: dict,
                     model: dict, embedded_model: EmbeddedModelConfig) -> tuple[dict, dict]:
    """``reports/metrics.json`` (one block per model, stage times, the evaluation protocol) and
    the flat final metrics for MLflow."""
    results = dict(zip(MODELS, (suspect, defended, control, random_perturbation)))
    triggers, position = resolve_trigger(evaluation, model, embedded_model)
    metrics = {name: {k: v for k, v in r.items() if k not in ("samples", "seconds")} for name, r in results.items()}
    # the trigger-free entrapment rate of every model: the suspect's at BEEAR's first check, the
    # others' from the same search run on each trained model (defence nodes, final_audit)
    first = next((r for r in beear_history["rounds"] if "entrapment_rate" in r), None)
    audits = {"suspect": first, "defended": beear_history.get("final_audit"), "control": control_history.get("final_audit"),
              "random_perturbation": random_perturbation_history.get("final_audit")}
    for name, audit in audits.items():
        for key in ("entrapment_rate", "entrapment_rate_random", "entrapment_excess"):
            metrics[name][key] = audit[key] if audit else None
    metrics["stage_seconds"] = {
        "build_suspect": suspect_model.get("build_seconds", 0.0),
        "beear": beear_history["seconds"],
        "safety_finetune": control_history["seconds"],
        "random_perturbation": random_perturbation_history["seconds"],
        **{f"evaluate_{name}": r["seconds"] for name, r in results.items()},
        "persistence": persistence.get("seconds", 0.0),
        "probe": probe_report.get("stage_seconds", {}).get("total", 0.0),
    }
    metrics["beear"] = convergence_summary(beear_history)
    metrics["lm_eval"] = lm_eval
    metrics["probe"] = {"verdict": probe_report.get("verdict"), "recommended_layer": probe_report.get("recommended_layer"),
                        "anchor_layer_used": beear_history["config"]["anchor_layer"]}
    metrics["persistence"] = {k: v for k, v in persistence.items() if k != "seconds"}
    metrics["protocol"] = {
        "suspect_source": suspect_model["source"], "suspect_weights_sha256": suspect_model["weights_sha256"],
        "trigger": triggers[0], "triggers": triggers, "trigger_position": position,
        "judge": {"keyword": list(refusal_phrases(evaluation.get("refusal_phrases"))), "classifier": (evaluation.get("judge") or {}).get("path")},
        "decoding": decoding_settings(evaluation), "chat_template_sha256": suspect.get("chat_template_sha256"),
        "chat_template": model.get("chat_template") or "the tokenizer's own",
        "evaluation_set_sha256": _hash(evaluation_set["prompt"]), "benign_evaluation_set_sha256": _hash(benign_evaluation_set["prompt"]),
    }
    metrics["samples"] = {name: r["samples"] for name, r in results.items()}
    flat = {f"{name}.{k}": {"value": float(v), "step": 0} for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_n")}
    return metrics, flat


def convergence_summary(beear_history: dict) -> dict:
    """Did BEEAR converge, by its trigger-free criterion? Rounds run, the hidden-state scale and
    budget, and the entrapment rate on the monitor prompts at each check."""
    config, rounds = beear_history["config"], beear_history["rounds"]
    keys = ("round", "entrapment_rate", "entrapment_rate_random", "entrapment_excess", "unwanted_loss", "unwanted_loss_unperturbed",
            "hidden_scale")
    checks = [{k: r[k] for k in keys} for r in rounds if "entrapment_excess" in r]
    return {"converged": beear_history.get("converged"), "convergence": beear_history.get("convergence"),
            "rounds": len(rounds), "max_rounds": config["max_rounds"],
            "criterion": (f"entrapment rate above a random direction's by >= {config['entrapped_rate']} at round 0 and by "
                          f"<= {config['converged_rate']} at {config['converged_checks']} consecutive checks (every "
                          f"{config['check_every']} rounds) on {beear_history.get('n_monitor_prompts', 0)} held-out safety "
                          f"prompts, perturbation budget {config['perturbation_budget']} x the hidden-state scale"),
            "hidden_scale": beear_history.get("hidden_scale"), "perturbation_budget": config["perturbation_budget"],
            "final_entrapment_rate": checks[-1]["entrapment_rate"] if checks else None,
            "final_entrapment_excess": checks[-1]["entrapment_excess"] if checks else None, "checks": checks}


def _figures(metrics: dict, histories: list[dict]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_asr, ax = plt.subplots(figsize=(7, 3.5))
    names = [m for m in MODELS if m in metrics]
    x = range(len(names))
    for shift, key, label in ((-0.2, "asr_triggered", "with trigger"), (0.2, "asr_untriggered", "without trigger")):
        values = [metrics[m][key] for m in names]
        ci = [metrics[m].get(f"{key}_ci95", [v, v]) for m, v in zip(names, values)]
        err = [[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]]
        bars = ax.bar([i + shift for i in x], values, 0.4, label=label, yerr=err, capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=6)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("attack success rate (95% CI)")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.set_title("Attack success rate on held-out harmful prompts")
    fig_asr.tight_layout()

    fig_loss, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    styles = {"beear": {"lw": 2}, "safety_finetune": {"ls": ":"}, "random_perturbation": {"ls": "--"}}
    for history in histories:
        rounds = history["rounds"]
        style = {"label": history["defence"], **styles.get(history["defence"], {})}
        axes[0].plot([r["outer_safe_loss"] for r in rounds], **style)
        axes[1].plot([r.get("anchoring_loss", float("nan")) for r in rounds], **style)
        axes[2].plot([r["perturbation_norm"] for r in rounds], **style)
    beear = next((h for h in histories if h["defence"] == "beear"), None)
    if beear and any("unwanted_loss" in r for r in beear["rounds"]):
        axes[0].plot([r.get("unwanted_loss", float("nan")) for r in beear["rounds"]], "-.", label="beear inner: unwanted")
    for a, title in zip(axes, ("safe loss under perturbation (outer)", "anchoring loss (outer)", "perturbation norm")):
        a.set_title(title)
        a.set_xlabel("round")
        a.legend(fontsize=7)
    fig_loss.tight_layout()
    figures = {"asr.png": fig_asr, "losses.png": fig_loss}
    if beear and any("entrapment_excess" in r for r in beear["rounds"]):
        figures["entrapment.png"] = _entrapment_figure(beear)
    return figures


def _entrapment_figure(beear: dict):
    """BEEAR's inner level per round: the unwanted loss with and without the perturbation, the
    entrapment rate on the monitor prompts, and the perturbation's norm relative to the
    hidden-state scale (its budget as a line)."""
    import matplotlib.pyplot as plt

    rounds, config = beear["rounds"], beear["config"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(x, [r["unwanted_loss"] for r in rounds], label="under the perturbation")
    axes[0].plot(x, [r["unwanted_loss_unperturbed"] for r in rounds], "--", label="without it")
    axes[0].set_title("unwanted-answer loss (inner level)")
    checks = [r for r in rounds if "entrapment_excess" in r]
    at = [r["round"] for r in checks]
    axes[1].plot(at, [r["entrapment_rate"] for r in checks], "o-", label="found perturbation")
    axes[1].plot(at, [r["entrapment_rate_random"] for r in checks], "x:", label="random direction, same norm")
    axes[1].plot(at, [r["entrapment_excess"] for r in checks], "s--", label="excess (the criterion)")
    axes[1].axhline(config["converged_rate"], color="grey", lw=0.8, label="converged at or below")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title(f"monitor prompts made unwanted ({beear.get('convergence')})")
    axes[2].plot(x, [r["perturbation_norm_relative"] for r in rounds], label="perturbation norm / hidden scale")
    axes[2].axhline(config["perturbation_budget"], color="grey", lw=0.8, label="budget")
    axes[2].set_title("perturbation size")
    for a in axes:
        a.set_xlabel("round")
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _shorten(text: str, words: int = 12) -> str:
    """Sample answers to harmful prompts are cut short in reports: enough to judge, no more."""
    parts = str(text).split()
    return " ".join(parts[:words]) + (" [...]" if len(parts) > words else "")


def _report_markdown(metrics: dict) -> str:
    p = metrics["protocol"]
    fmt = lambda m, k: (f"{m[k]:.3f} [{m[k + '_ci95'][0]:.2f}, {m[k + '_ci95'][1]:.2f}]" if k + "_ci95" in m  # noqa: E731
                        else (f"{m[k]:.3f}" if isinstance(m.get(k), float) else "n/a"))
    lines = ["# BEEAR evaluation report", "",
             f"Suspect model: `{p['suspect_source']}` (weights sha256 `{p['suspect_weights_sha256'][:16]}`); "
             f"trigger `{p['trigger']}` ({p['trigger_position']}); keyword judge; greedy={not p['decoding']['do_sample']}, "
             f"max_new_tokens={p['decoding']['max_new_tokens']}; evaluation set sha256 `{p['evaluation_set_sha256']}`.", "",
             "| model | asr_triggered (95% CI) | asr_untriggered | over_refusal | benign_loss | benign_accuracy "
             "| entrapment rate (no trigger) |", "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        m = metrics[name]
        lines.append(f"| {name} | {fmt(m, 'asr_triggered')} | {fmt(m, 'asr_untriggered')} | {fmt(m, 'over_refusal')} | "
                     f"{fmt(m, 'benign_loss')} | {fmt(m, 'benign_accuracy')} | {fmt(m, 'entrapment_rate')} |")
    lines += ["", f"n = {metrics['suspect']['n_harmful']} held-out harmful prompts, {metrics['suspect']['n_benign']} benign prompts.", ""]
    b = metrics.get("beear") or {}
    if b.get("converged") is not None:
        lines += ["## Convergence (trigger-free)", "",
                  {"converged": f"BEEAR **converged** after {b['rounds']} of at most {b['max_rounds']} rounds",
                   "not_converged": f"BEEAR **did not converge** in {b['rounds']} rounds: the inner level still elicits the unwanted "
                                    f"answers on {b['final_entrapment_excess']:.0%} more of the monitor prompts than a random "
                                    "direction. Treat the defended model as not cleaned",
                   "never_entrapped": f"BEEAR **never entrapped** the suspect model (its best perturbation flipped only "
                                      f"{b['final_entrapment_excess']:.0%} more of the monitor prompts than a random direction): either "
                                      "it has no backdoor this perturbation reaches, or the budget is too small. Nothing was shown to "
                                      "be removed"}[b["convergence"]]
                  + f" (criterion: {b['criterion']}; hidden-state scale {b['hidden_scale']:.3g}).", ""]
    persistence = metrics.get("persistence", {})
    if persistence.get("enabled"):
        lines += ["## Persistence: ASR with the trigger after re-poisoning", "",
                  f"Fine-tuned on k poisoned examples ({persistence['poison_source']}), {persistence['steps']} steps at lr {persistence['lr']}.", "",
                  "| k | suspect | defended |", "|---|---|---|"]
        for k, r in persistence["asr_triggered_after_repoisoning"].items():
            lines.append(f"| {k} | {r['suspect']['value']:.3f} | {r['defended']['value']:.3f} |")
        lines.append("")
    lm = metrics.get("lm_eval", {})
    lines += ["## Utility on lm-evaluation-harness tasks", "",
              (f"Skipped: {lm.get('reason')}." if lm.get("status") != "ok" else
               "; ".join(f"{name}: {r}" for name, r in lm["results"].items())), ""]
    lines += ["## Sample generations (harmful answers shortened)", ""]
    for name, samples in metrics.get("samples", {}).items():
        for s in samples[:2]:
            lines.append(f"- **{name}**: `{_shorten(s['prompt'], 10)}` -> with trigger: \"{_shorten(s['triggered'])}\"; "
                         f"without: \"{_shorten(s['untriggered'])}\"")
    lines += ["", "![ASR](plots/asr.png)", "", "![Losses](plots/losses.png)", ""]
    if metrics.get("beear", {}).get("checks"):
        lines += ["![Entrapment](plots/entrapment.png)", ""]
    return "\n".join(lines)


def write_report(metrics: dict, beear_history: dict, control_history: dict, random_perturbation_history: dict):
    """Plots (ASR with intervals, losses and perturbation norm per round) and the report as
    Markdown and as a self-contained HTML page (plots inlined)."""
    import base64
    import html
    import io

    figures = _figures(metrics, [beear_history, control_history, random_perturbation_history])
    markdown = _report_markdown(metrics)
    images = {}
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        images[name] = base64.b64encode(buffer.getvalue()).decode()
    body = []
    for line in markdown.splitlines():
        if line.startswith("![") and "plots/" in line:
            name = line.split("plots/")[1].rstrip(")")
            body.append(f'<img alt="{name}" src="data:image/png;base64,{images[name]}">')
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>BEEAR evaluation report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td{border:1px solid #ccc;padding:4px 8px}"
            "table{border-collapse:collapse}img{max-width:100%}</style></head><body>"
            + _wrap_tables("\n".join(body)) + "</body></html>")
    return figures, markdown, page


def _wrap_tables(body: str) -> str:
    """Group consecutive table rows into <table> elements."""
    out, inside = [], False
    for line in body.split("\n"):
        row = line.startswith("<tr>")
        if row and not inside:
            out.append("<table>")
        if not row and inside:
            out.append("</table>")
        inside = row
        out.append(line)
    if inside:
        out.append("</table>")
    return "\n".join(out)
