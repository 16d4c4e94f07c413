"""``removal``: BEEAR and its two baselines on the suspect model."""

from kedro.pipeline import Pipeline, node

from .nodes import defend_with_beear, defend_with_control, defend_with_random_perturbation

_INPUTS = ["suspect_model", "safety_set", "anchoring_set", "params:beear", "probe_report"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(defend_with_beear, [*_INPUTS, "params:distributed", "params:scenario"], ["defended_model", "beear_perturbation", "beear_history"], name="defend_with_beear"),
        node(defend_with_control, [*_INPUTS, "beear_history", "params:distributed", "params:scenario"], ["control_model", "control_history"], name="defend_with_control"),
        node(defend_with_random_perturbation, [*_INPUTS, "beear_history", "params:distributed", "params:scenario"],
             ["random_perturbation_model", "random_perturbation_history"], name="defend_with_random_perturbation"),
    ])
