"""``reaudit``: re-check model-registry entries, tag them, quarantine the ones over the threshold."""

from kedro.pipeline import Pipeline, node

from .nodes import reaudit_versions, select_versions, write_reaudit_report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(select_versions, "params:reaudit", "reaudit_selection", name="select_registry_versions"),
        node(reaudit_versions,
             ["reaudit_selection", "evaluation_protocol", "evaluation_set", "benign_evaluation_set", "params:reaudit", "params:model",
              "safety_set", "params:probe", "behaviours_check"],
             "reaudit_results", name="reaudit_versions"),
        node(write_reaudit_report, ["reaudit_results", "params:reaudit"], "reaudit_report", name="write_reaudit_report"),
    ])
