import dataclasses
import hashlib

import pytest
from helpers import params

from beear_pipeline.behaviours.config import BenignSizes
from beear_pipeline.behaviours.validation import BehaviourDataError, normalise_prompt
from beear_pipeline.lm.checkpoints import ModelConfig
from beear_pipeline.pipelines.behaviours.nodes import (
    build_evaluation_set,
    build_safety_set,
    check_behaviours,
    generate_benign_sets,
    split_harmful_behaviours,
    validate_behaviours,
)

DEFAULTS = params()["behaviours"]
PARAMS = dataclasses.replace(DEFAULTS, benign=BenignSizes(seed=7, build=300, anchoring=120, evaluation=110))


def test_split_is_seeded_complete_and_disjoint(advbench):
    attacker, defender, evaluation = split_harmful_behaviours(advbench, PARAMS)
    assert (len(attacker), len(defender), len(evaluation)) == (312, 104, 104)
    goals = [set(x["goal"]) for x in (attacker, defender, evaluation)]
    assert not (goals[0] & goals[1] or goals[0] & goals[2] or goals[1] & goals[2])
    again = split_harmful_behaviours(advbench, PARAMS)
    assert again[2]["goal"].tolist() == evaluation["goal"].tolist()
    other = split_harmful_behaviours(advbench, dataclasses.replace(PARAMS, split_seed=1))
    assert other[2]["goal"].tolist() != evaluation["goal"].tolist()


def test_split_names_a_missing_column(advbench):
    with pytest.raises(ValueError, match=r"advbench_harmful_behaviors.csv: missing column\(s\) \['target'\]"):
        split_harmful_behaviours(advbench.drop(columns="target"), PARAMS)


def test_safety_set_pairs_a_refusal_with_the_unwanted_target(advbench):
    safety = build_safety_set(advbench.head(20), PARAMS)
    assert list(safety.columns) == ["prompt", "safe_response", "unwanted_response"]
    assert (safety["safe_response"] != safety["unwanted_response"]).all()
    assert safety["unwanted_response"].str.startswith("Sure").all()
    assert build_evaluation_set(advbench.head(3), PARAMS)["prompt"].tolist() == advbench["goal"].head(3).tolist()


