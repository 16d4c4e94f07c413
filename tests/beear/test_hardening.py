"""Hardening of the outer step against re-poisoning (issue 14, beear/hardening.py): each option
changes the outer update, is inert when off, checks its fields, and does what it claims."""

import copy
import dataclasses

import pytest
import torch

from beear_pipeline.beear import BeearConfig, hardening, run_beear
from beear_pipeline.beear.engine import _encode, _Run
from beear_pipeline.lm.residual import resolve_layer

OPTIONS = {"relearn": {"relearn_steps": 2}, "relearn_no_proxy": {"relearn_steps": 2, "relearn_proxy": "none"},
           "unlearn": {"unlearn_weight": 1.0}, "sam": {"sam_rho": 0.05}}
RECORDED = {"relearn": {"relearn_loss", "relearn_unwanted_loss"}, "relearn_no_proxy": {"relearn_loss", "relearn_unwanted_loss"},
            "unlearn": {"unlearn_loss", "unlearn_capped_share"}, "sam": {"sam_loss"}}


def small(**kw) -> BeearConfig:
    return BeearConfig(**{"max_rounds": 2, "inner_steps": 2, "inner_max_steps": 2, "batch_size": 2, "anchoring_batch_size": 2,
                          "num_positions": 3, "check_every": 0, **kw})


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def defended(model, tokenizer, safety, anchoring, config):
    model = copy.deepcopy(model)
    result = run_beear(model, tokenizer, safety, anchoring, config)
    return weights(result.model), result.history


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_the_outer_update_and_records_its_losses(option, tiny_model, tokenizer, safety_triples, anchoring_pairs):
    plain, plain_history = defended(tiny_model, tokenizer, safety_triples, anchoring_pairs, small())
    hardened, history = defended(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(**OPTIONS[option]))
    assert any(not torch.equal(a, b) for a, b in zip(plain, hardened))
    assert RECORDED[option] <= set(history[0]) and not RECORDED[option] & set(plain_history[0])
    # the outer loss is still the plain objective at the weights as they were (same first round)
    assert history[0]["outer_loss"] == plain_history[0]["outer_loss"]


