"""Thin adapters from the pipeline to the BEEAR engine: BEEAR itself and its two baselines, the
``control`` (the same safety fine-tuning with the perturbation fixed at zero) and
``random_perturbation`` (a fresh random direction each round at BEEAR's per-round norm). The
baselines run as many rounds as BEEAR did.

With ``distributed.num_processes > 1`` each defence runs as a torchrun job of that many processes
(``beear/distributed.py``: files in, the defended model, perturbation and history out) and the
node continues as usual with its result; a node that already runs under torchrun joins that job
as one rank, and only rank 0 logs to MLflow."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from beear_pipeline.beear import BeearConfig, find_perturbation, run_beear
from beear_pipeline.beear import distributed as dist
from beear_pipeline.beear.config import DistributedConfig
from beear_pipeline.integrations import run_folders
from beear_pipeline.integrations.tracking import log_metrics, log_params, set_tags
from beear_pipeline.lm.checkpoints import load_model_ref
from beear_pipeline.scenarios import DEFAULT as DEFAULT_SCENARIO
from beear_pipeline.scenarios import scenario_anchor_layer, scenario_relearn_steps

logger = logging.getLogger(__name__)


def resolve_anchor_layer(anchor_layer: int | float | str, probe_report: dict | None) -> int | float:
    """``beear.anchor_layer``: a layer index or a fraction of the depth as it is (the engine
    resolves it against the model), or ``auto`` for the probe's recommended layer."""
    if anchor_layer != "auto":
        return anchor_layer
    if not probe_report or "recommended_layer" not in probe_report:
        raise ValueError("beear.anchor_layer: auto needs the probe's report (reports/probe.json): run the defend pipeline, "
                         "which includes the probe, or set beear.anchor_layer to an integer")
    return int(probe_report["recommended_layer"])


