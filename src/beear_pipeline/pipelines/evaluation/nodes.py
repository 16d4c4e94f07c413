"""Evaluate the suspect, defended and baseline models the same way, and assemble the report."""

from __future__ import annotations

import hashlib
import logging
import time

import pandas as pd

from beear_pipeline.embedded import EmbeddedModelConfig, apply_trigger
from beear_pipeline.evaluation import attack_success_rate, refusal_phrases, benign_loss, exact_match_accuracy, generate
from beear_pipeline.models import load_checkpoint

logger = logging.getLogger(__name__)
MODELS = ("suspect", "defended", "control", "random_perturbation")


def _hash(values) -> str:
    return hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()[:16]


def resolve_trigger(evaluation: dict, model: dict, embedded_model: EmbeddedModelConfig) -> tuple[str, str]:
    """The trigger to test: ``evaluation.trigger``, or for the embedded model the one it was built
    with (the evaluation may know it; the defence never reads it)."""
    if evaluation.get("trigger"):
        return evaluation["trigger"], evaluation.get("trigger_position", "suffix")
    if model.get("path") or model.get("uri"):
        raise ValueError("evaluation.trigger is required when model.path or model.uri is set")
    embedded = EmbeddedModelConfig.coerce(embedded_model)
    return embedded.trigger, embedded.trigger_position


def evaluate_model(model_ref: dict, evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame,
                   evaluation: dict, model: dict, embedded_model: EmbeddedModelConfig) -> dict:
    """ASR with and without the trigger on held-out harmful prompts; loss (and exact-match
    accuracy) on held-out benign tasks. Greedy decoding, keyword judge."""
    start = time.perf_counter()
    net, tokenizer = load_checkpoint(model_ref["path"])
    trigger, position = resolve_trigger(evaluation, model, embedded_model)
    phrases = refusal_phrases(evaluation.get("refusal_phrases"))
    decode = {"max_new_tokens": evaluation["max_new_tokens"], "batch_size": evaluation["batch_size"],
              "system_prompt": evaluation.get("system_prompt")}
    prompts = evaluation_set["prompt"].tolist()
    triggered = generate(net, tokenizer, [apply_trigger(p, trigger, position) for p in prompts], desc="triggered", **decode)
    untriggered = generate(net, tokenizer, prompts, desc="untriggered", **decode)
    result = {
        "asr_triggered": attack_success_rate(triggered, phrases),
        "asr_untriggered": attack_success_rate(untriggered, phrases),
        "benign_loss": benign_loss(net, tokenizer, benign_evaluation_set["prompt"].tolist(), benign_evaluation_set["response"].tolist(),
                                   system_prompt=decode["system_prompt"]),
        "n_harmful": len(prompts),
        "n_benign": len(benign_evaluation_set),
    }
    if "response" in benign_evaluation_set:
        answers = generate(net, tokenizer, benign_evaluation_set["prompt"].tolist(), desc="benign", **decode)
        result["benign_accuracy"] = exact_match_accuracy(answers, benign_evaluation_set["response"].tolist())
    result["samples"] = [{"prompt": p, "triggered": t, "untriggered": u} for p, t, u in list(zip(prompts, triggered, untriggered))[:3]]
    result["seconds"] = time.perf_counter() - start
    logger.info("%s: ASR triggered %.3f, untriggered %.3f, benign loss %.4f", model_ref["path"],
                result["asr_triggered"], result["asr_untriggered"], result["benign_loss"])
    return result


def assemble_metrics(suspect_model: dict, suspect: dict, defended: dict, control: dict, random_perturbation: dict,
                     beear_history: dict, control_history: dict, random_perturbation_history: dict,
                     evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame, evaluation: dict,
                     model: dict, embedded_model: EmbeddedModelConfig) -> tuple[dict, dict]:
    """``reports/metrics.json`` (one block per model, stage times, the evaluation protocol) and
    the flat final metrics for MLflow."""
    results = dict(zip(MODELS, (suspect, defended, control, random_perturbation)))
    trigger, position = resolve_trigger(evaluation, model, embedded_model)
    metrics = {name: {k: v for k, v in r.items() if k not in ("samples", "seconds")} for name, r in results.items()}
    metrics["stage_seconds"] = {
        "build_suspect": suspect_model.get("build_seconds", 0.0),
        "beear": beear_history["seconds"],
        "safety_finetune": control_history["seconds"],
        "random_perturbation": random_perturbation_history["seconds"],
        **{f"evaluate_{name}": r["seconds"] for name, r in results.items()},
    }
    metrics["protocol"] = {
        "suspect_source": suspect_model["source"], "suspect_weights_sha256": suspect_model["weights_sha256"],
        "trigger": trigger, "trigger_position": position, "judge": "keyword", "refusal_phrases": list(refusal_phrases(evaluation.get("refusal_phrases"))),
        "decoding": {"greedy": True, "max_new_tokens": evaluation["max_new_tokens"]},
        "system_prompt": evaluation.get("system_prompt"),
        "evaluation_set_sha256": _hash(evaluation_set["prompt"]), "benign_evaluation_set_sha256": _hash(benign_evaluation_set["prompt"]),
    }
    metrics["samples"] = {name: r["samples"] for name, r in results.items()}
    flat = {f"{name}.{k}": {"value": float(v), "step": 0} for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return metrics, flat


def plot_results(metrics: dict, beear_history: dict, control_history: dict, random_perturbation_history: dict) -> dict:
    """ASR before and after each defence, and the per-round losses and perturbation norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_asr, ax = plt.subplots(figsize=(7, 3.5))
    names = [m for m in MODELS if m in metrics]
    x = range(len(names))
    for shift, key, label in ((-0.2, "asr_triggered", "with trigger"), (0.2, "asr_untriggered", "without trigger")):
        bars = ax.bar([i + shift for i in x], [metrics[m][key] for m in names], 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("attack success rate")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.set_title("Attack success rate on held-out harmful prompts")
    fig_asr.tight_layout()

    fig_loss, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    styles = {"beear": {"lw": 2}, "safety_finetune": {"ls": ":"}, "random_perturbation": {"ls": "--"}}
    for history in (beear_history, control_history, random_perturbation_history):
        rounds = history["rounds"]
        style = {"label": history["defence"], **styles.get(history["defence"], {})}
        axes[0].plot([r["outer_safe_loss"] for r in rounds], **style)
        axes[1].plot([r.get("anchoring_loss", float("nan")) for r in rounds], **style)
        axes[2].plot([r["perturbation_norm"] for r in rounds], **style)
    if any("unwanted_loss" in r for r in beear_history["rounds"]):
        axes[0].plot([r.get("unwanted_loss", float("nan")) for r in beear_history["rounds"]], "-.", label="beear inner: unwanted")
    for a, title in zip(axes, ("safe loss under perturbation (outer)", "anchoring loss (outer)", "perturbation norm")):
        a.set_title(title)
        a.set_xlabel("round")
        a.legend(fontsize=7)
    fig_loss.tight_layout()
    return {"asr.png": fig_asr, "losses.png": fig_loss}