def test_switched_off_options_are_inert_bitwise(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    """Every companion knob changed but the switches at 0: the run is bit for bit plain BEEAR's."""
    plain, plain_history = defended(tiny_model, tokenizer, safety_triples, anchoring_pairs, small())
    off = small(relearn_steps=0, relearn_lr=0.5, relearn_weight=3.0, relearn_proxy="none", unlearn_weight=0.0, unlearn_cap=0.1,
                sam_rho=0.0)
    hardened, history = defended(tiny_model, tokenizer, safety_triples, anchoring_pairs, off)
    assert all(torch.equal(a, b) for a, b in zip(plain, hardened))
    assert history == plain_history


def _run(model, tokenizer, safety, anchoring, config):
    safety_examples, anchoring_examples = _encode(tokenizer, safety, anchoring, None)
    model.train()
    run = _Run(model, tokenizer, safety_examples, anchoring_examples, config, resolve_layer(model, config.anchor_layer))
    idx = list(range(len(safety)))
    safe, index = run.batch_of(safety_examples.safe, idx)
    unwanted, unwanted_index = run.batch_of(safety_examples.unwanted, idx)
    with torch.no_grad():
        run.delta.normal_(generator=torch.Generator().manual_seed(3))
    return run, safe, index, unwanted, unwanted_index


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_relearn_term_is_the_safe_gradient_after_simulated_sign_steps(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    config = small(relearn_steps=2, relearn_lr=0.01)
    run, safe, index, unwanted, unwanted_index = _run(tiny_model, tokenizer, safety_triples, anchoring_pairs, config)
    params = [p for p in run.params if p.requires_grad]
    start = weights(tiny_model)
    record: dict = {}
    surrogate = hardening.relearn_surrogate(run, safe, index, unwanted, unwanted_index, record)
    assert all(torch.equal(a, b) for a, b in zip(start, tiny_model.parameters()))  # the simulated attack is undone
    got = _grads(surrogate, params)
    # by hand: two sign steps down the unwanted loss under the perturbation, then the safe loss's gradient
    delta = run.delta.detach()
    for _ in range(2):
        g = _grads(run.loss(unwanted, unwanted_index, delta), params)
        with torch.no_grad():
            for p, gi in zip(params, g):
                if gi is not None:
                    p.sub_(0.01 * gi.sign())
    after = run.loss(safe, index, delta)
    expected = _grads(after, params)
    assert record["relearn_loss"] == pytest.approx(after.item(), rel=1e-5)
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(expected, _grads(run_safe_at(run, start, safe, index, delta), params))
               if b is not None)


def run_safe_at(run, values, safe, index, delta):
    """The safe loss at ``values`` (the weights before the simulated attack)."""
    with torch.no_grad():
        for p, v in zip(run.model.parameters(), values):
            p.copy_(v)
    return run.loss(safe, index, delta)


def test_relearn_proxy_none_attacks_without_the_perturbation(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    records = {}
    for proxy in ("perturbation", "none"):
        run, safe, index, unwanted, unwanted_index = _run(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs,
                                                          small(relearn_steps=1, relearn_proxy=proxy))
        records[proxy] = {}
        hardening.relearn_surrogate(run, safe, index, unwanted, unwanted_index, records[proxy])
        with torch.no_grad():
            plain = run.loss(unwanted).item()
            perturbed = run.loss(unwanted, unwanted_index, run.delta.detach()).item()
        assert records[proxy]["relearn_unwanted_loss"] == pytest.approx(perturbed if proxy == "perturbation" else plain, rel=1e-5)
    assert records["perturbation"]["relearn_unwanted_loss"] != records["none"]["relearn_unwanted_loss"]


def test_unlearning_ascends_only_below_the_cap(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    run, _safe, _index, unwanted, unwanted_index = _run(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(unlearn_weight=1.0))
    params = [p for p in run.params if p.requires_grad]
    per_example = run.loss(unwanted, unwanted_index, run.delta.detach(), reduction="none")
    record: dict = {}
    below = _grads(hardening.unlearn_term(run, unwanted, unwanted_index, record), params)
    ascent = _grads(-per_example.mean(), params)
    for a, b in zip(below, ascent):
        if b is not None:
            torch.testing.assert_close(a, b)
    assert record["unlearn_loss"] == pytest.approx(per_example.mean().item(), rel=1e-5) and record["unlearn_capped_share"] == 0
    run.config = dataclasses.replace(run.config, unlearn_cap=per_example.min().item() / 2)  # every example past the cap
    capped = _grads(hardening.unlearn_term(run, unwanted, unwanted_index, record), params)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in capped) and record["unlearn_capped_share"] == 1


def test_sam_takes_the_gradient_at_the_ascended_weights_and_restores_them(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    run, safe, index, _unwanted, _unwanted_index = _run(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(sam_rho=0.5))
    params = [p for p in run.params if p.requires_grad]
    start = weights(tiny_model)

    def objective():
        return run.loss(safe, index, run.delta.detach())

    g0 = _grads(objective(), params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g0 if g is not None))
    record = {"outer_loss": 1.0}
    with hardening.sharpness_aware(run, objective, record):
        moved = [p.detach().clone() for p in params]
        inside = _grads(objective(), params)
    assert all(torch.equal(a, b) for a, b in zip(start, tiny_model.parameters()))
    step = torch.sqrt(sum((m - s).pow(2).sum() for m, s, p in zip(moved, start, run.model.parameters()) if p.requires_grad))
    assert step.item() == pytest.approx(0.5, rel=1e-3)
    expected = [m - s for m, s in zip(moved, start)]
    for e, g in zip(expected, g0):
        if g is not None:
            torch.testing.assert_close(e, 0.5 * g / norm, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(inside, g0) if b is not None)
    assert record["outer_loss"] == 1.0 and "sam_loss" in record


@pytest.mark.parametrize("field,value", [
    ("relearn_steps", -1), ("relearn_steps", 1.5), ("relearn_lr", 0.0), ("relearn_weight", -1.0), ("relearn_proxy", "trigger"),
    ("unlearn_weight", -0.5), ("unlearn_cap", 0.0), ("sam_rho", -0.1),
])
def test_bad_hardening_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"beear.{field}"):
        BeearConfig(**{field: value})


def test_hardening_is_off_by_default():
    c = BeearConfig()
    assert (c.relearn_steps, c.unlearn_weight, c.sam_rho) == (0, 0.0, 0.0)


ALL_ON = {"relearn_steps": 1, "unlearn_weight": 0.5, "sam_rho": 0.05}


def test_a_crashed_hardened_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, tokenizer, safety_triples, anchoring_pairs):
    """The options keep no state of their own: a run stopped after round 2 and resumed from its
    checkpoint ends with the weights and records of a run that never stopped."""
    config = small(max_rounds=4, **ALL_ON)
    whole, whole_history = defended(tiny_model, tokenizer, safety_triples, anchoring_pairs, config)

    class Crash(Exception):
        pass

    def crash_after_round_1(round_, record):
        if round_ == 1:
            raise Crash

    checkpointed = dataclasses.replace(config, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(Crash):
        run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, checkpointed, on_round=crash_after_round_1)
    result = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, checkpointed)
    assert result.resumed_from == 2
    assert all(torch.equal(a, b) for a, b in zip(whole, result.model.parameters()))
    assert result.history == whole_history


def _safe_loss_rise_under_simulated_attack(model, tokenizer, safety, delta, config) -> float:
    """How much ``relearn_steps`` sign steps of re-poisoning under ``delta`` raise the safe loss
    under ``delta``, on the whole safety set (the weights are restored)."""
    run, safe, index, unwanted, unwanted_index = _run(model, tokenizer, safety, [], config)
    with torch.no_grad():
        run.delta.copy_(delta)
        before = run.loss(safe, index, run.delta).item()
    record: dict = {}
    hardening.relearn_surrogate(run, safe, index, unwanted, unwanted_index, record)
    return record["relearn_loss"] - before


def test_relearn_aware_training_makes_the_simulated_re_poisoning_weaker_on_the_backdoored_pair(pair):
    """On the real backdoored tiny model: after the same rounds, the safe answers of the
    relearn-aware model survive the simulated re-poisoning (under each model's own perturbation)
    better than plain BEEAR's."""
    models, tokenizer, safety_set, _, _ = pair
    safety = list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))[:24]
    common = {"max_rounds": 6, "check_every": 0, "batch_size": 16, "anchoring_batch_size": 0, "inner_max_steps": 20}
    rises = {}
    for name, extra in (("plain", {}), ("relearn", {"relearn_steps": 3})):
        result = run_beear(copy.deepcopy(models["backdoored"]), tokenizer, safety, [], BeearConfig(**common, **extra))
        rises[name] = _safe_loss_rise_under_simulated_attack(result.model, tokenizer, safety, result.perturbation,
                                                             BeearConfig(**{**common, "relearn_steps": 3, "batch_size": len(safety)}))
    # measured: plain 0.204, relearn-aware 0.135 (1 thread); a third less, asserted with margin
    assert rises["relearn"] < 0.8 * rises["plain"], rises