def _triples(safety_set: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(zip(safety_set["prompt"], safety_set["safe_response"], safety_set["unwanted_response"], strict=True))


def _defend(suspect_model: dict, safety, anchoring, config: BeearConfig, relative_norms, system_prompt, distributed: DistributedConfig | None,
            on_round):
    """(BeearResult, tokenizer): in this process, as one rank of a torchrun job this process is
    part of, or as a torchrun job of ``distributed.num_processes`` processes launched from here."""
    distributed = distributed or DistributedConfig()
    if distributed.num_processes > 1 and not dist.under_launcher():
        dist.check_job(len(safety), len(anchoring), config, distributed.num_processes)  # before any process starts
        folder = tempfile.mkdtemp(prefix=f"{config.defence}-distributed-")
        job = dist.write_job(folder, suspect_model, safety, anchoring, config, system_prompt=system_prompt, relative_norms=relative_norms,
                             backend=distributed.backend, sharding=distributed.sharding)
        result, tokenizer = dist.read_result(dist.launch(job, distributed.num_processes, distributed.master_port), suspect_model)
        shutil.rmtree(folder, ignore_errors=True)  # kept when the job failed: its log is named in the error
        for record in result.history:
            on_round(record["round"], record)
        return result, tokenizer
    if dist.under_launcher() and distributed.sharding == "fsdp":  # the node's later steps would get a sharded model
        raise ValueError("distributed.sharding: fsdp runs as a job the node launches (distributed.num_processes > 1), not in a "
                         "Kedro run started under torchrun: launch kedro without torchrun, or use distributed.sharding: none or optimizer")
    context = dist.init_from_env(distributed.backend, distributed.sharding) if dist.under_launcher() else dist.Context()
    model, tokenizer = load_model_ref(suspect_model)
    with dist.using(context):
        result = run_beear(model, tokenizer, safety, anchoring, config, relative_norms=relative_norms, system_prompt=system_prompt,
                           on_round=on_round if context.is_main else None)  # only rank 0 logs
    return result, tokenizer


@contextmanager
def _own_checkpoint_folder(config: BeearConfig):
    """``config`` while this process holds the lock of its round-checkpoint folder, so that a
    killed run resumes there and two concurrent runs never write (and prune) the same rounds. When
    another run holds it, this run checkpoints in its own run folder instead (no resume from the
    shared one), and says so."""
    if not config.checkpoint_dir:
        yield config
        return
    lock = run_folders.try_lock(config.checkpoint_dir)
    if lock is not None:
        try:
            yield config
        finally:
            lock.release()
        return
    own = run_folders.local(config.checkpoint_dir, publish=False)
    if Path(own) == Path(config.checkpoint_dir):  # outside a run folder (notebook, tests)
        own = Path(f"{config.checkpoint_dir}-{os.getpid()}")
    logger.warning("%s: another run is checkpointing in %s; this one checkpoints in %s (it cannot resume that run's rounds)",
                   config.defence, config.checkpoint_dir, own)
    yield dataclasses.replace(config, checkpoint_dir=str(own))


def _run(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, config: BeearConfig, relative_norms=None,
         distributed: DistributedConfig | None = None):
    with _own_checkpoint_folder(config) as config:
        return _run_locked(suspect_model, safety_set, anchoring_set, config, relative_norms, distributed)


def _run_locked(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, config: BeearConfig, relative_norms=None,
                distributed: DistributedConfig | None = None):
    safety = _triples(safety_set)
    anchoring = list(zip(anchoring_set["prompt"], anchoring_set["response"], strict=True))
    system_prompt = suspect_model.get("system_prompt")
    start = time.perf_counter()
    result, tokenizer = _defend(suspect_model, safety, anchoring, config, relative_norms, system_prompt, distributed,
                                lambda r, rec: log_metrics({f"{config.defence}.{k}": v for k, v in rec.items() if k != "round"}, step=r))
    seconds = time.perf_counter() - start
    audit = _final_audit(result.model, tokenizer, safety, config, system_prompt)
    last = result.history[-1]
    logger.info("%s: %d rounds in %.1f s, final outer loss %.4f, perturbation norm %.2f (%.2f x the hidden-state scale)%s",
                config.defence, len(result.history), seconds, last["outer_loss"], last["perturbation_norm"],
                last["perturbation_norm_relative"], "" if result.convergence is None else f": {result.convergence}")
    sized = {k: getattr(result.config, k) for k in ("outer_lr", "checkpoint_every")}  # what `auto` chose for this model
    log_params({f"{config.defence}.sized.{k}": v for k, v in sized.items()})
    history = {"defence": config.defence, "config": result.config.to_dict(), "seconds": seconds, "resumed_from": result.resumed_from,
               "anchor_layer_index": result.layer, "hidden_scale": result.hidden_scale, "convergence": result.convergence, "converged": result.converged,
               "n_monitor_prompts": len(result.monitor), "final_audit": audit, "rounds": result.history}
    if result.convergence is not None:
        log_metrics({f"{config.defence}.converged": float(result.converged), f"{config.defence}.rounds_run": len(result.history)})
        set_tags({f"{config.defence}.converged": result.converged, f"{config.defence}.convergence": result.convergence})
        if result.convergence == "not_converged":
            logger.warning("%s did not converge in %d rounds: the inner level still elicits the unwanted answers on %.0f%% more "
                           "of the monitor prompts than a random direction does (converged at <= %.0f%%). Raise beear.max_rounds "
                           "or beear.outer_lr; the registry will not promote this model", config.defence, len(result.history),
                           100 * _last_excess(result.history), 100 * config.converged_rate)
    return (result.model, tokenizer), result.perturbation, history


def _final_audit(model, tokenizer, safety, config: BeearConfig, system_prompt: str | None) -> dict | None:
    """The same trigger-free measurement for every trained model (BEEAR, the control, the random
    baseline): can the inner level still push it to the unwanted answers on the monitor prompts?"""
    if not config.check_every or not config.monitor_fraction:
        return None
    found = find_perturbation(model, tokenizer, safety, dataclasses.replace(config, defence="beear"), system_prompt=system_prompt)
    audit = {k: found[k] for k in ("entrapment_rate", "entrapment_rate_random", "entrapment_excess", "unwanted_loss",
                                   "unwanted_loss_unperturbed", "perturbation_norm_relative", "hidden_scale")}
    logger.info("%s: final trigger-free audit: entrapment rate %.2f on %d monitor prompts (a random direction: %.2f)",
                config.defence, audit["entrapment_rate"], found["n_monitor_prompts"], audit["entrapment_rate_random"])
    log_metrics({f"{config.defence}.final_entrapment_rate": audit["entrapment_rate"],
                 f"{config.defence}.final_entrapment_excess": audit["entrapment_excess"]})
    return audit


def _last_excess(history: list[dict]) -> float:
    return next((r["entrapment_excess"] for r in reversed(history) if "entrapment_excess" in r), float("nan"))


def _config(beear: BeearConfig, defence: str, probe_report: dict | None, beear_history: dict | None = None,
            scenario: str = DEFAULT_SCENARIO) -> BeearConfig:
    """The run's configuration: ``beear.anchor_layer: null`` and ``beear.relearn_steps: null``
    resolved to the scenario's (``scenarios.scenario_beear``),
    ``anchor_layer: auto`` resolved from the probe's report, each defence checkpointing into its own
    sub-folder, and the baselines given exactly as many rounds as BEEAR ran (it stops when it
    converges)."""
    anchor, source = scenario_anchor_layer(beear.anchor_layer, scenario)
    if beear.anchor_layer is None:
        logger.info("beear.anchor_layer: null -> %s, the anchor layer of the %s (docs/behaviour_data.md); a value you pass wins",
                    anchor, source)
    relearn_steps, steps_source = scenario_relearn_steps(beear.relearn_steps, scenario)
    if beear.relearn_steps is None and defence == "beear":
        logger.info("beear.relearn_steps: null -> %d, the relearn-aware gradient's steps of the %s (docs/behaviour_data.md); a "
                    "value you pass wins", relearn_steps, steps_source)
    layer = resolve_anchor_layer(anchor, probe_report)
    if anchor == "auto":
        logger.info("beear.anchor_layer: auto -> layer %d, as the probe recommends", layer)
    checkpoint_dir = str(Path(beear.checkpoint_dir) / defence) if beear.checkpoint_dir else None
    rounds = len(beear_history["rounds"]) if beear_history else beear.max_rounds
    # the baselines are the paper's (plain safety fine-tuning; a random direction): the hardening
    # options belong to BEEAR. The relearn-aware gradient alone, without the perturbation, already
    # removes much of the default suspect's backdoor (0.202 left): a control with it would not be
    # the control that must fail.
    hardening = {"relearn_steps": relearn_steps} if defence == "beear" else {"relearn_steps": 0, "unlearn_weight": 0.0, "sam_rho": 0.0}
    return dataclasses.replace(beear, defence=defence, checkpoint_dir=checkpoint_dir, anchor_layer=layer, max_rounds=rounds, **hardening)


def defend_with_beear(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, beear: BeearConfig,
                      probe_report: dict | None = None, distributed: DistributedConfig | None = None, scenario: str = DEFAULT_SCENARIO):
    """BEEAR: returns the defended model, the final perturbation and the per-round history."""
    model, perturbation, history = _run(suspect_model, safety_set, anchoring_set, _config(beear, "beear", probe_report, scenario=scenario),
                                        distributed=distributed)
    return model, {"perturbation": perturbation}, history


def defend_with_control(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame, beear: BeearConfig,
                        probe_report: dict | None, beear_history: dict, distributed: DistributedConfig | None = None,
                        scenario: str = DEFAULT_SCENARIO):
    """The control: the same data, rounds, batches and optimiser as BEEAR, perturbation fixed at zero."""
    model, _, history = _run(suspect_model, safety_set, anchoring_set, _config(beear, "control", probe_report, beear_history, scenario),
                             distributed=distributed)
    return model, history


def defend_with_random_perturbation(suspect_model: dict, safety_set: pd.DataFrame, anchoring_set: pd.DataFrame,
                                    beear: BeearConfig, probe_report: dict | None, beear_history: dict,
                                    distributed: DistributedConfig | None = None, scenario: str = DEFAULT_SCENARIO):
    """Baseline: a random direction each round, matched to BEEAR's perturbation norm per round
    relative to each model's hidden-state scale (or ``beear.random_norm`` when set)."""
    config = _config(beear, "random_perturbation", probe_report, beear_history, scenario)
    relative = None if config.random_norm is not None else [r["perturbation_norm_relative"] for r in beear_history["rounds"]]
    model, _, history = _run(suspect_model, safety_set, anchoring_set, config, relative_norms=relative, distributed=distributed)
    return model, history
