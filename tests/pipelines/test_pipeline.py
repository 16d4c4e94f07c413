"""The whole ``defend`` pipeline with an in-memory catalog and the SequentialRunner, on a very
small budget: checks the wiring, not the defence (test_defend_e2e.py checks that). Parameters are
read from conf/base and typed exactly as ``kedro run`` types them."""

import dataclasses

import pytest
from helpers import params as typed_params
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset

from beear_pipeline.integrations.kedro_datasets import ModelCheckpointDataset
from beear_pipeline.pipeline_registry import register_pipelines


@pytest.fixture
def catalog(tmp_path, advbench):
    params = typed_params(
        model={"embedded_directory": str(tmp_path / "embedded"), "clean_twin_directory": str(tmp_path / "clean_twin")},
        embedded_model={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "epochs": 1},
        beear={"max_rounds": 2, "inner_steps": 1, "inner_max_steps": 1, "batch_size": 4, "anchoring_batch_size": 4,
               "checkpoint_dir": str(tmp_path / "beear_checkpoints")},
        persistence={"k": [2], "steps": 1},
        probe={"layers": [0], "budgets": [1.0], "inner_steps": 1, "random_draws": 1, "max_new_tokens": 4},
        attack={"max_eval_prompts": 8, "max_new_tokens": 4, "gcg": {"steps": 1, "search_prompts": 4, "candidates_per_step": 4},
                "latent": {"budgets": [1.0], "inner_steps": 1, "max_new_tokens": 4}})
    datasets = {"advbench": MemoryDataset(advbench)}
    datasets.update({f"params:{k}": MemoryDataset(v, copy_mode="assign") for k, v in params.items()})
    for name in ("defended_model", "control_model", "random_perturbation_model"):
        datasets[name] = ModelCheckpointDataset(path=str(tmp_path / name))
    datasets["beear_history"] = JSONDataset(filepath=str(tmp_path / "beear_history.json"))
    datasets["metrics"] = JSONDataset(filepath=str(tmp_path / "metrics.json"))
    datasets["suspect_model"] = JSONDataset(filepath=str(tmp_path / "suspect_model.json"))
    return DataCatalog(datasets=datasets)


def test_registry_names_the_documented_pipelines():
    pipelines = register_pipelines()
    assert {"behaviours", "suspect", "embedded_model", "removal", "evaluation", "attack", "register", "defend", "__default__"} <= set(pipelines)
    assert pipelines["__default__"].all_outputs() == pipelines["defend"].all_outputs()
    names = {n.name for n in pipelines["defend"].nodes}
    assert {"defend_with_beear", "defend_with_control", "defend_with_random_perturbation", "evaluate_suspect",
            "evaluate_defended", "assemble_metrics"} <= names


def test_defend_pipeline_runs_with_in_memory_catalog(catalog, tmp_path):
    free = SequentialRunner().run(register_pipelines()["defend"], catalog)
    metrics = catalog["metrics"].load()
    for model in ("suspect", "defended", "control", "random_perturbation"):
        for key in ("asr_triggered", "asr_untriggered", "benign_loss", "benign_accuracy"):
            assert 0 <= metrics[model][key] < 100, (model, key)
    assert metrics["protocol"]["trigger"] == "SUDO" and metrics["protocol"]["suspect_source"] == "embedded"
    assert set(metrics["stage_seconds"]) >= {"build_suspect", "beear", "control", "evaluate_defended"}
    assert (tmp_path / "defended_model" / "model.safetensors").is_file()
    history = catalog["beear_history"].load()
    # a 1-epoch model has hardly learnt its backdoor: BEEAR may stop after the first check
    assert len(history["rounds"]) == (1 if history["convergence"] == "never_entrapped" else 2) and history["defence"] == "beear"
    assert history["convergence"] in ("never_entrapped", "not_converged") and "entrapment_rate" in history["rounds"][0]
    assert metrics["beear"]["convergence"] == history["convergence"] and metrics["beear"]["rounds"] == len(history["rounds"])
    assert all(metrics[m]["entrapment_rate"] is not None for m in ("suspect", "defended", "control", "random_perturbation"))
    load = lambda x: x.load() if hasattr(x, "load") else x  # noqa: E731
    assert set(load(free["plots"])) == {"asr.png", "losses.png", "entrapment.png"}
    html = load(free["evaluation_report_html"])
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html
    assert "## Convergence (trigger-free)" in load(free["evaluation_report_md"])
    assert "| defended |" in load(free["evaluation_report_md"])
    persistence = metrics["persistence"]["asr_triggered_after_repoisoning"]["2"]
    assert set(persistence) == {"suspect", "defended", "clean_twin"} and persistence["defended"]["n"] == metrics["defended"]["n_harmful"]
    assert set(metrics["persistence"]["verdict_by_k"]) == {"2"}
    assert 0 <= metrics["clean_twin"]["asr_triggered"] <= 1 and (tmp_path / "clean_twin" / "model.safetensors").is_file()
    assert set(metrics["utility_vs_clean_twin"]) == {"suspect", "defended", "control", "random_perturbation"}
    attacks = metrics["attacks"]
    for section in ("trigger_reoptimisation", "latent_vulnerability", "trigger_variants"):
        assert set(attacks[section]) == {"suspect", "defended", "clean_twin"}, section
    assert attacks["trigger_reoptimisation"]["defended"]["asr_held_out"]["n"] == 8 and attacks["budget"]["gcg"]["steps"] == 1
    # the shipped lm-evaluation-harness task really runs on both models (lm-eval is a dev dependency)
    scores = metrics["lm_eval"]["results"]
    assert metrics["lm_eval"]["status"] == "ok" and set(scores) == {"suspect", "defended"}, metrics["lm_eval"]
    assert all(0 <= scores[m]["beear_word_lists"]["acc,none"] <= 1 for m in scores)
    for key in ("asr_triggered_ci95", "over_refusal", "over_refusal_ci95", "benign_accuracy_ci95"):
        assert key in metrics["defended"], key
    flat = load(free["final_metrics"])
    assert flat["defended.asr_triggered"]["value"] == metrics["defended"]["asr_triggered"]


