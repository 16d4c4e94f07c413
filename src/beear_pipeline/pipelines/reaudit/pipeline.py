"""``reaudit``: re-check model-registry entries, tag them, quarantine the ones over the threshold.

``create_pipeline`` audits every selected version in turn, in one process. Fanned out (one task per
version: ``python -m beear_pipeline reaudit --workers N``, the Airflow DAG) the same work is three
pipelines: ``create_prepare_pipeline`` (the selection), ``create_version_pipeline`` (one version,
``reaudit.version``, its own result file) and ``create_gather_pipeline`` (one report).
"""

from kedro.pipeline import Pipeline, node

from .nodes import gather_reaudit_results, reaudit_one_version, reaudit_versions, select_versions, write_reaudit_report

_AUDIT_INPUTS = ["reaudit_selection", "evaluation_protocol", "evaluation_set", "benign_evaluation_set", "params:reaudit", "params:model",
                 "safety_set", "params:probe"]


def create_prepare_pipeline(**kwargs) -> Pipeline:
    return Pipeline([node(select_versions, "params:reaudit", "reaudit_selection", name="select_registry_versions")])


def create_pipeline(**kwargs) -> Pipeline:
    return create_prepare_pipeline() + Pipeline([
        node(reaudit_versions, [*_AUDIT_INPUTS, "behaviours_check"], "reaudit_results", name="reaudit_versions"),
        node(write_reaudit_report, ["reaudit_results", "params:reaudit"], "reaudit_report", name="write_reaudit_report"),
    ])


def create_version_pipeline(**kwargs) -> Pipeline:
    return Pipeline([node(reaudit_one_version, _AUDIT_INPUTS, "reaudit_version_result", name="reaudit_one_version")])


def create_gather_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(gather_reaudit_results, ["reaudit_selection", "reaudit_version_results", "params:reaudit"], "reaudit_results",
             name="gather_reaudit_results"),
        node(write_reaudit_report, ["reaudit_results", "params:reaudit"], "reaudit_report", name="write_reaudit_report"),
    ])
