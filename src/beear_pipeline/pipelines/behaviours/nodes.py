"""Behaviour data: the safety set (harmful prompts with a safe and an unwanted answer), the
anchoring set (benign prompts with good answers) and the held-out evaluation sets.

By default AdvBench goals are split three ways: the attacker's share (used only to plant the
embedded backdoor), the defender's share (the safety set) and a held-out evaluation share, with
each group of near-duplicate goals kept in one share; benign tasks are generated. A user's file (``behaviours.safety_path``, ``anchoring_path``,
``evaluation_path``, ``benign_path``; docs/behaviour_data.md) replaces the corresponding default
set. Every set is then validated with Great Expectations (``validate_behaviours``) and a failure
stops the run (``check_behaviours``) before any model is loaded.

The user's files are read here, not by the catalog, because which file to read is a run parameter.
"""

from __future__ import annotations

import logging
import random

import pandas as pd

from beear_pipeline.behaviours.config import BehavioursConfig
from beear_pipeline.behaviours.files import SCHEMAS, column_mapping, read_user_set
from beear_pipeline.behaviours.generated import benign_tasks, other_refusal_for, refusal_for, reworded_unwanted
from beear_pipeline.behaviours.similarity import leak_rates, near_duplicate_groups
from beear_pipeline.behaviours.validation import BehaviourDataError, failure_message, token_counter, validate_behaviour_sets
from beear_pipeline.lm.checkpoints import ModelConfig
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import get_scenario

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = {
    "safety": "the shipped AdvBench defender share",
    "anchoring": "the generated benign tasks (anchoring share)",
    "evaluation": "the shipped AdvBench evaluation share",
    "benign": "the generated benign tasks (evaluation share)",
}


