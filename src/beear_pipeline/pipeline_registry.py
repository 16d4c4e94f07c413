"""Project pipelines.

- ``behaviours``: prepare and validate the safety, anchoring and evaluation sets.
- ``suspect``: resolve the suspect model (a checkpoint, a registry version, or the embedded tiny model built once)
  and its clean twin (``model.reference_path``, or the embedded recipe without the poison).
- ``embedded_model``: ``behaviours`` + ``suspect`` (builds the embedded model; a DVC stage).
- ``probe``: trigger-free probe: is there evidence of a backdoor, and at which layer to defend.
- ``removal``: BEEAR and its two baselines (the control and the random perturbation) on the suspect model.
- ``evaluation``: evaluate every model (and the clean twin) under one protocol; the persistence check;
  ``reports/metrics.json``, the report and plots.
- ``attack``: adaptive attacks on the suspect, the defended model and the clean twin with one budget:
  a GCG-style suffix search, the latent entrapment curve, trigger variants (into ``metrics.json``).
- ``register``: register the suspect and defended models (when ``registry.name`` is set).
- ``reaudit``: re-evaluate registry entries, tag them, quarantine the ones over the threshold.
- ``reaudit_prepare``, ``reaudit_version``, ``reaudit_gather``: the same fanned out, one task per
  version (``python -m beear_pipeline reaudit --workers N``; the Airflow DAG in deploy/airflow).
- ``plan``: the memory and disk plan of the removal run from the suspect's config.json alone, before
  anything loads (``--params model.path=DIR`` needs only DIR/config.json).
- ``defend`` (also the default): all of the above but ``reaudit`` and ``plan``, end to end.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from beear_pipeline.pipelines import attack, behaviours, evaluation, plan, probe, reaudit, register, removal, suspect


def register_pipelines() -> dict[str, Pipeline]:
    parts = {
        "behaviours": behaviours.create_pipeline(),
        "suspect": suspect.create_pipeline(),
        "removal": removal.create_pipeline(),
        "probe": probe.create_pipeline(),
        "evaluation": evaluation.create_pipeline(),
        "attack": attack.create_pipeline(),
        "register": register.create_pipeline(),
    }
    defend = sum(parts.values(), Pipeline([]))
    protocol = parts["evaluation"].only_nodes("resolve_evaluation_protocol")
    return {
        **parts,
        "embedded_model": parts["behaviours"] + parts["suspect"],
        # standalone probe: no trigger needed, so the suspect step skips the evaluation's checks
        "probe": parts["behaviours"] + suspect.create_pipeline(check_evaluation=False) + parts["probe"],
        "reaudit": parts["behaviours"] + protocol + reaudit.create_pipeline(),
        # fanned out: the selection and the inputs, then one run per version (reaudit.version), then the report
        "reaudit_prepare": parts["behaviours"] + protocol + reaudit.create_prepare_pipeline(),
        "reaudit_version": reaudit.create_version_pipeline(),
        "reaudit_gather": reaudit.create_gather_pipeline(),
        # defend's later stages on data and a suspect model already prepared (the DVC `defend` stage)
        "defend_from_prepared": parts["probe"] + parts["removal"] + parts["attack"] + parts["evaluation"] + parts["register"],
        "defend": defend,
        "__default__": defend,
        # no weights, no data checks: the suspect's config.json (or the embedded recipe) and the settings
        "plan": plan.create_pipeline(),
    }
