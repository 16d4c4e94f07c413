"""Evaluate the suspect, defended and baseline models the same way, under one protocol resolved
once per run, and assemble the report. Thin adapters over ``beear_pipeline.evaluation``."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import pandas as pd

from beear_pipeline.behaviours.files import read_behaviour_file
from beear_pipeline.embedded import EmbeddedModelConfig
from beear_pipeline.evaluation import evaluate, lm_eval, report
from beear_pipeline.evaluation.config import EvaluationConfig, PersistenceConfig
from beear_pipeline.evaluation.judges import ClassifierJudge, refusal_phrases
from beear_pipeline.evaluation.persistence import TOLERANCE, persistence_verdict, utility_vs_clean_twin
from beear_pipeline.evaluation.protocol import Decoding, EvaluationProtocol, prompts_sha256
from beear_pipeline.evaluation.unwanted import check_judge
from beear_pipeline.lm.checkpoints import ModelConfig, load_model_ref, merged
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import get_scenario

logger = logging.getLogger(__name__)
MODELS = report.MODELS


def resolve_evaluation_protocol(evaluation: EvaluationConfig, model: ModelConfig, embedded_model: EmbeddedModelConfig,
                                evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame, scenario: str = DEFAULT_SCENARIO) -> dict:
    """The protocol every model is evaluated under: the triggers (``evaluation.trigger``, or the
    embedded model's own: the evaluation may know it, the defence never reads it), decoding,
    judges (``evaluation.unwanted_judge``, else the scenario's), chat template and the prompt sets' hashes."""
    chosen = get_scenario(scenario)
    judge = evaluation.unwanted_judge or chosen.judge
    check_judge(judge, evaluation.judge_patterns)
    triggers, position = evaluation.triggers, evaluation.trigger_position
    if not triggers:
        if model.user_supplied:
            raise ValueError("evaluation.trigger is required when model.path or model.uri is set")
        triggers, position = [embedded_model.trigger], embedded_model.trigger_position
    decoding = Decoding(max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size, do_sample=evaluation.do_sample,
                        temperature=evaluation.temperature, top_p=evaluation.top_p, samples_per_prompt=evaluation.samples_per_prompt,
                        seed=evaluation.seed, system_prompt=evaluation.system_prompt)
    protocol = EvaluationProtocol(
        triggers=triggers, trigger_position=position, decoding=decoding, refusal_phrases=list(refusal_phrases(evaluation.refusal_phrases)),
        judge_path=evaluation.judge.path, judge_kind=evaluation.judge.kind, chat_template=model.chat_template or "the tokenizer's own",
        evaluation_set_sha256=prompts_sha256(evaluation_set["prompt"]),
        benign_evaluation_set_sha256=prompts_sha256(benign_evaluation_set["prompt"]), lm_eval_tasks=list(evaluation.lm_eval_tasks),
        scenario=chosen.name, unwanted_judge=judge, judge_patterns=list(evaluation.judge_patterns), bandit=asdict(evaluation.bandit))
    return protocol.to_dict()


def evaluate_model(model_ref: dict, evaluation_protocol: dict, evaluation_set: pd.DataFrame, benign_evaluation_set: pd.DataFrame,
                   model: ModelConfig) -> dict:
    """One model under the run's protocol (``evaluation.evaluate.evaluate_model``)."""
    protocol = EvaluationProtocol.from_dict(evaluation_protocol)
    net, tokenizer = load_model_ref({**model.loading(), **model_ref})
    judge = ClassifierJudge(protocol.judge_path, protocol.judge_kind) if protocol.judge_path else None
    result = evaluate.evaluate_model(
        net, tokenizer, protocol, evaluation_set["prompt"].tolist(), benign_evaluation_set["prompt"].tolist(),
        benign_responses=benign_evaluation_set["response"].tolist() if "response" in benign_evaluation_set else None,
        categories=evaluation_set["category"].tolist() if "category" in evaluation_set else None, judge=judge)
    logger.info("%s: ASR triggered %.3f, untriggered %.3f, over-refusal %.3f, benign loss %s", model_ref["path"],
                result["asr_triggered"], result["asr_untriggered"], result["over_refusal"], result["benign_loss"])
    return result


def evaluate_clean_twin(clean_twin_model: dict, evaluation_protocol: dict, evaluation_set: pd.DataFrame,
                        benign_evaluation_set: pd.DataFrame, model: ModelConfig) -> dict:
    """The clean twin under the same protocol, or ``{"skipped": reason}`` when there is none."""
    if not clean_twin_model.get("path"):
        logger.info("no clean twin: %s", clean_twin_model.get("reason"))
        return {"skipped": clean_twin_model.get("reason", "no clean twin")}
    return evaluate_model(clean_twin_model, evaluation_protocol, evaluation_set, benign_evaluation_set, model)


def check_persistence(suspect_model: dict, defended_model: dict, clean_twin_model: dict, evaluation_set: pd.DataFrame,
                      safety_set: pd.DataFrame, attacker_behaviours: pd.DataFrame, persistence: PersistenceConfig,
                      evaluation_protocol: dict, model: ModelConfig) -> dict:
    """Does the backdoor come back? The suspect, the defended model and the clean twin (when there
    is one) are fine-tuned alike on k poisoned examples and ``asr_triggered`` is measured again;
    for each k the verdict says whether the defended model re-learns like the twin ("removed") or
    like the suspect ("suppressed"), see ``evaluation.persistence``. Poisoned examples:
    ``persistence.poison_path`` (prompt, response; trigger already in the prompt), else the
    attacker's share for the embedded model, else the safety set's prompts with the trigger and
    their unwanted answers."""
    if not persistence.enabled:
        return {"enabled": False}
    start = time.perf_counter()
    protocol = EvaluationProtocol.from_dict(evaluation_protocol)
    if persistence.poison_path:
        poison, source = read_behaviour_file(persistence.poison_path, "persistence.poison_path")[["prompt", "response"]], persistence.poison_path
    elif not model.user_supplied:
        poison = pd.DataFrame({"prompt": protocol.triggered(attacker_behaviours["goal"]), "response": attacker_behaviours["target"]})
        source = "attacker share"
    else:
        poison = pd.DataFrame({"prompt": protocol.triggered(safety_set["prompt"]), "response": safety_set["unwanted_response"]})
        source = "safety set"
    results: dict = {}
    models = [("suspect", suspect_model), ("defended", defended_model)]
    if clean_twin_model.get("path"):
        models.append(("clean_twin", clean_twin_model))
    for k in persistence.k:
        rows = poison.sample(n=min(k, len(poison)), random_state=persistence.seed)
        for name, ref in models:
            net, tokenizer = load_model_ref({**model.loading(), **ref})
            net = merged(net)  # base + adapter (a LoRA suspect or defended model) is fine-tuned in full, like the others
            results.setdefault(str(k), {})[name] = evaluate.repoisoned_asr(
                net, tokenizer, protocol, rows["prompt"].tolist(), rows["response"].tolist(), evaluation_set["prompt"].tolist(),
                steps=persistence.steps, lr=persistence.lr, seed=persistence.seed, name=name)
            logger.info("persistence k=%d: %s asr_triggered %.3f", k, name, results[str(k)][name]["value"])
    verdicts = {k: persistence_verdict(r["suspect"]["value"], r["defended"]["value"], r["clean_twin"]["value"] if "clean_twin" in r else None)
                for k, r in results.items()}
    for k, v in verdicts.items():
        logger.info("persistence k=%s: the defended model's backdoor is %s", k, v.replace("_", " "))
    return {"enabled": True, "asr_triggered_after_repoisoning": results, "verdict_by_k": verdicts, "verdict_tolerance": TOLERANCE,
            "clean_twin": clean_twin_model.get("path") or f"none ({clean_twin_model.get('reason')})", "steps": persistence.steps,
            "lr": persistence.lr, "poison_source": source, "seconds": time.perf_counter() - start}


def lm_eval_utility(suspect_model: dict, defended_model: dict, evaluation_protocol: dict, model: ModelConfig) -> dict:
    """Utility on lm-evaluation-harness tasks (``evaluation.lm_eval_tasks``; the shipped
    ``beear_word_lists`` runs offline) for the suspect and the defended model, each loaded as every
    other step loads it (chat template, dtype, device map, adapter), or the reason it was skipped."""
    return lm_eval.lm_eval_utility({"suspect": {**model.loading(), **suspect_model}, "defended": {**model.loading(), **defended_model}},
                                   evaluation_protocol["lm_eval_tasks"])


def assemble_metrics(suspect_model: dict, clean_twin_model: dict, suspect: dict, defended: dict, control: dict, random_perturbation: dict, clean_twin: dict,
                     beear_history: dict, control_history: dict, random_perturbation_history: dict, persistence: dict,
                     probe_report: dict, lm_eval: dict, evaluation_protocol: dict, attack_results: dict) -> tuple[dict, dict]:
    """``reports/metrics.json`` (one block per model, the clean twin's when there is one, BEEAR's
    convergence, stage times, the protocol) and the flat final metrics for MLflow."""
    results = dict(zip(MODELS, (suspect, defended, control, random_perturbation)))
    histories = {"beear": beear_history, "control": control_history, "random_perturbation": random_perturbation_history}
    metrics = {name: {k: v for k, v in r.items() if k not in ("samples", "seconds")} for name, r in results.items()}
    has_twin = "skipped" not in clean_twin
    metrics["clean_twin"] = {k: v for k, v in clean_twin.items() if k not in ("samples", "seconds")} if has_twin else None
    if has_twin:
        metrics["utility_vs_clean_twin"] = utility_vs_clean_twin(results, clean_twin)
    # the trigger-free entrapment rate of every model: the suspect's at BEEAR's first check, the
    # others' from the same search run on each trained model (removal nodes, final_audit)
    first = next((r for r in beear_history["rounds"] if "entrapment_excess" in r), None)
    audits = {"suspect": first, "defended": beear_history.get("final_audit"), "control": control_history.get("final_audit"),
              "random_perturbation": random_perturbation_history.get("final_audit")}
    for name, audit in audits.items():
        for key in ("entrapment_rate", "entrapment_rate_random", "entrapment_excess"):
            metrics[name][key] = audit[key] if audit else None
    metrics["beear"] = report.convergence_summary(beear_history)
    if (check := report.valid_code(metrics)) is not None:  # a judge that measures valid code (bandit)
        metrics["valid_code"] = check
        if check["utility_lost"]:
            logger.warning("the defended model writes no valid Python on %.3f of the untriggered prompts, %.3f more than the suspect "
                           "(tolerance %g): a utility loss the benign loss does not see", metrics["defended"]["unparseable_untriggered"],
                           check["excess_unparseable_untriggered"], check["tolerance"])
    metrics["stage_seconds"] = {
        "build_suspect": suspect_model.get("build_seconds", 0.0), "build_clean_twin": clean_twin_model.get("build_seconds", 0.0), **{name: h["seconds"] for name, h in histories.items()},
        **{f"evaluate_{name}": r["seconds"] for name, r in results.items()},
        "evaluate_clean_twin": clean_twin.get("seconds", 0.0),
        "persistence": persistence.get("seconds", 0.0), "attacks": attack_results.get("seconds", 0.0), "probe": probe_report.get("stage_seconds", {}).get("total", 0.0),
    }
    metrics["lm_eval"] = lm_eval
    metrics["probe"] = {"verdict": probe_report.get("verdict"), "recommended_layer": probe_report.get("recommended_layer"),
                        "anchor_layer_used": beear_history.get("anchor_layer_index", beear_history["config"]["anchor_layer"])}
    metrics["persistence"] = {k: v for k, v in persistence.items() if k != "seconds"}
    metrics["attacks"] = {k: v for k, v in attack_results.items() if k != "seconds"}
    protocol = EvaluationProtocol.from_dict(evaluation_protocol)
    metrics["protocol"] = {
        **evaluation_protocol, "trigger": protocol.trigger, "suspect_source": suspect_model["source"],
        "suspect_weights_sha256": suspect_model["weights_sha256"], "chat_template_sha256": suspect.get("chat_template_sha256"),
    }
    metrics["samples"] = {name: r["samples"] for name, r in {**results, **({"clean_twin": clean_twin} if has_twin else {})}.items()}
    flat = {f"{name}.{k}": {"value": float(v), "step": 0} for name, r in metrics.items() if name in (*MODELS, "clean_twin") and r
            for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_n")}
    if "valid_code" in metrics:
        flat["valid_code.utility_lost"] = {"value": float(metrics["valid_code"]["utility_lost"]), "step": 0}
        flat["valid_code.excess_unparseable_untriggered"] = {"value": metrics["valid_code"]["excess_unparseable_untriggered"], "step": 0}
    return metrics, flat


def write_report(metrics: dict, beear_history: dict, control_history: dict, random_perturbation_history: dict):
    """Plots and the report as Markdown and as a self-contained HTML page (plots inlined)."""
    return report.render_report(metrics, [beear_history, control_history, random_perturbation_history])