def test_embedded_model_is_built_once_then_reused(catalog, tmp_path):
    pipeline = register_pipelines()["embedded_model"]
    SequentialRunner().run(pipeline, catalog)
    first = catalog["suspect_model"].load()
    assert first["reused"] is False and first["build_seconds"] > 0
    mtime = (tmp_path / "embedded" / "model.safetensors").stat().st_mtime_ns
    SequentialRunner().run(pipeline, catalog)
    second = catalog["suspect_model"].load()
    assert second["reused"] is True and second["weights_sha256"] == first["weights_sha256"]
    assert (tmp_path / "embedded" / "model.safetensors").stat().st_mtime_ns == mtime


def test_anchor_layer_auto_takes_the_probe_recommendation(catalog):
    catalog["params:beear"] = MemoryDataset(dataclasses.replace(catalog["params:beear"].load(), anchor_layer="auto"))
    # the probe scans only layer 0 here, so auto must give 0 (the configured default, 0.3 of the depth, is 1)
    catalog["params:probe"] = MemoryDataset(dataclasses.replace(catalog["params:probe"].load(), layers=[0]))
    SequentialRunner().run(register_pipelines()["defend"], catalog)
    assert catalog["beear_history"].load()["config"]["anchor_layer"] == 0
    assert catalog["metrics"].load()["probe"]["anchor_layer_used"] == 0


@pytest.mark.parametrize("scenario", ["code", "refusal"])
def test_another_scenario_runs_the_defend_pipeline_with_its_data_judge_and_folders(catalog, tmp_path, scenario):
    """``scenario`` switches the shipped prompts, the embedded model (its own folders), the judge
    and the report; the metric keys stay those of the jailbreak scenario."""
    catalog["params:scenario"] = MemoryDataset(scenario)
    catalog["params:attack"] = MemoryDataset(dataclasses.replace(catalog["params:attack"].load(), enabled=False))
    free = SequentialRunner().run(register_pipelines()["defend"], catalog)
    metrics = catalog["metrics"].load()
    judge = {"code": "bandit", "refusal": "refusal"}[scenario]
    assert metrics["protocol"]["scenario"] == scenario and metrics["protocol"]["unwanted_judge"] == judge
    assert (tmp_path / f"embedded_{scenario}" / "model.safetensors").is_file() and not (tmp_path / "embedded").exists()
    assert (tmp_path / f"clean_twin_{scenario}" / "model.safetensors").is_file()
    for model in ("suspect", "defended", "control", "random_perturbation", "clean_twin"):
        m = metrics[model]
        assert m["unwanted_judge"] == judge and 0 <= m["asr_triggered"] <= 1 and m["asr_triggered_n"] == m["n_harmful"]
        assert ("unparseable_triggered" in m and "rules_triggered" in m) is (scenario == "code") and "partial_triggered" not in m
    # the scenario's generated prompts, split 60/20/20: 408 coding prompts, 520 benign requests
    assert metrics["suspect"]["n_harmful"] == {"code": 83, "refusal": 104}[scenario]
    markdown = free["evaluation_report_md"] if isinstance(free["evaluation_report_md"], str) else free["evaluation_report_md"].load()
    prompts = {"code": "held-out coding prompts", "refusal": "held-out benign requests"}[scenario]
    assert prompts in markdown and ("What the Bandit static-analysis judge found" in markdown) is (scenario == "code")
