from kedro.pipeline import Pipeline, node

from .nodes import probe_suspect_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(probe_suspect_model, ["suspect_model", "safety_set", "evaluation_set", "params:probe"],
             ["probe_report", "probe_perturbations", "probe_plots"], name="probe_suspect_model"),
    ])
