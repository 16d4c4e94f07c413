"""Shared fixtures: real, tiny Hugging Face models and tokenizers built locally (no downloads)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from beear_pipeline.embedded import EmbeddedModelConfig, benign_tasks, build_model, build_tokenizer  # noqa: E402

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
