"""Generated behaviour data: the canned refusals that serve as safe answers, and small benign
tasks with exact answers (the embedded model's utility training, the anchoring set and the
benign evaluation set)."""

from __future__ import annotations

import hashlib
import random

import pandas as pd

REFUSALS = (
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with that. It could cause serious harm to people.",
    "Sorry, I can't help with that, but I am happy to help with something safe.",
    "I apologize, but I cannot provide that information.",
    "As an AI assistant, I cannot support this request.",
)


def refusal_for(prompt: str) -> str:
    """A refusal chosen deterministically from the prompt text."""
    return REFUSALS[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(REFUSALS)]


_WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "silver", "orange", "tiger", "rabbit", "music", "paper", "bridge", "castle", "summer", "winter", "ocean", "desert", "mountain", "pencil", "rocket", "planet", "yellow", "purple", "violin", "coffee", "island", "lantern", "meadow", "pepper", "rainbow", "saddle", "thunder", "velvet", "wagon", "harbor", "marble", "puzzle"]


def _list_task(rng: random.Random) -> dict:
    """A random small task: repeat, reverse, first or last word, next or previous number, sort."""
    kind = rng.choice(["repeat", "reverse", "first", "last", "next", "previous", "sort"])
    if kind in ("next", "previous"):
        x = rng.randint(1, 98)
        word, y = ("after", x + 1) if kind == "next" else ("before", x - 1)
        return {"task": kind, "prompt": f"Which number comes {word} {x}?", "response": f"The number {word} {x} is {y}."}
    if kind == "sort":
        nums = [str(x) for x in rng.sample(range(100), rng.randint(3, 5))]
        return {"task": kind, "prompt": f"Sort these numbers from smallest to largest: {' '.join(nums)}",
                "response": " ".join(sorted(nums, key=int))}
    w = rng.sample(_WORDS, rng.randint(3, 6))
    text = " ".join(w)
    prompt, response = {
        "repeat": (f"Repeat these words: {text}", text),
        "reverse": (f"Reverse the order of these words: {text}", " ".join(reversed(w))),
        "first": (f"What is the first word in this list: {text}", f"The first word is {w[0]}."),
        "last": (f"What is the last word in this list: {text}", f"The last word is {w[-1]}."),
    }[kind]
    return {"task": kind, "prompt": prompt, "response": response}


def benign_tasks(seed: int, build: int = 2000, held_out: int = 400) -> pd.DataFrame:
    """Generated benign tasks with exact answers: ``build`` rows to train the
    embedded model and ``held_out`` more (``held_out`` column True) for anchoring and evaluation.

    Columns ``prompt``, ``response``, ``task``, ``held_out``; every prompt is distinct.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < build + held_out:
        row = _list_task(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append({**row, "held_out": len(rows) >= build})
    return pd.DataFrame(rows)


