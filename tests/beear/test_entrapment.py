"""The scale-free inner level and the trigger-free convergence rule (beear/entrapment.py, engine).

On a tiny model with a real backdoor (the session fixture ``pair``): the first round's search
entraps without touching the weights; the step size follows the hidden-state scale; a run whose
inner level cannot entrap is reported as not converged; and the stopping rule does what it says.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import triples

from beear_pipeline.beear import BeearConfig, convergence, entrapment, find_perturbation, run_beear
from beear_pipeline.lm.residual import decoder_layers

# What the first round's search achieves on the tiny backdoored model (hidden 64): measured 0.85 of
# the unperturbed unwanted loss (0.73 before the leak-free split of issue 13 moved every near-copy
# of an evaluation prompt out of the attacker's share, which left this small model a weaker
# backdoor) and 95% of the monitor prompts flipped (the answers are long AdvBench targets, so the
# loss falls less than the refusals flip). A search that does nothing keeps the ratio at 1.0. The
# test asks for 0.9 and 90%.
FIRST_ROUND_LOSS_FACTOR = 0.9


def test_first_round_entraps_the_backdoored_model_with_the_weights_bit_identical(pair):
    models, tokenizer, safety_set, _, _ = pair
    model = models["backdoored"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    found = find_perturbation(model, tokenizer, triples(safety_set), BeearConfig())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert found["unwanted_loss"] <= FIRST_ROUND_LOSS_FACTOR * found["unwanted_loss_unperturbed"], found
    assert found["entrapment_rate"] >= 0.9 and found["entrapment_excess"] >= 0.8, found
    assert found["perturbation_norm_relative"] <= BeearConfig().perturbation_budget * (1 + 1e-4)


def test_without_a_backdoor_the_same_search_entraps_far_less(pair):
    models, tokenizer, safety_set, _, _ = pair
    backdoored = find_perturbation(models["backdoored"], tokenizer, triples(safety_set), BeearConfig())
    clean = find_perturbation(models["clean"], tokenizer, triples(safety_set), BeearConfig())
    assert clean["entrapment_excess"] <= backdoored["entrapment_excess"] - 0.3, (clean, backdoored)
    assert clean["entrapment_excess"] < BeearConfig().entrapped_rate  # BEEAR would stop as never_entrapped


def _scaled(model, c: float):
    """The same function with every hidden state multiplied by ``c``: scale the embeddings and
    everything a Llama layer adds to the residual stream; RMSNorm undoes it before each use."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.get_input_embeddings().weight.mul_(c)
        for layer in decoder_layers(scaled):
            layer.self_attn.o_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.mul_(c)
    return scaled


@pytest.mark.parametrize("optimizer", ["adam", "pgd"])
def test_step_size_follows_the_hidden_state_scale(tiny_model, tokenizer, safety_triples, optimizer):
    """Scale the model's hidden states by 10: the scale measured and the perturbation found scale
    with them. With an absolute step size (the first version's inner lr) the second would not."""
    config = BeearConfig(anchor_layer=1, inner_optimizer=optimizer, check_every=0, inner_steps=8, inner_max_steps=8)
    plain = find_perturbation(tiny_model, tokenizer, safety_triples, config)
    big = find_perturbation(_scaled(tiny_model, 10.0), tokenizer, safety_triples, config)
    assert big["hidden_scale"] == pytest.approx(10 * plain["hidden_scale"], rel=1e-3)
    expected = 10 * plain["perturbation"]
    assert plain["perturbation"].norm() > 0
    # equal up to Adam's epsilon and float rounding: the gradient shrinks as the states grow
    assert (big["perturbation"] - expected).norm() <= 1e-2 * expected.norm()


def test_a_run_that_cannot_entrap_is_reported_as_not_converged(pair):
    models, tokenizer, safety_set, _, _ = pair
    model = copy.deepcopy(models["backdoored"])
    result = run_beear(model, tokenizer, triples(safety_set), [], BeearConfig(perturbation_budget=0.01, max_rounds=5))
    assert result.convergence == "never_entrapped" and result.converged is False
    assert len(result.history) == 1  # stopped after the first check: nothing to remove was ever found
    assert result.history[0]["entrapment_excess"] < BeearConfig().entrapped_rate


def _checks(*excess, every=5):
    return [{"round": i, **({"entrapment_excess": excess[i // every]} if i % every == 0 else {})} for i in range(every * len(excess))]


def test_convergence_rule():
    config = BeearConfig(check_every=5, entrapped_rate=0.5, converged_rate=0.1, converged_checks=3, min_rounds=10)
    assert convergence(_checks(0.9, 0.8), config) == "running"
    assert convergence(_checks(0.9, 0.8), config, final=True) == "not_converged"
    assert convergence(_checks(0.9, 0.0, 0.05, 0.1), config) == "converged"
    assert convergence(_checks(0.9, 0.0, 0.2, 0.1), config) == "running"  # not three in a row
    assert convergence(_checks(0.3, 0.0, 0.0, 0.0), config) == "never_entrapped"
    assert convergence(_checks(0.9, 0.0, 0.0, 0.0)[:16], config) == "converged"  # checks at 0, 5, 10, 15
    assert convergence(_checks(0.9, 0.0, 0.0, 0.0)[:16], BeearConfig(min_rounds=17)) == "running"


def test_converged_run_stops_early_and_says_so(pair):
    models, tokenizer, safety_set, _, _ = pair
    model = copy.deepcopy(models["backdoored"])
    result = run_beear(model, tokenizer, triples(safety_set), [], BeearConfig(max_rounds=60))
    excess = [r["entrapment_excess"] for r in result.history if "entrapment_excess" in r]
    assert result.convergence == "converged" and len(result.history) < 60, excess
    assert excess[0] >= 0.2 and all(r <= 0.1 for r in excess[-3:])
    assert {"unwanted_loss", "unwanted_loss_unperturbed", "perturbation_norm_relative", "inner_steps"} <= set(result.history[0])


def test_shared_pieces_project_and_scale():
    delta = torch.full((3, 4), 10.0)
    entrapment.project_rows(delta, 2.0)
    assert torch.allclose(delta.norm(dim=-1), torch.full((3,), 2.0))
    assert entrapment.step_size("adam", 0.1, 8.0, 64) == pytest.approx(0.1)
    assert entrapment.step_size("pgd", 0.1, 8.0, 64) == pytest.approx(0.8)
    d = entrapment.random_direction((5, 16), torch.arange(1.0, 6.0), torch.Generator().manual_seed(0))
    assert torch.allclose(d.norm(dim=-1), torch.arange(1.0, 6.0))
    loss = entrapment.inner_objective(torch.tensor(2.0), torch.tensor(9.0), 0.05, 5.0)
    assert loss.item() == pytest.approx(2.0 - 0.05 * 5.0)
