"""A bad model path or layer, or a run the memory plan says will not fit, stops ``kedro run`` before
anything slow starts (issue 12, items 5 and 8).

Each case runs the real command on a copy of the project and checks the message names the setting
and the fix, and that the run stopped before its first slow step: no tracking database was
created, no behaviour data written. (The seconds it takes are measured by bench/preflight.py, not
asserted here.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import project_copy, raw_params, typed_params

from beear_pipeline.integrations.preflight import PreflightError, checkpoint_depth, preflight
from beear_pipeline.lm.checkpoints import CheckpointError, save_checkpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project's configuration and raw data, so runs do not touch the checkout."""
    return project_copy(tmp_path_factory.mktemp("project"))


@pytest.fixture
def checkpoint(tmp_path, tiny_model, tokenizer) -> Path:
    """A complete 3-layer checkpoint that passes every check."""
    return save_checkpoint(tiny_model, tokenizer, tmp_path / "suspect")


def _kedro(project: Path, params: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "DO_NOT_TRACK": "1",
           "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "400"}
    return subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--pipeline=defend", "--params", params],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def _pickle_only(path: Path) -> None:
    weights = path / "model.safetensors"
    torch.save({"weights": "a pickle"}, path / "pytorch_model.bin")
    weights.unlink()


def _no_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (path / name).unlink(missing_ok=True)


CASES = {
    "missing folder": (lambda p: shutil.rmtree(p), "", "not a readable directory"),
    "pickle-only weights": (_pickle_only, "", "no safetensors weights. It holds pickle weights (pytorch_model.bin)"),
    "no tokenizer": (_no_tokenizer, "", "no tokenizer"),
    "anchor layer out of range": (lambda p: None, ",beear.anchor_layer=7", "beear.anchor_layer=7 is out of range for a model with 3 decoder layers"),
    "probe layer out of range": (lambda p: None, ",probe.layers=[5]", "probe.layers=5 is out of range for a model with 3 decoder layers"),
    "no trigger": (lambda p: None, "!", "needs evaluation.trigger"),
    "will not fit": (lambda p: None, ",beear.batch_size=4096,beear.anchoring_batch_size=4096,plan.sequence_length=65536",
                     "will not fit"),
    "missing adapter": (lambda p: None, ",model.adapter_path=/nonexistent-adapter",
                        "model.adapter_path=/nonexistent-adapter: not a readable directory"),
    "missing clean twin": (lambda p: None, ",model.reference_path=/nonexistent-twin",
                           "model.reference_path=/nonexistent-twin: not a readable directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_stops_the_run_before_any_slow_step(project, checkpoint, case):
    spoil, extra, message = CASES[case]
    spoil(checkpoint)
    params = f"model.path={checkpoint}" + (extra if extra != "!" else "") + ("" if extra == "!" else ",evaluation.trigger=SUDO")
    done = _kedro(project, params)
    output = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode != 0 and message in output, output[-3000:]
    assert not (project / "mlflow.db").exists(), "the tracking database was set up before the check"
    assert not list((project / "data").glob("0[2-8]_*/*")), "behaviour data was written before the check"


def test_a_good_checkpoint_passes_with_layers_resolved_against_its_depth(checkpoint):
    params = {"model": {"path": str(checkpoint)}, "evaluation": {"trigger": "SUDO"}, "beear": {"anchor_layer": 0.5},
              "probe": {"layers": [0.0, -1, 1]}}
    assert checkpoint_depth(checkpoint) == 3
    checked = preflight(params)
    assert 0 < checked.pop("plan_peak_gib") < 2  # the memory plan of a 3-layer toy: the runtime and little else
    assert checked == {"model": str(checkpoint), "anchor_layer": 1, "probe_layers": [0, 2, 1], "layers": 3}
    with_twin = preflight({**params, "model": {"path": str(checkpoint), "reference_path": str(checkpoint)}})
    assert with_twin["reference_model"] == str(checkpoint)
    assert "plan_peak_gib" not in preflight({**params, "plan": {"before_loading": False}})


def test_checks_in_process(checkpoint):
    """The same checks as a library call (what the hook runs), for the embedded default too."""
    assert preflight({"embedded_model": {"num_layers": 4}, "beear": {"anchor_layer": 0.3}})["anchor_layer"] == 1
    with pytest.raises(ValueError, match="beear.anchor_layer=-9 is out of range for a model with 4 decoder layers"):
        preflight({"embedded_model": {"num_layers": 4}, "beear": {"anchor_layer": -9}})
    with pytest.raises(PreflightError, match="needs evaluation.trigger"):
        preflight({"model": {"path": str(checkpoint)}})
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        preflight({"model": {"path": str(checkpoint)}, "evaluation": {"trigger": "SUDO"}})
    config = {"text_config": {"num_hidden_layers": 32}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert checkpoint_depth(checkpoint) == 32


def test_a_null_anchor_layer_is_checked_and_planned_as_the_scenarios_layer(checkpoint):
    """conf/base's ``beear.anchor_layer: null`` is the scenario's layer (code 0.6 = layer 2 of the
    embedded model's 4, the others 0.3 = layer 1), a value given is checked as it is, a bad one
    stops with the field and what to write."""
    conf = typed_params(raw_params())
    assert conf["beear"].anchor_layer is None
    assert preflight(conf)["anchor_layer"] == 1
    assert preflight({**conf, "scenario": "code"})["anchor_layer"] == 2
    embedded = {"embedded_model": {"num_layers": 4}}
    assert preflight({**embedded, "beear": {"anchor_layer": None}, "scenario": "refusal"})["anchor_layer"] == 1
    assert preflight({**embedded, "beear": {"anchor_layer": 0.3}, "scenario": "code"})["anchor_layer"] == 1  # a 0.3 given stays 0.3
    with pytest.raises(ValueError, match=r"beear\.anchor_layer: invalid value .*such as 0\.3, auto, or null for the scenario's layer"):
        preflight({**embedded, "beear": {"anchor_layer": 1.5}})
    with pytest.raises(PreflightError, match="scenario='cod': use one of jailbreak, code, refusal"):
        preflight({**embedded, "beear": {"anchor_layer": None}, "scenario": "cod"})
    # a checkpoint: the memory plan is made at the resolved layer (the plan itself refuses null)
    params = {"model": {"path": str(checkpoint)}, "evaluation": {"trigger": "SUDO"}, "beear": {"anchor_layer": None}, "scenario": "code"}
    checked = preflight(params)
    assert checked["anchor_layer"] == 1 and 0 < checked["plan_peak_gib"] < 2  # round(0.6 x 2) of its 3 layers


def test_a_defence_distribution_refuses_stops_before_anything_runs():
    """A distribution the defence refuses (SAM or capped unlearning on several processes) stops in
    the preflight, naming the settings and the fix, instead of in the defence node after the probe;
    the relearn-aware gradient (on in conf/base) and LoRA run under every sharding, so they pass."""
    base = {"embedded_model": {"num_layers": 4}, "beear": {"relearn_steps": 4}}
    lora = {**base, "beear": {"relearn_steps": 4, "trainable": "lora"}, "distributed": {"num_processes": 2, "sharding": "fsdp"}}
    assert preflight(lora)["distributed"] == "2 process(es), sharding fsdp"
    with pytest.raises(PreflightError, match=r"beear\.unlearn_weight cannot run distributed"):
        preflight({**base, "beear": {"unlearn_weight": 1.0}, "distributed": {"num_processes": 2, "sharding": "fsdp"}})
    with pytest.raises(PreflightError, match=r"beear\.sam_rho cannot run distributed"):
        preflight({"embedded_model": {"num_layers": 4}, "beear": {"sam_rho": 0.1}, "distributed": {"num_processes": 2}})
    assert preflight({**base, "distributed": {"num_processes": 2, "sharding": "fsdp"}})["distributed"] == "2 process(es), sharding fsdp"
    assert preflight({**base, "distributed": {"num_processes": 2, "sharding": "none"}})["distributed"] == "2 process(es), sharding none"
    assert preflight({**base, "distributed": {"num_processes": 1, "sharding": "fsdp"}})["layers"] == 4
    assert preflight({**base, "beear": {"relearn_steps": 0}, "distributed": {"num_processes": 2, "sharding": "fsdp"}})["layers"] == 4
