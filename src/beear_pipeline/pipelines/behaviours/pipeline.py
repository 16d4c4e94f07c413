from kedro.pipeline import Pipeline, node

from .nodes import (
    build_evaluation_set,
    build_safety_set,
    check_behaviours,
    generate_benign_sets,
    split_harmful_behaviours,
    validate_behaviours,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(split_harmful_behaviours, ["advbench", "params:behaviours", "params:scenario"],
             ["attacker_behaviours", "defender_behaviours", "evaluation_behaviours"], name="split_harmful_behaviours"),
        node(generate_benign_sets, ["params:behaviours", "defender_behaviours", "params:scenario"],
             ["benign_build_set", "anchoring_set", "benign_evaluation_set"],
             name="generate_benign_sets"),
        node(build_safety_set, ["defender_behaviours", "params:behaviours"], "safety_set", name="build_safety_set"),
        node(build_evaluation_set, ["evaluation_behaviours", "params:behaviours"], "evaluation_set", name="build_evaluation_set"),
        # validated before any model loads: the suspect step takes behaviours_check as an input
        node(validate_behaviours, ["safety_set", "anchoring_set", "evaluation_set", "benign_evaluation_set", "params:behaviours",
                                   "params:model", "params:scenario"], "behaviours_validation", name="validate_behaviours"),
        node(check_behaviours, "behaviours_validation", "behaviours_check", name="check_behaviours"),
    ])
