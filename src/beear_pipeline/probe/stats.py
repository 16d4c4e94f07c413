"""Exact tests for the probe's verdict: is an optimised flip count larger than the reference's, and
how to correct for scanning many layers and budgets.

Plain Python (no scipy): the counts are small (a few hundred held-out prompts), so the exact
hypergeometric sums are cheap and need no approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def fisher_greater(flips: int, n: int, reference_flips: int, reference_n: int) -> float:
    """One-sided Fisher exact test: the p-value of seeing ``flips`` or more of ``n`` prompts flip
    when, under the null hypothesis, the suspect's perturbation flips prompts no more often than
    the reference (``reference_flips`` of ``reference_n``). Conditional on the total number of
    flips, the suspect's count is hypergeometric; the p-value is its upper tail."""
    if not (0 <= flips <= n and 0 <= reference_flips <= reference_n) or n == 0 or reference_n == 0:
        raise ValueError(f"fisher_greater: counts out of range ({flips}/{n} vs {reference_flips}/{reference_n})")
    total, flipped = n + reference_n, flips + reference_flips
    denominator = comb(total, n)
    tail = sum(comb(flipped, k) * comb(total - flipped, n - k) for k in range(flips, min(n, flipped) + 1))
    return min(1.0, tail / denominator)  # exact big-integer ratio, rounded once


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the family-wise error rate of
    rejecting every hypothesis whose adjusted p-value is <= alpha is at most alpha, whatever the
    dependence between the tests (the probe's layers and budgets share prompts and warm starts)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # monotone: never below an earlier step
        adjusted[i] = running
    return adjusted


def bonferroni(p_values: Sequence[float]) -> list[float]:
    """Bonferroni-adjusted p-values: each times the number of tests, capped at 1."""
    return [min(1.0, len(p_values) * p) for p in p_values]


CORRECTIONS = {"holm": holm, "bonferroni": bonferroni}


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion, e.g. the probe's
    false- or true-positive rate over a handful of models: the proportions p whose binomial tail
    P(X >= successes) (for the lower end) or P(X <= successes) (for the upper end) is at least
    (1 - confidence) / 2, found by bisection (scipy is not a dependency)."""
    if not 0 <= successes <= n or n == 0:
        raise ValueError(f"clopper_pearson: {successes} successes of {n}")
    tail = (1 - confidence) / 2

    def at_most(k: int, p: float) -> float:
        return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    def solve(f) -> float:  # f is increasing in p; the root of f(p) = 0 in [0, 1]
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if f(mid) < 0 else (low, mid)
        return (low + high) / 2

    lower = 0.0 if successes == 0 else solve(lambda p: (1 - at_most(successes - 1, p)) - tail)
    upper = 1.0 if successes == n else solve(lambda p: tail - at_most(successes, p))
    return lower, upper
