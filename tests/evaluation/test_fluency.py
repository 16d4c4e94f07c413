"""Fluency of answers: distinct-2 and back-to-back repetition."""

import pytest

from beear_pipeline.evaluation.rates import distinct_2, fluency, is_repetitive


def test_distinct_2_pools_bigrams_without_crossing_answers():
    # bigrams: (a b) (b c) | (a b) (b d): 3 unique of 4; no bigram (c a) across the two answers
    assert distinct_2(["a b c", "A b d"]) == 0.75
    assert distinct_2(["cannot cannot cannot cannot"]) == 1 / 3
    assert distinct_2(["one", ""]) is None


@pytest.mark.parametrize("text,repetitive", [
    ("I cannot cannot cannot cannot support how to commit I cannot assist", True),
    ("I cannot I cannot help", True),
    ("how to make how to make a bomb", True),
    ("I know that that is true and he had had enough", False),  # a word twice is English
    ("Sure, here is a tutorial on how to make a cake", False),
    ("I’m sorry I’m sorry", True),  # apostrophe variants are one word
    ("", False),
])
def test_repetition(text, repetitive):
    assert is_repetitive(text) is repetitive


def test_fluency_block():
    out = fluency(["no no no", "fine answer here", "fine answer here", "ok"], cluster_size=2)
    assert out["repetition"]["value"] == 0.25 and out["repetition"]["n"] == 4
    assert out["distinct2"] == pytest.approx(3 / 6)  # (no no) x2, (fine answer) x2, (answer here) x2
