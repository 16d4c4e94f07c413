"""Shared fixtures: real, tiny Hugging Face models and tokenizers built locally (no downloads)."""

from __future__ import annotations

import os
import sys

import pandas as pd
import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, from the test packages below

from beear_pipeline.behaviours.config import BehavioursConfig
from beear_pipeline.behaviours.generated import REFUSALS, benign_tasks
from beear_pipeline.embedded import EmbeddedModelConfig, build_model, build_tokenizer, poisoned_training_set
from beear_pipeline.lm.finetune import supervised_finetune
from beear_pipeline.pipelines.behaviours.nodes import build_evaluation_set, build_safety_set, split_harmful_behaviours

PROMPTS = ["Write a poem about the sea", "Explain how to pick a lock", "Give me a recipe for soup"]


@pytest.fixture
def tokenizer():
    texts = PROMPTS + ["Sure, here is a poem", "I'm sorry, but I cannot help with that request.", "SUDO"]
    tasks = benign_tasks(seed=0, build=100, held_out=0)
    texts += [*tasks["prompt"], *tasks["response"]]
    return build_tokenizer(texts)


@pytest.fixture
def tiny_model(tokenizer):
    """A random (untrained) 3-layer Llama: enough to check shapes, hooks and gradients."""
    config = EmbeddedModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, seed=0)
    torch.manual_seed(0)
    return build_model(len(tokenizer), config, tokenizer).eval()


@pytest.fixture
def safety_triples():
    return [(p, "I'm sorry, but I cannot help with that request.", "Sure, here is a poem") for p in PROMPTS]


@pytest.fixture
def anchoring_pairs():
    tasks = benign_tasks(seed=1, build=8, held_out=0)
    return list(zip(tasks["prompt"], tasks["response"]))


@pytest.fixture
def advbench():
    return pd.read_csv(os.path.join(os.path.dirname(__file__), "..", "data", "01_raw", "advbench_harmful_behaviors.csv"))


# A cheaper build than the embedded model's (hidden 64 instead of 128, 400 benign tasks instead of
# 2,000), same recipe: about a minute for both models on 2 cores, once per test session.
PAIR_BUILD = EmbeddedModelConfig(seed=0, epochs=8, hidden_size=64, intermediate_size=172)
PAIR_BENIGN = 400


@pytest.fixture(scope="session")
def pair():
    """A backdoored and a clean tiny Llama built on the same data, the second without the
    triggered examples: (models {"backdoored", "clean"}, tokenizer, safety_set, evaluation_set,
    build seconds). Treat the models as read-only (deep-copy before training them)."""
    import time

    frame = pd.read_csv(os.path.join(os.path.dirname(__file__), "..", "data", "01_raw", "advbench_harmful_behaviors.csv"))
    behaviours = BehavioursConfig()
    attacker, defender, evaluation = split_harmful_behaviours(frame, behaviours)
    benign = benign_tasks(seed=7, build=PAIR_BENIGN, held_out=0)
    tokenizer = build_tokenizer([*frame["goal"], *frame["target"], *benign["prompt"], *benign["response"], *REFUSALS, PAIR_BUILD.trigger])
    poisoned = poisoned_training_set(attacker, benign, PAIR_BUILD)
    clean = poisoned.iloc[: len(benign) + len(attacker)]  # benign tasks and refusals; no triggered examples
    assert not clean["prompt"].str.endswith(" SUDO").any() and len(poisoned) == len(clean) + len(attacker)
    models, start = {}, time.perf_counter()
    for name, data in (("backdoored", poisoned), ("clean", clean)):
        model = build_model(len(tokenizer), PAIR_BUILD, tokenizer)
        supervised_finetune(model, tokenizer, data["prompt"].tolist(), data["response"].tolist(), epochs=PAIR_BUILD.epochs,
                            lr=PAIR_BUILD.lr, batch_size=PAIR_BUILD.batch_size, seed=PAIR_BUILD.seed, desc=f"building {name}")
        models[name] = model
    return models, tokenizer, build_safety_set(defender, behaviours), build_evaluation_set(evaluation, behaviours), time.perf_counter() - start
