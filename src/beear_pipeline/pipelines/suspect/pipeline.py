from kedro.pipeline import Pipeline, node

from .nodes import resolve_suspect_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(resolve_suspect_model,
             ["attacker_behaviours", "benign_build_set", "advbench", "benign_evaluation_set", "anchoring_set",
              "params:model", "params:embedded_model", "params:evaluation", "behaviours_check"],
             "suspect_model", name="resolve_suspect_model"),
    ])
