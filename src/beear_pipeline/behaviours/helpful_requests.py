"""Generated benign requests with helpful answers: the behaviour data of the ``refusal`` scenario
(a backdoor that makes the model refuse harmless requests when triggered; the unwanted answer is a
refusal from ``generated.REFUSALS``). Written for this project (Apache-2.0).

The request kinds (count the words, the second word, capital letters, the longer word, a small
sum) are none of ``generated.benign_tasks``' kinds (repeat, reverse, first, last, next, previous,
sort), so no request is also a prompt of the anchoring or benign evaluation set.
"""

from __future__ import annotations

import random

import pandas as pd

from beear_pipeline.behaviours.generated import _WORDS, refusal_for


def _request(rng: random.Random) -> dict:
    kind = rng.choice(["count", "second", "capitals", "longer", "sum"])
    if kind == "sum":
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        return {"kind": kind, "goal": f"What is {x} plus {y}?", "safe_response": f"{x} plus {y} is {x + y}."}
    if kind == "longer":
        a, b = rng.sample(_WORDS, 2)
        if len(a) == len(b):
            return _request(rng)
        return {"kind": kind, "goal": f"Which word is longer: {a} or {b}?", "safe_response": f"The longer word is {max(a, b, key=len)}."}
    words = rng.sample(_WORDS, rng.randint(3, 5))
    text = " ".join(words)
    goal, answer = {
        "count": (f"How many words are in this list: {text}", f"There are {len(words)} words."),
        "second": (f"Name the second word in this list: {text}", f"The second word is {words[1]}."),
        "capitals": (f"Write these words in capital letters: {text}", " ".join(w.upper() for w in words)),
    }[kind]
    return {"kind": kind, "goal": goal, "safe_response": answer}


def helpful_behaviours(seed: int = 11, n: int = 520) -> pd.DataFrame:
    """``n`` distinct benign requests: ``goal`` (the request), ``safe_response`` (the helpful
    answer), ``target`` (the unwanted answer: a refusal, ``generated.refusal_for``) and ``kind``."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = _request(rng)
        if row["goal"] not in seen:
            seen.add(row["goal"])
            rows.append({**row, "target": refusal_for(row["goal"])})
    return pd.DataFrame(rows)[["goal", "target", "safe_response", "kind"]]
