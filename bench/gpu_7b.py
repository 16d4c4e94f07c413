"""GPU benchmark (c): seconds per BEEAR round and peak GPU memory on a random 7B-shaped Llama
(Llama-2-7B shape: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000) in bf16,
built from a config on the GPU (no download), for ``trainable: lora`` and ``up_to_anchor``.

    .venv/bin/python bench/gpu_7b.py            # about 3-5 minutes on one H100/H200; hard stop at 8

Writes bench/results/gpu_7b.json. Anchor layer 9 (as the official code for 7B models), the
official layout (7 x hidden perturbation, 5 inner steps), batches of 8 safety and 8 anchoring
examples from AdvBench / the generated benign tasks.
"""

from __future__ import annotations

import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import data, llama, n_params

from beear_pipeline.beear import BeearConfig, run_beear

BUDGET_S = 8 * 60
SHAPE = dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)


def measure(model, tokenizer, safety, anchoring, scope: str, rounds: int) -> tuple[dict, torch.nn.Module]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    config = BeearConfig(trainable=scope, anchor_layer=9, max_rounds=rounds, inner_steps=5, inner_max_steps=5, check_every=0, batch_size=8, anchoring_batch_size=8,
                         outer_lr=3e-7 if scope != "lora" else 1e-4, precision="bf16", merge_adapter=True)
    result = run_beear(model, tokenizer, safety, anchoring, config, on_round=lambda r, rec: stamps.append(time.perf_counter()))
    torch.cuda.synchronize()
    per_round = [b - a for a, b in itertools.pairwise(stamps)]
    return {"scope": scope, "rounds": rounds, "first_round_s": per_round[0],
            "seconds_per_round": statistics.median(per_round[1:] or per_round),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "final_outer_loss": result.history[-1]["outer_loss"]}, result.model


def main():
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_7b.py needs a CUDA GPU (about 40 GB free); run bench/bench_cpu.py on CPU")
    start = time.perf_counter()
    tokenizer, safety, anchoring = data(64, 64)
    model = llama(**SHAPE, dtype=torch.bfloat16, device="cuda")
    built = time.perf_counter() - start
    results = {"gpu": torch.cuda.get_device_name(), "params": n_params(model), "build_s": built,
               "weights_gb": torch.cuda.memory_allocated() / 2**30, "runs": []}
    print(json.dumps(results), flush=True)
    for scope in ("lora", "up_to_anchor"):
        if time.perf_counter() - start > BUDGET_S - 120:
            results["runs"].append({"scope": scope, "skipped": "time budget"})
            continue
        row, model = measure(model, tokenizer, safety, anchoring, scope, rounds=3)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
    results["total_s"] = time.perf_counter() - start
    out = Path(__file__).parent / "results" / "gpu_7b.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
