"""``outer_lr: auto`` and ``checkpoint_every: auto``: sizes chosen from the model (issue 12, item 2)."""

from __future__ import annotations

import copy
import itertools

import pytest

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.beear.config import size_rule_lr

SMALL = {"max_rounds": 2, "inner_steps": 1, "inner_max_steps": 1, "batch_size": 3, "anchoring_batch_size": 2, "check_every": 0}


def test_the_rule_meets_both_known_sizes_and_falls_in_between():
    assert size_rule_lr(1_300_000) == 5e-4 and size_rule_lr(2_000_000) == 5e-4  # our tiny models, measured
    assert size_rule_lr(6_700_000_000) == pytest.approx(3e-7) and size_rule_lr(70_000_000_000) == pytest.approx(3e-7)
    assert size_rule_lr(6_700_000_000, lora=True) == pytest.approx(2e-5)
    sizes = [3e6, 1e7, 1e8, 1e9, 5e9]
    lrs = [size_rule_lr(int(n)) for n in sizes]
    assert all(5e-4 > a > b > 3e-7 for a, b in itertools.pairwise(lrs))  # strictly between, decreasing
    assert size_rule_lr(int(1.3e8)) == pytest.approx((5e-4 * 3e-7) ** 0.5, rel=0.2)  # about halfway in logs


def test_sized_resolves_only_what_is_auto():
    tiny = BeearConfig().sized(1_300_000, 10 * 2**20)
    assert (tiny.outer_lr, tiny.checkpoint_every) == (5e-4, 1)
    large = BeearConfig().sized(6_700_000_000, 84 * 10**9)
    assert (large.outer_lr, large.checkpoint_every) == (pytest.approx(3e-7), 10)
    given = BeearConfig(outer_lr=1e-3, checkpoint_every=3).sized(6_700_000_000, 84 * 10**9)
    assert (given.outer_lr, given.checkpoint_every) == (1e-3, 3)
    with pytest.raises(ValueError, match="beear.inner_step_fraction/outer_lr"):
        BeearConfig(outer_lr="fast")
    with pytest.raises(ValueError, match="beear.checkpoint_every"):
        BeearConfig(checkpoint_every=0)


def test_auto_on_the_tiny_model_is_the_measured_default_exactly(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    auto = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, BeearConfig(**SMALL))
    fixed = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, BeearConfig(**SMALL, outer_lr=5e-4))
    assert auto.config.outer_lr == 5e-4 and auto.config.checkpoint_every == 1
    assert auto.history == fixed.history
