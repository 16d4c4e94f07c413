from kedro.pipeline import Pipeline, node

from .nodes import register_models


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(register_models, ["suspect_model", "defended_model", "metrics", "params:registry"], "registry_record",
             name="register_models"),
    ])