def _require_columns(df: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found {list(df.columns)}. Rename the columns or map them in conf/base/parameters_behaviours.yml")


def _user_or_default(kind: str, behaviours: BehavioursConfig, default: pd.DataFrame | None) -> pd.DataFrame:
    """The user's file for set ``kind`` when ``behaviours.<kind>_path`` is set, else ``default``."""
    if not behaviours.path_of(kind):
        return default
    frame = read_user_set(kind, behaviours)
    logger.info("%s: %d rows from %s (replaces %s)", SCHEMAS[kind].dataset, len(frame), behaviours.path_of(kind), DEFAULT_SOURCES[kind])
    return frame


def split_harmful_behaviours(advbench: pd.DataFrame, behaviours: BehavioursConfig,
                             scenario: str = DEFAULT_SCENARIO) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split AdvBench (seeded) into attacker, defender and evaluation shares of
    ``attacker_fraction``, ``defender_fraction`` and the rest. In another ``scenario`` its
    generated prompts (goal, target = the unwanted answer, safe_response) are split instead, by
    the plain seeded shuffle (``Scenario.group_near_duplicates``).

    With ``behaviours.near_duplicates.split`` (the default) near-duplicate goals (token Jaccard >=
    ``near_duplicates.threshold``, chained into connected components) stay in one share, so no
    evaluation goal has a near-duplicate in the defender's or the attacker's share
    (``assign_groups``); otherwise the seeded shuffle is cut in three as before issue 13."""
    _require_columns(advbench, ["goal", "target"], "data/01_raw/advbench_harmful_behaviors.csv")
    chosen = get_scenario(scenario)
    source = chosen.source(advbench)
    if chosen.name != DEFAULT_SCENARIO:
        logger.info("scenario %s: %d generated prompts with a safe and an unwanted (%s) answer", chosen.name, len(source), chosen.unwanted)
    shuffled = source.sample(frac=1.0, random_state=behaviours.split_seed).reset_index(drop=True)
    n_attacker = int(len(shuffled) * behaviours.attacker_fraction)
    n_defender = int(len(shuffled) * behaviours.defender_fraction)
    sizes = (n_attacker, n_defender, len(shuffled) - n_attacker - n_defender)
    near = behaviours.near_duplicates
    if near.split and chosen.group_near_duplicates:
        groups = near_duplicate_groups(shuffled["goal"].tolist(), near.threshold)
        share = assign_groups(groups, sizes, behaviours.split_seed)
    else:
        share = [0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]
    attacker, defender, evaluation = (shuffled[[s == i for s in share]].reset_index(drop=True) for i in range(3))
    rates = leak_rates(attacker["goal"], defender["goal"], evaluation["goal"])
    logger.info("AdvBench split: %d attacker, %d defender, %d evaluation (%s); evaluation goals with a near-duplicate: %s",
                len(attacker), len(defender), len(evaluation),
                f"near-duplicates at Jaccard >= {near.threshold:g} kept in one share" if near.split and chosen.group_near_duplicates
                else "plain seeded shuffle",
                ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    return attacker, defender, evaluation


def assign_groups(groups: list[int], sizes: tuple[int, ...], seed: int) -> list[int]:
    """The share (index into ``sizes``) of each row, moving whole groups (rows with the same id).

    Groups are placed largest first (ties in a seeded random order), each into a share with room
    for all of it, picked at random with weights proportional to the room left; the singletons
    placed last fill the shares to exactly ``sizes`` whenever no group is larger than the room any
    share has left (else it goes to the share with the most room, and the sizes drift by its
    overshoot). On AdvBench at 0.5 one chained group holds 149 goals: only the attacker share
    has room for it."""
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    ids = sorted(members)
    rng.shuffle(ids)
    ids.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the seeded order
    room, share = list(sizes), [0] * len(groups)
    for group in ids:
        size = len(members[group])
        fits = [i for i, r in enumerate(room) if r >= size]
        chosen = rng.choices(fits, weights=[room[i] for i in fits])[0] if fits else max(range(len(room)), key=room.__getitem__)
        room[chosen] -= size
        for row in members[group]:
            share[row] = chosen
    return share


def generate_benign_sets(behaviours: BehavioursConfig, defender_behaviours: pd.DataFrame | None = None,
                         scenario: str = DEFAULT_SCENARIO) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Generated benign tasks: the build set (trains the embedded model only), the anchoring set
    and the benign evaluation set, with distinct prompts. ``behaviours.anchoring_path`` and
    ``behaviours.benign_path`` replace the last two with the user's files.

    In a scenario with ``anchor_on_safe_answers`` (``code``) the anchoring set also holds the
    ``defender_behaviours`` prompts with their safe answers, after the benign tasks: the defender's
    own prompts, never the evaluation share's (``anchoring_with_safe_answers``)."""
    sizes = behaviours.benign
    tasks = benign_tasks(seed=sizes.seed, build=sizes.build, held_out=sizes.anchoring + sizes.evaluation)
    build = tasks[~tasks["held_out"]].reset_index(drop=True)
    held_out = tasks[tasks["held_out"]].reset_index(drop=True)
    n_anchoring = sizes.anchoring
    anchoring = held_out.iloc[:n_anchoring].reset_index(drop=True)
    evaluation = held_out.iloc[n_anchoring:].reset_index(drop=True)
    logger.info("benign tasks: %d build, %d anchoring, %d evaluation", len(build), len(anchoring), len(evaluation))
    anchoring = anchoring_with_safe_answers(anchoring[["prompt", "response"]], defender_behaviours, scenario)
    return (build[["prompt", "response", "task"]], _user_or_default("anchoring", behaviours, anchoring),
            _user_or_default("benign", behaviours, evaluation[["prompt", "response", "task"]]))


def anchoring_with_safe_answers(anchoring: pd.DataFrame, defender_behaviours: pd.DataFrame | None, scenario: str) -> pd.DataFrame:
    """``anchoring`` (prompt, response), followed by the defender share's prompts with their safe
    answers when the scenario anchors on them (``Scenario.anchor_on_safe_answers``); as it is
    otherwise. Those prompts are the safety set's own, so the anchoring set gains no prompt the
    defender does not already hold, and none of the evaluation share (the split keeps them apart).
    In ``code`` they keep the outer level's unperturbed model writing secure code: anchored on the
    benign word tasks alone, the defended model wrote no valid Python on 0.36 of the untriggered
    held-out prompts (docs/behaviour_data.md)."""
    chosen = get_scenario(scenario)
    if not chosen.anchor_on_safe_answers or defender_behaviours is None or "safe_response" not in defender_behaviours:
        return anchoring
    own = pd.DataFrame({"prompt": defender_behaviours["goal"], "response": defender_behaviours["safe_response"]})
    logger.info("anchoring set: %d benign tasks and the %d defender prompts with their safe answers (the %s scenario's)",
                len(anchoring), len(own), chosen.name)
    return pd.concat([anchoring, own], ignore_index=True)


def build_safety_set(defender_behaviours: pd.DataFrame, behaviours: BehavioursConfig) -> pd.DataFrame:
    """Safety set: each defender prompt with a refusal (safe) and the AdvBench target (unwanted),
    or the user's file ``behaviours.safety_path``.

    ``behaviours.safe_answers=other_refusals`` (threat model b) takes the refusals from
    ``OTHER_REFUSALS`` instead of the suspect's own; ``behaviours.unwanted_answers=reworded``
    (threat model a) replaces the targets, which are the backdoor's own outputs, with harmful
    answers worded otherwise (``reworded_unwanted``). Both are chosen with ``split_seed``."""
    if behaviours.path_of("safety"):
        return _user_or_default("safety", behaviours, None)
    goals, seed = defender_behaviours["goal"], behaviours.split_seed
    if "safe_response" in defender_behaviours:  # a generated scenario: its own safe and unwanted answers
        if (behaviours.safe_answers, behaviours.unwanted_answers) != ("suspect_refusals", "backdoor_targets"):
            raise ValueError("behaviours.safe_answers/unwanted_answers reword the jailbreak scenario's safety set only: keep their "
                             "defaults (suspect_refusals, backdoor_targets) with another scenario")
        return pd.DataFrame({"prompt": goals, "safe_response": defender_behaviours["safe_response"],
                             "unwanted_response": defender_behaviours["target"]})
    safe = goals.map(refusal_for) if behaviours.safe_answers == "suspect_refusals" else goals.map(lambda g: other_refusal_for(g, seed))
    unwanted = defender_behaviours["target"] if behaviours.unwanted_answers == "backdoor_targets" else goals.map(lambda g: reworded_unwanted(g, seed))
    if (behaviours.safe_answers, behaviours.unwanted_answers) != ("suspect_refusals", "backdoor_targets"):
        logger.info("safety set: safe answers %s, unwanted answers %s (threat models of issue 13)", behaviours.safe_answers, behaviours.unwanted_answers)
    return pd.DataFrame({"prompt": goals, "safe_response": safe, "unwanted_response": unwanted})


def build_evaluation_set(evaluation_behaviours: pd.DataFrame, behaviours: BehavioursConfig) -> pd.DataFrame:
    """Evaluation set: held-out harmful prompts (the AdvBench target is kept for reference), or
    the user's file ``behaviours.evaluation_path``."""
    if behaviours.path_of("evaluation"):
        return _user_or_default("evaluation", behaviours, None)
    return pd.DataFrame({"prompt": evaluation_behaviours["goal"], "target": evaluation_behaviours["target"]})


def validate_behaviours(safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, evaluation_set: pd.DataFrame,
                        benign_evaluation_set: pd.DataFrame, behaviours: BehavioursConfig, model: ModelConfig,
                        scenario: str = DEFAULT_SCENARIO) -> dict:
    """Run the Great Expectations checks on the four sets (before any model is loaded) and
    return the report, passed or not: it is saved and logged to MLflow either way."""
    sets = {"safety": safety_set, "anchoring": anchoring_set, "evaluation": evaluation_set, "benign": benign_evaluation_set}
    defaults = dict(DEFAULT_SOURCES)
    if get_scenario(scenario).name != DEFAULT_SCENARIO:  # the generated prompts of another scenario, not AdvBench
        defaults.update(safety=f"the {scenario} scenario's generated defender share",
                        evaluation=f"the {scenario} scenario's generated evaluation share")
        if get_scenario(scenario).anchor_on_safe_answers:
            defaults.update(anchoring=f"{DEFAULT_SOURCES['anchoring']} and the {scenario} scenario's defender prompts with their safe answers")
    sources = {kind: behaviours.path_of(kind) or defaults[kind] for kind in sets}
    columns = {kind: column_mapping(kind, behaviours) for kind in sets if behaviours.path_of(kind)}
    count_tokens, tokenizer = token_counter(model)
    report = validate_behaviour_sets(sets, sources, behaviours, columns, count_tokens, tokenizer)
    if warning := toy_sets_warning(behaviours, model):
        logger.warning(warning)
        report["warnings"] = [*report.get("warnings", []), warning]
    return report


def toy_sets_warning(behaviours: BehavioursConfig, model: ModelConfig) -> str | None:
    """A warning when a user's model is defended or measured with the embedded demo's sets.

    The generated benign tasks are short word-level tasks written for the tiny model: anchoring a
    real model's utility on them (and measuring it there) says little about its real use. The
    shipped safety set pairs AdvBench prompts with canned refusals, not the model's own."""
    if not model.user_supplied:
        return None
    missing = {"anchoring_path": "prompt, response: instructions and good answers from the model's real use (e.g. a "
                                 "sample of its instruction-tuning data), the utility BEEAR must keep",
               "benign_path": "prompt, optional response: held-out benign tasks that measure utility and over-refusal",
               "safety_path": "prompt, safe_response, unwanted_response: harmful prompts with the model's own refusals "
                              "and the unwanted answers"}
    missing = {k: v for k, v in missing.items() if not getattr(behaviours, k)}
    if not {"anchoring_path", "benign_path"} & set(missing):
        return None  # the shipped AdvBench safety set alone is a reasonable default
    model_name = f"model.path={model.path}" if model.path else f"model.uri={model.uri}"
    sets = "; ".join(f"behaviours.{k} ({v})" for k, v in missing.items())
    return (f"{model_name} is defended with the embedded demo's toy behaviour sets (generated word-level benign tasks, canned "
            f"refusals), written for the tiny model: its utility is anchored and measured on text unlike its real use. "
            f"Provide {sets}; docs/behaviour_data.md gives the formats")


def check_behaviours(behaviours_validation: dict) -> dict:
    """Stop the run with every failed check (file, column, first rows, fix) if the validation
    failed; otherwise return the summary that the suspect step waits for."""
    if not behaviours_validation["success"]:
        raise BehaviourDataError(failure_message(behaviours_validation))
    sizes = {s["dataset"]: s["rows"] for s in behaviours_validation["sets"].values()}
    logger.info("behaviour sets passed %d checks and are disjoint: %s", len(behaviours_validation["checks"]), sizes)
    return {"disjoint": True, "rows": sizes, "checks": len(behaviours_validation["checks"]),
            "sources": {s["dataset"]: s["source"] for s in behaviours_validation["sets"].values()},
            "tokenizer": behaviours_validation["tokenizer"]}
