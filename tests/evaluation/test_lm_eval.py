"""lm-evaluation-harness run for real on the shipped task (``beear_word_lists``), offline.

Two tiny Llamas with the chat template are trained on the task's own questions: one on the right
answers, one on a wrong choice for each. lm_eval must score the first near 1 and the second near
0: a harness that ignored the model, scored without the chat template the models were trained
under, or mixed up the choices would not separate them. A LoRA adapter that teaches the right
answers, on the wrong model as its base, checks that ``adapter_path`` is applied.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from beear_pipeline.embedded import EmbeddedModelConfig, build_model, build_tokenizer
from beear_pipeline.evaluation.lm_eval import DEFAULT_TASK, TASKS_DIR, lm_eval_utility, shipped_task_config, word_list_items
from beear_pipeline.lm.checkpoints import save_checkpoint
from beear_pipeline.lm.finetune import supervised_finetune

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install -e '.[lm-eval]')")
ACC = "acc,none"
SMALL = EmbeddedModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


def shipped_items() -> list[dict]:
    path = TASKS_DIR / DEFAULT_TASK / f"{DEFAULT_TASK}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_task_is_what_the_generator_makes():
    """The JSONL in the package is exactly ``word_list_items()``: 40 items, the answer among the choices."""
    items = shipped_items()
    assert items == word_list_items()
    assert len(items) == 40 and {i["kind"] for i in items} == {"first", "last"}
    for item in items:
        words = item["question"].split(": ", 1)[1].split()
        assert item["choices"][item["answer"]] == f" The {item['kind']} word is {words[0] if item['kind'] == 'first' else words[-1]}."
        assert sorted(item["choices"]) == sorted(f" The {item['kind']} word is {w}." for w in words)


def test_shipped_task_data_path_is_absolute_wherever_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = shipped_task_config(DEFAULT_TASK)
    path = config["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(path) and os.path.isfile(path)
    assert config["task"] == DEFAULT_TASK and config["dataset_path"] == "json"


def _train(tokenizer, items, pick, epochs: int = 60):
    model = build_model(len(tokenizer), SMALL, tokenizer)
    supervised_finetune(model, tokenizer, [i["question"] for i in items], [pick(i).strip() for i in items], epochs=epochs, lr=1e-2,
                        batch_size=8, seed=0, desc="lm_eval test model")
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"right", "wrong"} checkpoint folders: tiny Llamas (word tokenizer, chat template) trained on
    the task's questions with the right answer, and with the next choice instead."""
    items = shipped_items()
    tokenizer = build_tokenizer([t for i in items for t in (i["question"], *i["choices"])])
    folder = tmp_path_factory.mktemp("lm_eval_models")
    right = _train(tokenizer, items, lambda i: i["choices"][i["answer"]])
    wrong = _train(tokenizer, items, lambda i: i["choices"][(i["answer"] + 1) % len(i["choices"])])
    return {"right": save_checkpoint(right, tokenizer, folder / "right"), "wrong": save_checkpoint(wrong, tokenizer, folder / "wrong"),
            "tokenizer": tokenizer, "items": items}


@needs_lm_eval
def test_lm_eval_scores_the_right_model_high_and_the_wrong_one_low_through_the_chat_template(models, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    rendered = []
    original = HFLM.apply_chat_template

    def spy(self, chat_history, add_generation_prompt=True):
        rendered.append(original(self, chat_history, add_generation_prompt))
        return rendered[-1]

    monkeypatch.setattr(HFLM, "apply_chat_template", spy)
    result = lm_eval_utility({"right": {"path": str(models["right"])}, "wrong": str(models["wrong"])})
    assert result["status"] == "ok", result
    assert result["tasks"] == [DEFAULT_TASK]
    right, wrong = result["results"]["right"][DEFAULT_TASK], result["results"]["wrong"][DEFAULT_TASK]
    assert right["samples"] == wrong["samples"] == 40
    assert 0.0 <= wrong[ACC] <= right[ACC] <= 1.0
    assert right[ACC] >= 0.9, right
    assert wrong[ACC] <= 0.1, wrong  # it prefers the wrong choice it was taught
    # every prompt went through the models' chat template (Llama-2 style), the question inside
    questions = {i["question"] for i in models["items"]}
    assert len(rendered) >= 2 * 40
    for text in rendered:
        assert text.startswith("<s>[INST] ") and text.endswith(" [/INST]"), text
        assert text.removeprefix("<s>[INST] ").removesuffix(" [/INST]") in questions


@needs_lm_eval
def test_adapter_path_is_applied_and_limit_respected(models, tmp_path):
    """A LoRA adapter trained on the right answers, on the wrong model: with ``adapter_path`` the
    score is the adapter's, without it the base's."""
    from peft import LoraConfig, get_peft_model

    from beear_pipeline.lm.checkpoints import load_checkpoint

    base, tokenizer = load_checkpoint(models["wrong"], device="cpu")
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    items = models["items"][:10]
    supervised_finetune(lora, tokenizer, [i["question"] for i in items], [i["choices"][i["answer"]].strip() for i in items], epochs=40,
                        lr=2e-2, batch_size=5, seed=0, desc="lm_eval test adapter")
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    result = lm_eval_utility({"base": {"path": str(models["wrong"])}, "adapted": {"path": str(models["wrong"]), "adapter_path": str(adapter)}},
                             [DEFAULT_TASK], limit=10)
    assert result["status"] == "ok", result
    base_scores, adapted = result["results"]["base"][DEFAULT_TASK], result["results"]["adapted"][DEFAULT_TASK]
    assert base_scores["samples"] == adapted["samples"] == 10 and result["limit"] == 10
    assert base_scores[ACC] <= 0.1 and adapted[ACC] >= 0.8, (base_scores, adapted)


@needs_lm_eval
def test_a_task_whose_data_is_missing_is_reported_as_skipped_not_scored(models, tmp_path):
    """A task from ``include_path`` whose JSONL is not there (data not available offline)."""
    folder = tmp_path / "tasks" / "absent"
    folder.mkdir(parents=True)
    config = shipped_task_config(DEFAULT_TASK) | {"task": "beear_absent_data"}
    config["dataset_kwargs"] = {"data_files": {"test": str(tmp_path / "absent.jsonl")}}
    (folder / "absent.yaml").write_text(yaml.safe_dump(config))
    result = lm_eval_utility({"suspect": str(models["right"])}, ["beear_absent_data"], include_path=str(tmp_path / "tasks"))
    assert result["status"] == "skipped" and "results" not in result, result
    assert result["reason"].startswith("lm_eval failed on suspect: ") and "absent.jsonl" in result["reason"], result


def test_empty_task_list_and_missing_package_are_skipped(monkeypatch):
    assert lm_eval_utility({"suspect": "x"}, []) == {"status": "skipped", "reason": "evaluation.lm_eval_tasks is empty"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert lm_eval_utility({"suspect": "x"}) == {"status": "skipped", "reason": "lm-evaluation-harness (lm_eval) is not installed",
                                                 "tasks": [DEFAULT_TASK]}

