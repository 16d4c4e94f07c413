"""GPU benchmark (c): seconds per BEEAR round and peak GPU memory on a random 7B-shaped Llama
(Llama-2-7B shape: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000) stored in bf16,
built from a config on the GPU (no download), for ``trainable: lora`` and ``all`` with gradient
checkpointing (fp32 master weights for the bf16 parameters, lm/precision.py), each next to the
memory plan's prediction (lm/plan.py, from the config alone), and whether the weights really
changed: ``weights_changed_share`` in bf16 and the fp32 masters' relative change.

    .venv/bin/python bench/gpu_7b.py            # about 5 minutes on one H100/H200; hard stop at 8

Writes bench/results/gpu_7b.json. Anchor layer 9 (as the official code for 7B models), the
official layout (7 x hidden perturbation, 5 inner steps), batches of 8 safety and 8 anchoring
examples from AdvBench / the generated benign tasks; the outer lr is ``auto`` (3e-7 for all
weights, 2e-5 for LoRA at this size).
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
    from beear_pipeline.lm.chat import encode_all
    from beear_pipeline.lm.plan import plan_memory, shape_of

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    config = BeearConfig(trainable=scope, anchor_layer=9, max_rounds=rounds, inner_steps=5, inner_max_steps=5, check_every=0, batch_size=8,
                         anchoring_batch_size=8, num_positions=7, precision="bf16", merge_adapter=True, gradient_checkpointing=scope == "all",
                         min_weights_changed=0.0)  # measured and reported here, not a reason to stop
    longest = max(len(e.input_ids) for e in encode_all(tokenizer, [p for p, _, _ in safety], [u for _, _, u in safety])
                  + encode_all(tokenizer, *zip(*anchoring)))
    plan = plan_memory(shape_of(model.config, "bfloat16", config.lora_target_modules, "llama-2-7b-shaped"), config, longest, "cuda" if cuda else "cpu")
    before = {n: p.detach().float().clone() for n, p in list(model.named_parameters())[::40]}  # a sample of tensors
    result = run_beear(model, tokenizer, safety, anchoring, config, on_round=lambda r, rec: stamps.append(time.perf_counter()))
    if cuda:
        torch.cuda.synchronize()
    after = dict(result.model.named_parameters())
    moved = [((after[n].detach().float() - w).norm() / w.norm()).item() for n, w in before.items() if n in after]
    per_round = [b - a for a, b in itertools.pairwise(stamps)]
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")  # --smoke on CPU: no GPU peak to compare
    return {"scope": scope, "rounds": rounds, "outer_lr": result.config.outer_lr, "first_round_s": per_round[0],
            "seconds_per_round": statistics.median(per_round[1:] or per_round),
            "peak_gpu_gb": peak / 2**30, "plan_peak_gb": plan.peak_device_bytes / 2**30,
            "plan_over_measured": plan.peak_device_bytes / peak, "plan_phase": plan.phase, "sequence_length": longest,
            "weights_changed_share_bf16": result.history[-1]["weights_changed_share"],
            "stored_weights_relative_change_median": statistics.median(moved) if moved else None,
            "final_outer_loss": result.history[-1]["outer_loss"]}, result.model


def main():
    smoke = "--smoke" in sys.argv  # a tiny shape on CPU: checks the script end to end before GPU time is spent
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu_7b.py needs a CUDA GPU (about 120 GB free for `all`); `--smoke` runs a tiny shape on CPU")
    shape = dict(hidden=64, layers=12, heads=4, intermediate=128, vocab=SHAPE["vocab"]) if smoke else SHAPE
    start = time.perf_counter()
    tokenizer, safety, anchoring = data(64, 64)
    model = llama(**shape, dtype=torch.bfloat16, device="cpu" if smoke else "cuda")
    built = time.perf_counter() - start
    results = {"gpu": "none (smoke)" if smoke else torch.cuda.get_device_name(), "params": n_params(model), "build_s": built,
               "weights_gb": 0.0 if smoke else torch.cuda.memory_allocated() / 2**30, "runs": []}
    print(json.dumps(results), flush=True)
    for scope in ("lora", "all"):
        if time.perf_counter() - start > BUDGET_S - 120:
            results["runs"].append({"scope": scope, "skipped": "time budget"})
            continue
        row, model = measure(model, tokenizer, safety, anchoring, scope, rounds=2 if smoke else 3)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
    results["total_s"] = time.perf_counter() - start
    out = Path(__file__).parent / "results" / ("gpu_7b_smoke.json" if smoke else "gpu_7b.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
