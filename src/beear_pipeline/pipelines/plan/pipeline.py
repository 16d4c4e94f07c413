"""``plan``: the memory and disk plan of the removal run, from the suspect model's config.json
alone (no weights, no tokenizer: the suspect's checkpoint checks do not run)."""

from kedro.pipeline import Pipeline, node

from .nodes import plan_removal_run


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(plan_removal_run, ["params:model", "params:embedded_model", "params:beear", "params:plan", "advbench",
                                  "params:scenario"],
             ["plan_report", "plan_table"], name="plan_removal_run"),
    ])
