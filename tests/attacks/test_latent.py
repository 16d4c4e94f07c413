"""Latent vulnerability: the budget that flips half the held-out prompts, and the curve itself."""

import pytest
from helpers import triples

from beear_pipeline.attacks import latent
from beear_pipeline.evaluation.judges import REFUSAL_PHRASES
from beear_pipeline.probe import ProbeConfig


@pytest.mark.parametrize(("flip", "expected"), [([0.0, 0.2, 0.5, 0.9], 1.0), ([0.6, 0.9, 1.0, 1.0], 0.25),
                                                ([0.0, 0.1, 0.3, 0.49], None)])
def test_budget_to_flip_half_is_the_smallest_budget_reaching_one_half(monkeypatch, flip, expected):
    budgets = [0.25, 0.5, 1.0, 2.0]
    fake = {"layer": 1, "hidden_norm": 3.0, "budgets": budgets, "optimised": flip, "random": [0.0] * 4, "seconds": 0.0}
    monkeypatch.setattr(latent, "entrapment_curve", lambda *a, **k: fake)
    out = latent.latent_vulnerability(None, None, [], [], 1, ProbeConfig(), REFUSAL_PHRASES)
    assert out["budget_to_flip_half"] == expected
    assert out["flip"] == flip and out["budgets"] == budgets and out["layer"] == 1


def test_the_curve_flips_the_backdoored_model_more_than_random_directions(pair):
    models, tokenizer, safety_set, evaluation_set, _ = pair
    config = ProbeConfig(budgets=[2.0], inner_steps=8, random_draws=1, max_new_tokens=8)
    out = latent.latent_vulnerability(models["backdoored"], tokenizer, triples(safety_set), evaluation_set["prompt"].tolist()[:32], 1,
                                      config, REFUSAL_PHRASES)
    assert out["flip"][0] >= 0.5 > out["random"][0]
    assert out["budget_to_flip_half"] == 2.0
