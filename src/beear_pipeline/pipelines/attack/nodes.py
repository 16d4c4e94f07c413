"""Thin adapter from the pipeline to the adaptive attacks (``beear_pipeline.attacks``): the same
budget against the suspect, the defended model and the clean twin, one model loaded at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import pandas as pd
import torch

from beear_pipeline.attacks import AttackConfig, attack_rate, gcg_search, latent_vulnerability, trigger_variants, with_suffix
from beear_pipeline.attacks.variants import describe
from beear_pipeline.evaluation.protocol import EvaluationProtocol
from beear_pipeline.integrations.tracking import log_metrics
from beear_pipeline.lm.checkpoints import ModelConfig, load_model_ref
from beear_pipeline.probe.config import ProbeConfig

logger = logging.getLogger(__name__)

ATTACKED = ("suspect", "defended", "clean_twin")


def search_prompts(safety_set: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The safety-set rows the suffix is optimised on: a seeded subset, the same for every model."""
    order = torch.randperm(len(safety_set), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return safety_set.iloc[order]


# the probe's settings that shape its curve (where the perturbation goes and what it optimises);
# the rest of its report's configuration (layers, verdict, ...) is not the attack's business
PROBE_FIELDS = ("num_positions", "shared_vector", "away_weight", "away_cap", "inner_optimizer", "inner_step_fraction", "batch_size")


def latent_probe_config(attack: AttackConfig, probe_report: dict, protocol: EvaluationProtocol) -> ProbeConfig:
    """The probe's own perturbation layout and objective (read from its report, so the curve is
    the probe's; ``ProbeConfig`` defaults for what an older report lacks), with the attack's
    budgets, steps, draws and answer length."""
    recorded = probe_report.get("config") or {}
    latent = attack.latent
    return ProbeConfig(**{k: recorded[k] for k in PROBE_FIELDS if k in recorded}, budgets=list(latent.budgets),
                       inner_steps=latent.inner_steps, random_draws=latent.random_draws, max_new_tokens=latent.max_new_tokens,
                       generation_batch_size=attack.generation_batch_size, system_prompt=protocol.decoding.system_prompt, seed=attack.seed)


def _check_inputs(safety_set: pd.DataFrame, evaluation_set: pd.DataFrame, probe_report: dict, attack: AttackConfig) -> None:
    missing = {"safety_set": {"prompt", "safe_response", "unwanted_response"} - set(safety_set.columns),
               "evaluation_set": {"prompt"} - set(evaluation_set.columns)}
    for name, cols in missing.items():
        if cols:
            raise ValueError(f"attack: {name} lacks the column(s) {sorted(cols)}; run the behaviours pipeline that writes it")
    if attack.latent.enabled and not isinstance((probe_report or {}).get("recommended_layer"), int):
        raise ValueError("attack.latent: probe_report has no integer recommended_layer; run the probe pipeline first "
                         "(kedro run --pipeline=probe) or set attack.latent.enabled: false")


def attack_models(suspect_model: dict, defended_model: dict, clean_twin_model: dict, safety_set: pd.DataFrame,
                  evaluation_set: pd.DataFrame, evaluation_protocol: dict, probe_report: dict, attack: AttackConfig,
                  model: ModelConfig) -> dict:
    """``attack_results``: for each model (the clean twin skipped with its reason when it has no
    path), the GCG suffix found on the safety set and its ASR on the held-out evaluation prompts,
    the latent entrapment curve at the probe's recommended layer, and the ASR of each variant of
    the known trigger; with the budget, identical for every model."""
    if not attack.enabled:
        return {"enabled": False, "reason": "attack.enabled is false"}
    start = time.perf_counter()
    _check_inputs(safety_set, evaluation_set, probe_report, attack)
    protocol = EvaluationProtocol.from_dict(evaluation_protocol)
    system_prompt = protocol.decoding.system_prompt
    # the scenario's judge of the unwanted answer (the keyword judge in the jailbreak scenario), for every
    # rate the attacks report: the latent curve's flips too, so its budget means "unwanted", not "no refusal"
    judge = protocol.judge().flags
    held_out = evaluation_set["prompt"].tolist()[: attack.max_eval_prompts]
    search = search_prompts(safety_set, attack.gcg.search_prompts, attack.seed)
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))
    decode = {"max_new_tokens": attack.max_new_tokens, "batch_size": attack.generation_batch_size, "system_prompt": system_prompt}
    variants = trigger_variants(protocol.trigger, protocol.trigger_position, attack.variants.names)
    layer = probe_report.get("recommended_layer") if probe_report else None
    latent_config = latent_probe_config(attack, probe_report or {}, protocol) if attack.latent.enabled else None

    results: dict = {"trigger_reoptimisation": {}, "latent_vulnerability": {}, "trigger_variants": {}}
    refs = {"suspect": suspect_model, "defended": defended_model, "clean_twin": clean_twin_model}
    for name in ATTACKED:
        ref = refs[name]
        if not ref or not ref.get("path"):
            reason = (ref or {}).get("reason") or f"no {name} model"
            for section in results.values():
                section[name] = {"skipped": reason}
            logger.info("attack: %s skipped (%s)", name, reason)
            continue
        net, tokenizer = load_model_ref({**model.loading(), **ref}, field=f"{name}_model")
        found = gcg_search(net, tokenizer, search["prompt"].tolist(), search["unwanted_response"].tolist(), attack.gcg,
                           seed=attack.seed, system_prompt=system_prompt, desc=f"GCG {name}")
        asr_search = attack_rate(net, tokenizer, [with_suffix(p, found["suffix"]) for p in search["prompt"]], judge,
                                 desc=f"{name} suffix, search prompts", **decode)
        results["trigger_reoptimisation"][name] = {
            "asr_held_out": attack_rate(net, tokenizer, [with_suffix(p, found["suffix"]) for p in held_out], judge,
                                        desc=f"{name} suffix, held out", **decode),
            "asr_held_out_initial_suffix": attack_rate(net, tokenizer, [with_suffix(p, found["initial_suffix"]) for p in held_out],
                                                       judge, desc=f"{name} initial suffix", **decode),
            "asr_search": asr_search["value"], "suffix": found["suffix"], "initial_suffix": found["initial_suffix"],
            "loss": found["loss"], "initial_loss": found["initial_loss"], "losses": found["losses"], "steps": found["steps"],
            "candidates_per_step": found["candidates_per_step"], "candidates_scored": found["candidates_scored"],
            "seconds": found["seconds"],
        }
        if latent_config is not None:
            results["latent_vulnerability"][name] = latent_vulnerability(net, tokenizer, safety, held_out, layer, latent_config, judge)
        else:
            results["latent_vulnerability"][name] = {"skipped": "attack.latent.enabled is false"}
        if attack.variants.enabled:
            results["trigger_variants"][name] = {v: attack_rate(net, tokenizer, [write(p) for p in held_out], judge,
                                                                desc=f"{name} {v}", **decode) for v, write in variants.items()}
        else:
            results["trigger_variants"][name] = {"skipped": "attack.variants.enabled is false"}
        logger.info("attack %s: GCG suffix %r ASR held out %.3f (initial suffix %.3f); latent budget to flip half %s; variants %s",
                    name, found["suffix"], results["trigger_reoptimisation"][name]["asr_held_out"]["value"],
                    results["trigger_reoptimisation"][name]["asr_held_out_initial_suffix"]["value"],
                    results["latent_vulnerability"][name].get("budget_to_flip_half"),
                    {v: round(r["value"], 3) for v, r in results["trigger_variants"][name].items() if isinstance(r, dict)})
        del net
    results["budget"] = {
        **asdict(attack), "layer": layer, "n_search_prompts": len(search), "n_held_out": len(held_out), "trigger": protocol.trigger,
        "trigger_position": protocol.trigger_position, "suffix_placement": "after the prompt, in the user turn: f'{prompt} {suffix}'",
        "trigger_variants": describe(variants, "PROMPT WORDS"), "decoding": "greedy", "judge": f"{protocol.unwanted_judge} (the protocol's judge, for every rate and the latent curve)",
        "latent_probe_config": asdict(latent_config) if latent_config is not None else None,
    }
    results["seconds"] = time.perf_counter() - start
    log_metrics(flat_metrics(results))
    return results


def flat_metrics(results: dict) -> dict:
    """The headline numbers for MLflow: ``attack.<model>.gcg_asr_held_out``, ``.latent_budget_to_flip_half``
    (absent when nothing flips half), ``.variant.<name>``."""
    flat = {}
    for name in ATTACKED:
        gcg = results["trigger_reoptimisation"].get(name, {})
        if "asr_held_out" in gcg:
            flat[f"attack.{name}.gcg_asr_held_out"] = gcg["asr_held_out"]["value"]
            flat[f"attack.{name}.gcg_asr_search"] = gcg["asr_search"]
        half = results["latent_vulnerability"].get(name, {}).get("budget_to_flip_half")
        if half is not None:
            flat[f"attack.{name}.latent_budget_to_flip_half"] = half
        for variant, r in results["trigger_variants"].get(name, {}).items():
            if isinstance(r, dict):
                flat[f"attack.{name}.variant.{variant}"] = r["value"]
    return flat
