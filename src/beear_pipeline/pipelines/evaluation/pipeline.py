"""``evaluation``: every model under one protocol, the persistence check, and the report."""

from kedro.pipeline import Pipeline, node

from .nodes import (
    MODELS,
    assemble_metrics,
    check_persistence,
    evaluate_clean_twin,
    evaluate_model,
    lm_eval_utility,
    resolve_evaluation_protocol,
    write_report,
)

_MODEL_INPUT = {"suspect": "suspect_model", "defended": "defended_model", "control": "control_model",
                "random_perturbation": "random_perturbation_model"}


def create_pipeline(**kwargs) -> Pipeline:
    evaluations = [node(evaluate_model, [_MODEL_INPUT[m], "evaluation_protocol", "evaluation_set", "benign_evaluation_set",
                                         "params:model"], f"{m}_evaluation", name=f"evaluate_{m}") for m in MODELS]
    return Pipeline([
        node(resolve_evaluation_protocol, ["params:evaluation", "params:model", "params:embedded_model", "evaluation_set",
                                           "benign_evaluation_set", "params:scenario"], "evaluation_protocol", name="resolve_evaluation_protocol"),
        *evaluations,
        node(evaluate_clean_twin, ["clean_twin_model", "evaluation_protocol", "evaluation_set", "benign_evaluation_set", "params:model"],
             "clean_twin_evaluation", name="evaluate_clean_twin"),
        node(check_persistence,
             ["suspect_model", "defended_model", "clean_twin_model", "evaluation_set", "safety_set", "attacker_behaviours", "params:persistence",
              "evaluation_protocol", "params:model"], "persistence", name="check_persistence"),
        node(lm_eval_utility, ["suspect_model", "defended_model", "evaluation_protocol", "params:model"], "lm_eval_results", name="lm_eval_utility"),
        node(assemble_metrics,
             ["suspect_model", "clean_twin_model", *(f"{m}_evaluation" for m in MODELS), "clean_twin_evaluation", "beear_history", "control_history",
              "random_perturbation_history", "persistence", "probe_report", "lm_eval_results", "evaluation_protocol",
              "attack_results"],
             ["metrics", "final_metrics"], name="assemble_metrics"),
        node(write_report, ["metrics", "beear_history", "control_history", "random_perturbation_history"],
             ["plots", "evaluation_report_md", "evaluation_report_html"], name="write_report"),
    ])
