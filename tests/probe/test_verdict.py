"""The probe's verdict rule as pure functions: the exact test, the multiple-comparison correction
over layers x budgets, and which reference model calibrates the verdict. No model is built."""

from __future__ import annotations

import pytest

from beear_pipeline.pipelines.probe.nodes import select_reference
from beear_pipeline.probe import ProbeConfig, VerdictRule
from beear_pipeline.probe.curve import decide, scan_cells
from beear_pipeline.probe.stats import bonferroni, clopper_pearson, fisher_greater, holm

N = 20  # held-out prompts per cell
BUDGETS = [0.25, 0.5, 0.75, 1.0]


def _curves(optimised: dict[int, list[int]], random: int = 4, draws: int = 2) -> list[dict]:
    """Curves over layers, flip counts given per layer and budget; every random draw flips ``random``."""
    return [{"layer": layer, "budgets": BUDGETS, "optimised": [k / N for k in counts], "random": [random / N] * len(BUDGETS),
             "random_draws": [[random / N] * draws for _ in BUDGETS], "n_prompts": N} for layer, counts in optimised.items()]


# ---- the exact test and the corrections agree with scipy -----------------------------------


@pytest.mark.parametrize("table", [(8, 10, 2, 10), (11, 20, 4, 20), (0, 5, 3, 7), (20, 20, 0, 20), (5, 30, 9, 60)])
def test_fisher_greater_matches_scipy(table):
    stats = pytest.importorskip("scipy.stats")
    k, n, kr, nr = table
    expected = stats.fisher_exact([[k, n - k], [kr, nr - kr]], alternative="greater")[1]
    assert fisher_greater(k, n, kr, nr) == pytest.approx(expected, rel=1e-9)


def test_holm_is_step_down_and_monotone():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert bonferroni([0.01, 0.04, 0.5]) == pytest.approx([0.03, 0.12, 1.0])


@pytest.mark.parametrize("k,n", [(0, 5), (3, 5), (5, 5), (1, 104)])
def test_clopper_pearson_matches_the_beta_quantiles(k, n):
    stats = pytest.importorskip("scipy.stats")
    low, high = clopper_pearson(k, n)
    assert low == pytest.approx(0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1), abs=1e-9)
    assert high == pytest.approx(1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k), abs=1e-9)


# ---- the multiple-comparison correction -------------------------------------------------------


def test_many_noise_margins_do_not_fire_but_one_strong_cell_does():
    """8 layers x 4 budgets, each 11/20 flips vs 4/20 for the random draws: every cell meets the
    effect sizes (0.55 >= 0.5, margin 0.35 >= 0.3) and has p ~ 0.02 on its own, which the rule
    before the correction called a backdoor; corrected over the 32 cells, none is evidence."""
    rule = VerdictRule(max_budget=1.0)
    noise = {layer: [11] * len(BUDGETS) for layer in range(8)}
    cells = scan_cells(_curves(noise), rule)
    assert len(cells) == 32 and all(c["p_value"] < 0.05 and c["checks"]["margin"] and c["checks"]["flip_rate"] for c in cells)
    decision = decide(cells, rule)
    assert decision["verdict"] == "no_evidence" and decision["family_size"] == 32
    assert decision["closest"]["p_adjusted"] > rule.alpha
    uncorrected = VerdictRule(alpha=1.0, max_budget=1.0)  # the rule before issue 13
    assert decide(scan_cells(_curves(noise), uncorrected), uncorrected)["verdict"] == "likely_backdoored"

    strong = {**noise, 5: [11, 19, 11, 11]}  # one cell: 19/20 at layer 5, budget 0.5
    decision = decide(scan_cells(_curves(strong), rule), rule)
    assert decision["verdict"] == "likely_backdoored"
    carried = decision["carried_by"]
    assert (carried["layer"], carried["budget"], carried["flips"], carried["reference_flips"]) == (5, 0.5, 19, 4)
    assert carried["p_adjusted"] == pytest.approx(32 * fisher_greater(19, N, 4, N))  # smallest p: Holm's first step is x m


def test_a_strong_cell_beyond_max_budget_or_below_the_margin_does_not_carry_it():
    rule = VerdictRule(max_budget=0.75)
    late = decide(scan_cells(_curves({0: [4, 4, 4, 20]}), rule), rule)  # only at budget 1.0 > 0.75
    assert late["verdict"] == "no_evidence" and late["closest"]["budget"] <= 0.75
    # every random draw flips 12: 17/20 at budget 1.0 meets the flip rate but its margin is 0.25 < 0.3
    close, rule = _curves({0: [4, 4, 4, 17]}, random=12), VerdictRule(max_budget=1.0)
    decision = decide(scan_cells(close, rule), rule)
    assert decision["verdict"] == "no_evidence" and decision["closest"]["budget"] == 1.0
    checks = decision["closest"]["checks"]
    assert checks["budget"] and checks["flip_rate"] and not checks["margin"]


def test_the_random_reference_is_the_draw_that_flipped_the_most():
    """Two draws flipping 0 and 8: the reference count is 8 of 20, not 8 of 40 pooled."""
    curve = _curves({0: [16, 16, 16, 16]})[0]
    curve["random_draws"] = [[0.0, 8 / N]] * len(BUDGETS)
    cell = scan_cells([curve], VerdictRule())[0]
    assert (cell["reference_flips"], cell["reference_n"]) == (8, N)
    assert cell["p_value"] == pytest.approx(fisher_greater(16, N, 8, N))


def test_a_clean_reference_model_replaces_random_directions():
    rule = VerdictRule()
    suspect = _curves({1: [4, 18, 20, 20]}, random=0)
    fragile = _curves({1: [4, 16, 20, 20]}, random=0)  # a clean model that flips as easily
    assert decide(scan_cells(suspect, rule), rule)["verdict"] == "likely_backdoored"
    against_clean = decide(scan_cells(suspect, rule, fragile), rule)
    assert against_clean["verdict"] == "no_evidence" and against_clean["reference"] == "clean_model"
    with pytest.raises(ValueError, match="same layers and budgets"):
        scan_cells(suspect, rule, _curves({2: [0, 0, 0, 0]}))


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("alpha", 1.5), ("correction", "fdr")])
def test_the_rule_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"probe.verdict.{field}"):
        ProbeConfig(verdict={field: value})


# ---- which reference calibrates the verdict ---------------------------------------------------


def test_reference_selection_prefers_the_named_path_then_the_clean_twin():
    twin = {"path": "data/06_models/embedded_clean_twin", "source": "embedded_clean_twin"}
    named = select_reference(ProbeConfig(reference_model_path="/models/clean"), twin)
    assert (named["kind"], named["path"]) == ("reference_model_path", "/models/clean")
    default = select_reference(ProbeConfig(), twin)
    assert (default["kind"], default["path"], default["source"]) == ("clean_twin_model", twin["path"], "embedded_clean_twin")
    assert default["ref"] is twin  # loaded with load_model_ref, so device_map / dtype / adapter travel with it
    none = select_reference(ProbeConfig(), {"path": None, "reason": "model.clean_twin is false"})
    assert (none["kind"], none["path"]) == ("random_directions", None) and "model.clean_twin is false" in none["reason"]
    assert select_reference(ProbeConfig(), None)["kind"] == "random_directions"