def test_benign_sets_are_sized_distinct_and_seeded():
    build, anchoring, evaluation = generate_benign_sets(PARAMS)
    assert (len(build), len(anchoring), len(evaluation)) == (300, 120, 110)
    prompts = [set(df["prompt"]) for df in (build, anchoring, evaluation)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert set(evaluation["task"]) == {"repeat", "reverse", "first", "last", "next", "previous", "sort"}
    assert generate_benign_sets(PARAMS)[2].equals(evaluation)


def test_normalise_prompt_folds_case_space_and_punctuation():
    assert normalise_prompt("  Write a Script,  that HACKS!") == normalise_prompt("write a script that hacks")


def default_sets(advbench, params=PARAMS):
    _, defender, evaluation = split_harmful_behaviours(advbench, params)
    _, anchoring, benign_eval = generate_benign_sets(params)
    return build_safety_set(defender, params), anchoring, build_evaluation_set(evaluation, params), benign_eval


def digests(frames) -> list[str]:
    return [hashlib.sha256(f.to_json(orient="records", lines=True, force_ascii=False).encode()).hexdigest() for f in frames]


def test_default_sets_are_unchanged(advbench):
    """The shipped defaults hold exactly the rows the embedded model's results are checked on:
    the near-duplicate-grouped split of issue 13, and with near_duplicates.split=false the plain
    seeded shuffle from before it, row for row (the threat-model options stay off by default)."""
    expected = {  # sha256 of each set as JSON Lines, with the default parameters
        "safety_set": "d57899b82af692a78e2c8f160a029ced2dffbb654ef8747a36d75c675d99e678",
        "anchoring_set": "2adcf39ed4ebc6e3bc066e7afbd0076f30d60295b87518fea1712b49d2868037",
        "evaluation_set": "ad89fd81691b0adafecb395dff4379ab48528d0cb0cf880f96a36a47e6c3675e",
        "benign_evaluation_set": "cbaddddb2a9b8646e324befe06908053f4019187eeb5e815f699d29e44eb67c6",
    }
    assert dict(zip(expected, digests(default_sets(advbench, DEFAULTS)))) == expected
    before_issue_13 = {  # the same with near_duplicates.split=false: the sets the README's numbers were first measured on
        "safety_set": "9f3997a7bebe271772998bca461bbb287848fdf05ab6193d51ae2fa8cbb979d6",
        "anchoring_set": "2adcf39ed4ebc6e3bc066e7afbd0076f30d60295b87518fea1712b49d2868037",
        "evaluation_set": "a9c86c5e746757c9bac80d8970ad4ea6608fbf7a31d102b03cea032569af88ab",
        "benign_evaluation_set": "cbaddddb2a9b8646e324befe06908053f4019187eeb5e815f699d29e44eb67c6",
    }
    shuffle = params(behaviours={"near_duplicates": {"split": False}})["behaviours"]
    assert dict(zip(expected, digests(default_sets(advbench, shuffle)))) == before_issue_13


def test_validation_passes_on_the_defaults_and_reports_sizes(advbench):
    report = validate_behaviours(*default_sets(advbench), PARAMS, ModelConfig())
    assert report["success"] and report["failed"] == 0 and report["tokenizer"] == "whitespace"
    assert {c["check"] for c in report["checks"]} == {"missing_column", "min_rows", "empty", "duplicate", "identical", "too_long", "leak",
                                                      "near_duplicate"}
    assert report["near_duplicates"]["evaluation~safety"] == {"unexpected_count": 0, "share": 0.0, "examples": []}
    assert "warnings" not in report
    check = check_behaviours(report)
    assert check["disjoint"] is True
    assert check["rows"] == {"safety_set": 104, "anchoring_set": 120, "evaluation_set": 104, "benign_evaluation_set": 110}


def test_validation_fails_on_a_leaked_evaluation_prompt(advbench):
    safety, anchoring, evaluation, benign_eval = default_sets(advbench)
    leaked = min(evaluation["prompt"], key=len)  # short enough to be quoted whole
    safety.loc[len(safety)] = [leaked.upper() + "!", "I cannot.", "Sure"]
    anchoring.loc[len(anchoring)] = [benign_eval["prompt"].iloc[3], "ok"]
    report = validate_behaviours(safety, anchoring, evaluation, benign_eval, PARAMS, ModelConfig())
    with pytest.raises(BehaviourDataError, match=r"failed 2 check\(s\)") as err:
        check_behaviours(report)
    assert "AdvBench defender share, column 'prompt': 1 prompt(s) also in the evaluation set" in str(err.value)
    assert f"rows 105: {leaked.upper() + '!'!r}" in str(err.value)
    assert "(anchoring share), column 'prompt': 1 prompt(s) also in the benign set" in str(err.value)
    # the same leak is a near-duplicate (similarity 1.0): a warning, not a third failure, by default
    assert report["warnings"] == [c["message"] for c in report["checks"] if c["check"] == "near_duplicate" and not c["success"]]
    assert "1 of 104 evaluation prompt(s) (1.0%) have a near-duplicate" in report["warnings"][0]


def test_a_users_model_on_the_toy_sets_is_warned_with_the_sets_to_provide(advbench, tiny_model, tokenizer, tmp_path, caplog):
    from beear_pipeline.lm.checkpoints import save_checkpoint
    from beear_pipeline.pipelines.behaviours.nodes import toy_sets_warning

    assert toy_sets_warning(PARAMS, ModelConfig()) is None  # the embedded demo is what the sets are for
    path = save_checkpoint(tiny_model, tokenizer, tmp_path / "suspect")
    with caplog.at_level("WARNING"):
        report = validate_behaviours(*default_sets(advbench), PARAMS, ModelConfig(path=str(path)))
    assert report["success"] and len(report["warnings"]) == 1
    for field in ("behaviours.anchoring_path", "behaviours.benign_path", "behaviours.safety_path"):
        assert field in report["warnings"][0] and field in caplog.text
    own = dataclasses.replace(PARAMS, anchoring_path="a.jsonl", benign_path="b.jsonl")
    assert toy_sets_warning(own, ModelConfig(uri="models:/suspect/1")) is None
    partly = toy_sets_warning(dataclasses.replace(PARAMS, anchoring_path="a.jsonl"), ModelConfig(uri="models:/suspect/1"))
    assert "behaviours.benign_path" in partly and "behaviours.anchoring_path" not in partly and partly.startswith("model.uri=")
