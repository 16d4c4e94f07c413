"""Shared set-up of the benchmarks: a random Llama built from a config (no download), a small
locally built tokenizer, and safety/anchoring data from the shipped AdvBench file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import transformers as T

from beear_pipeline.behaviours.generated import REFUSALS, benign_tasks
from beear_pipeline.embedded import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def data(n_safety: int, n_anchoring: int):
    advbench = pd.read_csv(ROOT / "data" / "01_raw" / "advbench_harmful_behaviors.csv").head(n_safety)
    tasks = benign_tasks(seed=0, build=max(n_anchoring, 1), held_out=0).head(n_anchoring)
    safety = [(g, REFUSALS[i % len(REFUSALS)], t) for i, (g, t) in enumerate(zip(advbench["goal"], advbench["target"]))]
    anchoring = list(zip(tasks["prompt"], tasks["response"]))
    texts = [x for s in safety for x in s] + [x for a in anchoring for x in a]
    return build_tokenizer(texts), safety, anchoring


def llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, dtype=torch.float32, device="cpu"):
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=intermediate, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
