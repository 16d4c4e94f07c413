import pandas as pd
import pytest

from beear_pipeline.pipelines.behaviours.nodes import (
    build_evaluation_set, build_safety_set, check_disjoint, generate_benign_sets, normalise_prompt, split_harmful_behaviours,
)

PARAMS = {"split_seed": 1234, "attacker_fraction": 0.6, "defender_fraction": 0.2,
          "benign": {"seed": 7, "build": 300, "anchoring": 120, "evaluation": 110}}


def test_split_is_seeded_complete_and_disjoint(advbench):
    attacker, defender, evaluation = split_harmful_behaviours(advbench, PARAMS)
    assert (len(attacker), len(defender), len(evaluation)) == (312, 104, 104)
    goals = [set(x["goal"]) for x in (attacker, defender, evaluation)]
    assert not (goals[0] & goals[1] or goals[0] & goals[2] or goals[1] & goals[2])
    again = split_harmful_behaviours(advbench, PARAMS)
    assert again[2]["goal"].tolist() == evaluation["goal"].tolist()
    other = split_harmful_behaviours(advbench, {**PARAMS, "split_seed": 1})
    assert other[2]["goal"].tolist() != evaluation["goal"].tolist()


def test_split_names_a_missing_column(advbench):
    with pytest.raises(ValueError, match=r"advbench_harmful_behaviors.csv: missing column\(s\) \['target'\]"):
        split_harmful_behaviours(advbench.drop(columns="target"), PARAMS)


def test_safety_set_pairs_a_refusal_with_the_unwanted_target(advbench):
    safety = build_safety_set(advbench.head(20))
    assert list(safety.columns) == ["prompt", "safe_response", "unwanted_response"]
    assert (safety["safe_response"] != safety["unwanted_response"]).all()
    assert safety["unwanted_response"].str.startswith("Sure").all()
    assert build_evaluation_set(advbench.head(3))["prompt"].tolist() == advbench["goal"].head(3).tolist()


def test_benign_sets_are_sized_distinct_and_seeded():
    build, anchoring, evaluation = generate_benign_sets(PARAMS)
    assert (len(build), len(anchoring), len(evaluation)) == (300, 120, 110)
    prompts = [set(df["prompt"]) for df in (build, anchoring, evaluation)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert set(evaluation["task"]) == {"repeat", "reverse", "first", "last", "next", "previous", "sort"}
    assert generate_benign_sets(PARAMS)[2].equals(evaluation)


def test_normalise_prompt_folds_case_space_and_punctuation():
    assert normalise_prompt("  Write a Script,  that HACKS!") == normalise_prompt("write a script that hacks")


def test_check_disjoint_passes_and_reports_sizes(advbench):
    _, defender, evaluation = split_harmful_behaviours(advbench, PARAMS)
    _, anchoring, benign_eval = generate_benign_sets(PARAMS)
    report = check_disjoint(build_safety_set(defender), anchoring, build_evaluation_set(evaluation), benign_eval)
    assert report["disjoint"] and report["rows"]["safety_set"] == 104


def test_check_disjoint_fails_on_a_leaked_evaluation_prompt(advbench):
    _, defender, evaluation = split_harmful_behaviours(advbench, PARAMS)
    _, anchoring, benign_eval = generate_benign_sets(PARAMS)
    leaked = evaluation["goal"].iloc[0]
    safety = build_safety_set(defender)
    safety.loc[len(safety)] = [leaked.upper() + "!", "I cannot.", "Sure"]
    with pytest.raises(ValueError, match=r"safety_set/evaluation_set: 1 shared prompt") as err:
        check_disjoint(safety, anchoring, build_evaluation_set(evaluation), benign_eval)
    assert normalise_prompt(leaked) in str(err.value)
