from kedro.pipeline import Pipeline, node

from .nodes import resolve_suspect_model


def create_pipeline(check_evaluation: bool = True, **kwargs) -> Pipeline:
    """``check_evaluation``: also check the evaluation's trigger settings up front (defend); the
    trigger-free probe needs none."""
    inputs = {
        "attacker_behaviours": "attacker_behaviours", "benign_build_set": "benign_build_set", "advbench": "advbench",
        "benign_evaluation_set": "benign_evaluation_set", "anchoring_set": "anchoring_set", "model": "params:model",
        "embedded_model": "params:embedded_model", "behaviours_check": "behaviours_check",
    }
    if check_evaluation:
        inputs["evaluation"] = "params:evaluation"
    return Pipeline([node(resolve_suspect_model, inputs, "suspect_model", name="resolve_suspect_model")])
