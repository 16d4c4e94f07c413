"""CPU benchmarks of the BEEAR engine on a random Llama of about 100M parameters.

(a) time of one inner step with activation reuse vs the full forward pass, measured side by side
    (interleaved repeats, same batch, same perturbation);
(b) seconds per round and peak memory for each trainable scope, each scope in its own process
    so that the peak resident memory (ru_maxrss) is that scope's alone.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cpu.py          # both, writes bench/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import data, llama, n_params

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.lm.chat import (
    collate,
    encode_all,
    response_loss,
)
from beear_pipeline.lm.residual import anchor_output, perturbed, position_index, reused_activations

SHAPE = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=8192)  # ~97M parameters
BATCH = 8


def inner_step(model, batch, index, delta, layer, cached):
    """One inner step's work on one batch: forward with the perturbation, backward to delta."""
    with perturbed(model, layer, delta, index), (reused_activations(model, layer, cached) if cached is not None else _null()):
        loss = response_loss(model, batch)
    loss.backward()
    return loss.item()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def part_a(anchor_layers=(3, 8), repeats=5) -> list[dict]:
    tokenizer, safety, _ = data(BATCH, 0)
    model = llama(**SHAPE).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    examples = encode_all(tokenizer, [s[0] for s in safety], [s[2] for s in safety])
    batch = collate(examples, tokenizer.pad_token_id)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), 7, False)
    rows = []
    for layer in anchor_layers:
        delta = torch.zeros(7, SHAPE["hidden"], requires_grad=True)
        cache_start = time.perf_counter()
        cached = anchor_output(model, layer, batch.input_ids, batch.attention_mask)
        cache_s = time.perf_counter() - cache_start
        full, reuse = [], []
        inner_step(model, batch, index, delta, layer, None)  # warm-up
        for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
            for mode, times in (("full", full), ("reuse", reuse)):
                start = time.perf_counter()
                inner_step(model, batch, index, delta, layer, cached if mode == "reuse" else None)
                times.append(time.perf_counter() - start)
        ratio = statistics.median(reuse) / statistics.median(full)
        rows.append({"anchor_layer": layer, "layers_after_anchor_share": (SHAPE["layers"] - layer - 1) / SHAPE["layers"],
                     "full_s": statistics.median(full), "reuse_s": statistics.median(reuse), "ratio": ratio,
                     "cache_once_s": cache_s, "params": n_params(model), "tokens": int(batch.attention_mask.sum()),
                     "seq_len": batch.input_ids.size(1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def scope_worker(scope: str, rounds: int) -> dict:
    tokenizer, safety, anchoring = data(64, 64)
    model = llama(**SHAPE)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    options = {"gc": dict(trainable="all", gradient_checkpointing=True), "lora": dict(trainable="lora", lora_rank=16, merge_adapter=False)}
    config = BeearConfig(**{"trainable": scope, **options.get(scope, {})}, anchor_layer=3, max_rounds=rounds, inner_steps=3, inner_max_steps=3, check_every=0,
                         batch_size=BATCH, anchoring_batch_size=BATCH, precision="fp32")
    times = []
    start = time.perf_counter()
    result = run_beear(model, tokenizer, safety, anchoring, config, on_round=lambda r, rec: times.append(time.perf_counter()))
    per_round = [b - a for a, b in zip([start, *times[:-1]], times)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # counted on the result: a LoRA run wraps the model, and its adapters are the trainable part
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return {"scope": scope, "seconds_per_round": statistics.median(per_round[1:] or per_round), "peak_rss_gb": peak / 2**20,
            "rss_over_model_gb": (peak - base_rss) / 2**20, "trainable_params": trainable}


def part_b(scopes=("all", "up_to_anchor", "after_anchor", "lora", "gc"), rounds=3) -> list[dict]:
    rows = []
    for scope in scopes:
        out = subprocess.run([sys.executable, __file__, "--scope-worker", scope, "--rounds", str(rounds)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--scope-worker")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.scope_worker:
        print(json.dumps(scope_worker(args.scope_worker, args.rounds)))
        return
    results = {"threads": torch.get_num_threads(), "shape": SHAPE, "batch": BATCH}
    if args.part in ("a", "all"):
        results["a_inner_step_reuse_vs_full"] = part_a()
    if args.part in ("b", "all"):
        results["b_scopes"] = part_b(rounds=args.rounds)
    out = Path(__file__).parent / "results" / "cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
