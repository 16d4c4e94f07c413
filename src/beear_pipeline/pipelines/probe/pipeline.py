from kedro.pipeline import Pipeline, node

from .nodes import probe_suspect_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        # clean_twin_model: the reference that calibrates the verdict when probe.reference_model_path is null
        node(probe_suspect_model, ["suspect_model", "safety_set", "evaluation_set", "params:probe", "clean_twin_model",
                                       "params:scenario"],
             ["probe_report", "probe_perturbations", "probe_plots"], name="probe_suspect_model"),
    ])
