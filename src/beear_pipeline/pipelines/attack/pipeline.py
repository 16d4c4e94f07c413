"""``attack``: adaptive attacks (a GCG suffix search, the latent entrapment curve, variants of the
known trigger) on the suspect, the defended model and the clean twin, with one budget."""

from kedro.pipeline import Pipeline, node

from .nodes import attack_models


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(attack_models,
             ["suspect_model", "defended_model", "clean_twin_model", "safety_set", "evaluation_set", "evaluation_protocol",
              "probe_report", "params:attack", "params:model"],
             "attack_results", name="attack_models"),
    ])
