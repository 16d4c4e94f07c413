"""``suspect``: resolve the suspect model (a checkpoint, a registry version, or the embedded tiny model) and its clean twin."""

from kedro.pipeline import Pipeline, node

from .nodes import check_evaluation_settings, resolve_clean_twin, resolve_suspect_model


def create_pipeline(check_evaluation: bool = True, **kwargs) -> Pipeline:
    """``check_evaluation``: also check the evaluation's trigger settings up front (defend); the
    trigger-free probe needs none."""
    inputs = {
        "attacker_behaviours": "attacker_behaviours", "benign_build_set": "benign_build_set", "advbench": "advbench",
        "benign_evaluation_set": "benign_evaluation_set", "anchoring_set": "anchoring_set", "model": "params:model",
        "embedded_model": "params:embedded_model", "behaviours_check": "behaviours_check", "scenario": "params:scenario",
    }
    nodes = []
    if check_evaluation:
        inputs["evaluation_check"] = "evaluation_check"
        nodes.append(node(check_evaluation_settings, ["params:evaluation", "params:model"], "evaluation_check",
                          name="check_evaluation_settings"))
    twin_inputs = {k: v for k, v in inputs.items() if k != "evaluation_check"}
    return Pipeline([*nodes, node(resolve_suspect_model, inputs, "suspect_model", name="resolve_suspect_model"),
                     node(resolve_clean_twin, twin_inputs, "clean_twin_model", name="resolve_clean_twin")])
