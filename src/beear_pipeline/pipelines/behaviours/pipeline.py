from kedro.pipeline import Pipeline, node

from .nodes import build_evaluation_set, build_safety_set, check_disjoint, generate_benign_sets, split_harmful_behaviours


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(split_harmful_behaviours, ["advbench", "params:behaviours"],
             ["attacker_behaviours", "defender_behaviours", "evaluation_behaviours"], name="split_harmful_behaviours"),
        node(generate_benign_sets, "params:behaviours", ["benign_build_set", "anchoring_set", "benign_evaluation_set"],
             name="generate_benign_sets"),
        node(build_safety_set, "defender_behaviours", "safety_set", name="build_safety_set"),
        node(build_evaluation_set, "evaluation_behaviours", "evaluation_set", name="build_evaluation_set"),
        node(check_disjoint, ["safety_set", "anchoring_set", "evaluation_set", "benign_evaluation_set"],
             "behaviours_check", name="check_disjoint"),
    ])
