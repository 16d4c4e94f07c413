"""The attack node: the output schema with one budget for every model, the clean twin skipped
with its reason, and clear early errors."""

from dataclasses import replace

import pytest

from beear_pipeline.attacks import AttackConfig
from beear_pipeline.lm.checkpoints import ModelConfig
from beear_pipeline.pipelines.attack.nodes import attack_models
from beear_pipeline.probe import ProbeConfig

TINY = {"max_new_tokens": 8, "max_eval_prompts": 16,
        "gcg": {"steps": 2, "candidates_per_step": 8, "search_prompts": 4, "top_k": 8},
        "latent": {"budgets": [2.0], "inner_steps": 3, "max_new_tokens": 8}, "variants": {"names": ["original", "repeated"]}}
PROBE = {"recommended_layer": 1, "config": ProbeConfig().to_dict()}


def test_every_model_is_attacked_with_the_same_budget_and_a_missing_twin_is_skipped(pair, pair_dirs, protocol):
    _, _, safety_set, evaluation_set, _ = pair
    twin = {"path": None, "reason": "model.path is set and no clean twin was given"}
    out = attack_models({"path": pair_dirs["backdoored"]}, {"path": pair_dirs["clean"]}, twin, safety_set, evaluation_set,
                        protocol.to_dict(), PROBE, AttackConfig.from_dict(TINY), ModelConfig())
    assert set(out) >= {"trigger_reoptimisation", "latent_vulnerability", "trigger_variants", "budget"}
    for section in ("trigger_reoptimisation", "latent_vulnerability", "trigger_variants"):
        assert out[section]["clean_twin"] == {"skipped": twin["reason"]}
    for name in ("suspect", "defended"):
        gcg = out["trigger_reoptimisation"][name]
        assert set(gcg["asr_held_out"]) == {"value", "ci95", "n"} and gcg["asr_held_out"]["n"] == 16
        assert isinstance(gcg["asr_search"], float) and isinstance(gcg["suffix"], str) and gcg["steps"] == 2
        assert gcg["candidates_per_step"] == 8 and gcg["seconds"] > 0
        latent = out["latent_vulnerability"][name]
        assert latent["layer"] == 1 and latent["budgets"] == [2.0] and len(latent["flip"]) == len(latent["random"]) == 1
        assert set(out["trigger_variants"][name]) == {"original", "repeated"}
    # the same initial suffix (same seed and tokenizer) for both models: one budget
    assert out["trigger_reoptimisation"]["suspect"]["initial_suffix"] == out["trigger_reoptimisation"]["defended"]["initial_suffix"]
    assert out["trigger_variants"]["suspect"]["original"]["value"] > out["trigger_variants"]["defended"]["original"]["value"]
    budget = out["budget"]
    assert budget["gcg"]["search_prompts"] == 4 and budget["layer"] == 1 and budget["n_held_out"] == 16
    assert budget["trigger_variants"]["repeated"].endswith("SUDO SUDO")


def test_without_the_probe_s_layer_the_node_stops_naming_the_fix(pair, protocol):
    _, _, safety_set, evaluation_set, _ = pair
    with pytest.raises(ValueError, match=r"recommended_layer.*kedro run --pipeline=probe.*attack\.latent\.enabled: false"):
        attack_models({"path": "unused"}, {"path": "unused"}, {"path": None}, safety_set, evaluation_set, protocol.to_dict(), {},
                      AttackConfig(), ModelConfig())


def test_disabled_attacks_do_nothing(protocol):
    out = attack_models({}, {}, {}, None, None, protocol.to_dict(), {}, AttackConfig(enabled=False), ModelConfig())
    assert out == {"enabled": False, "reason": "attack.enabled is false"}


def test_every_rate_and_the_latent_curve_follow_the_protocol_s_judge(pair, pair_dirs, protocol):
    """The scenario's judge decides what counts as unwanted everywhere: under a regex judge whose
    one pattern never matches, the backdoored model's suffix, variant and latent-curve rates are all
    zero, where the keyword judge sees the trigger work and the latent search flip answers."""
    _, _, safety_set, evaluation_set, _ = pair
    budget = {**TINY, "gcg": {**TINY["gcg"], "steps": 1}, "latent": {**TINY["latent"], "budgets": [4.0], "random_draws": 1},
              "variants": {"names": ["original"]}}
    nothing = replace(protocol, unwanted_judge="regex", judge_patterns=["^NEVER-PRINTED$"])
    runs = {}
    for name, judged in (("keyword", protocol), ("never", nothing)):
        runs[name] = attack_models({"path": pair_dirs["backdoored"]}, {"path": None, "reason": "one model is enough"},
                                   {"path": None, "reason": "one model is enough"}, safety_set, evaluation_set, judged.to_dict(),
                                   PROBE, AttackConfig.from_dict(budget), ModelConfig())
    keyword, never = runs["keyword"], runs["never"]
    assert keyword["trigger_variants"]["suspect"]["original"]["value"] > 0.5
    assert max(keyword["latent_vulnerability"]["suspect"]["flip"]) > 0
    assert never["trigger_variants"]["suspect"]["original"]["value"] == 0
    assert never["trigger_reoptimisation"]["suspect"]["asr_held_out"]["value"] == 0
    assert never["latent_vulnerability"]["suspect"]["flip"] == [0.0]
    assert never["latent_vulnerability"]["suspect"]["random"] == [0.0]
    assert never["budget"]["judge"].startswith("regex")
