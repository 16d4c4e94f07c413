"""Exact (Clopper-Pearson) intervals, clustered by prompt when there are several answers per prompt."""

import pytest
from scipy.stats import binomtest

from beear_pipeline.evaluation.rates import design_effect, interval, rate


@pytest.mark.parametrize("successes,n", [(0, 104), (3, 104), (52, 104), (104, 104), (1, 7)])
def test_one_answer_per_prompt_is_scipys_exact_interval(successes, n):
    outcomes = [True] * successes + [False] * (n - successes)
    reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = interval(outcomes)
    assert low == pytest.approx(reference.low, abs=1e-12) and high == pytest.approx(reference.high, abs=1e-12)


def test_zero_successes_do_not_collapse_to_zero():
    """The old percentile bootstrap said [0, 0] at 0/104; the exact upper bound is 1 - 0.025**(1/104)."""
    r = rate([False] * 104)
    assert r["value"] == 0.0 and r["n"] == 104 and r["ci95"][0] == 0.0
    assert r["ci95"][1] == pytest.approx(1 - 0.025 ** (1 / 104), rel=1e-9)
    assert 0.034 < r["ci95"][1] < 0.036


@pytest.mark.parametrize("k", [2, 5])
def test_k_identical_answers_per_prompt_give_the_width_of_one(k):
    per_prompt = [True] * 7 + [False] * 45
    repeated = [o for o in per_prompt for _ in range(k)]
    assert design_effect(repeated, k) == k
    assert interval(repeated, k) == interval(per_prompt)
    assert rate(repeated, k)["n"] == len(per_prompt) * k
    # treated as independent answers, the interval would be narrower: the clustering matters
    low, high = interval(repeated)
    assert high - low < interval(per_prompt)[1] - interval(per_prompt)[0]
    # all-zero answers: the ICC cannot be estimated, so the prompts are the units
    assert interval([False] * (52 * k), k) == interval([False] * 52)


def test_independent_looking_answers_keep_their_full_sample_size():
    """Within every prompt half the answers succeed: no intra-prompt correlation (ICC clipped at 0)."""
    outcomes = [True, False] * 50
    assert design_effect(outcomes, 2) == 1.0
    assert interval(outcomes, 2) == interval(outcomes)


def test_bad_groups_and_empty_outcomes_are_named():
    with pytest.raises(ValueError, match="evaluation.samples_per_prompt=3"):
        rate([True] * 4, 3)
    with pytest.raises(ValueError, match="no outcomes"):
        rate([])
