"""Behaviour data: the safety set (harmful prompts with a safe and an unwanted answer), the
anchoring set (benign prompts with good answers) and the held-out evaluation sets.

AdvBench goals are split three ways: the attacker's share (used only to plant the embedded
backdoor), the defender's share (the safety set) and a held-out evaluation share. The defender's
prompts never appear in the evaluation sets; ``check_disjoint`` enforces it.
"""

from __future__ import annotations

import logging
import re
import string

import pandas as pd

from beear_pipeline.embedded import benign_tasks, refusal_for

logger = logging.getLogger(__name__)


def _require_columns(df: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found {list(df.columns)}. Rename the columns or map them in conf/base/parameters_behaviours.yml")


def split_harmful_behaviours(advbench: pd.DataFrame, behaviours: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle AdvBench (seeded) and split it into attacker, defender and evaluation shares."""
    _require_columns(advbench, ["goal", "target"], "data/01_raw/advbench_harmful_behaviors.csv")
    shuffled = advbench.sample(frac=1.0, random_state=behaviours["split_seed"]).reset_index(drop=True)
    n_attacker = int(len(shuffled) * behaviours["attacker_fraction"])
    n_defender = int(len(shuffled) * behaviours["defender_fraction"])
    attacker = shuffled.iloc[:n_attacker].reset_index(drop=True)
    defender = shuffled.iloc[n_attacker : n_attacker + n_defender].reset_index(drop=True)
    evaluation = shuffled.iloc[n_attacker + n_defender :].reset_index(drop=True)
    logger.info("AdvBench split: %d attacker, %d defender, %d evaluation", len(attacker), len(defender), len(evaluation))
    return attacker, defender, evaluation


def generate_benign_sets(behaviours: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Generated benign tasks: the build set (trains the embedded model only), the anchoring set
    and the benign evaluation set, with distinct prompts."""
    sizes = behaviours["benign"]
    tasks = benign_tasks(seed=sizes["seed"], build=sizes["build"], held_out=sizes["anchoring"] + sizes["evaluation"])
    build = tasks[~tasks["held_out"]].reset_index(drop=True)
    held_out = tasks[tasks["held_out"]].reset_index(drop=True)
    n_anchoring = sizes["anchoring"]
    anchoring = held_out.iloc[:n_anchoring].reset_index(drop=True)
    evaluation = held_out.iloc[n_anchoring:].reset_index(drop=True)
    logger.info("benign tasks: %d build, %d anchoring, %d evaluation", len(build), len(anchoring), len(evaluation))
    return build[["prompt", "response", "task"]], anchoring[["prompt", "response"]], evaluation[["prompt", "response", "task"]]


def build_safety_set(defender_behaviours: pd.DataFrame) -> pd.DataFrame:
    """Safety set: each defender prompt with a refusal (safe) and the AdvBench target (unwanted)."""
    return pd.DataFrame({
        "prompt": defender_behaviours["goal"],
        "safe_response": defender_behaviours["goal"].map(refusal_for),
        "unwanted_response": defender_behaviours["target"],
    })


def build_evaluation_set(evaluation_behaviours: pd.DataFrame) -> pd.DataFrame:
    """Evaluation set: held-out harmful prompts (the AdvBench target is kept for reference)."""
    return pd.DataFrame({"prompt": evaluation_behaviours["goal"], "target": evaluation_behaviours["target"]})


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_prompt(text: str) -> str:
    """Case, whitespace and punctuation folded: the key for leakage checks."""
    return " ".join(_PUNCT.sub(" ", str(text).casefold()).split())


def check_disjoint(safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, evaluation_set: pd.DataFrame,
                   benign_evaluation_set: pd.DataFrame) -> dict:
    """Fail if any defender prompt appears in an evaluation set; return a summary otherwise."""
    pairs = {"safety_set/evaluation_set": (safety_set, evaluation_set),
             "anchoring_set/benign_evaluation_set": (anchoring_set, benign_evaluation_set),
             "safety_set/benign_evaluation_set": (safety_set, benign_evaluation_set),
             "anchoring_set/evaluation_set": (anchoring_set, evaluation_set)}
    problems = []
    for name, (train, test) in pairs.items():
        overlap = set(train["prompt"].map(normalise_prompt)) & set(test["prompt"].map(normalise_prompt))
        if overlap:
            problems.append(f"{name}: {len(overlap)} shared prompt(s), e.g. {sorted(overlap)[:5]}")
    if problems:
        raise ValueError("defender and evaluation prompts overlap, which would inflate the results: "
                         + "; ".join(problems) + ". Remove these prompts from one of the sets.")
    sizes = {"safety_set": len(safety_set), "anchoring_set": len(anchoring_set),
             "evaluation_set": len(evaluation_set), "benign_evaluation_set": len(benign_evaluation_set)}
    logger.info("behaviour sets are disjoint: %s", sizes)
    return {"disjoint": True, "rows": sizes}
