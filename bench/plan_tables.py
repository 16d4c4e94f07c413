"""The memory and disk plans of docs/memory-plan.md, from config.json files alone.

For each model under tests/data/configs (Llama-2-7B, -13B, -70B, Mistral-7B-v0.1 and -v0.2,
written from their published config.json values) and each setting (conf/base's ``beear`` block,
then with changes), the predicted peak GPU memory and the part of the run that sets it, the disk
the run writes, whether it fits one 80 GB or one 141 GB GPU (with the plan's 10% headroom), and
the largest batch (safety = anchoring) that does. Prints markdown.

    .venv/bin/python bench/plan_tables.py [--sequence-length 256]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from beear_pipeline.beear import BeearConfig
from beear_pipeline.lm.plan import GiB, plan_memory, read_shape

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
MODELS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "mistral-7b-v0.1", "mistral-7b-v0.2"]
GPUS = {"80 GB": 81559 * 2**20, "141 GB": 143771 * 2**20}
"""Memory as nvidia-smi reports it: H100/A100 80 GB (79.6 GiB), H200 141 GB (140.4 GiB)."""
HEADROOM = 0.1
SETTINGS = {  # name: (beear changes, model.dtype)
    "defaults": ({}, None),
    "lora + gradient checkpointing": ({"trainable": "lora", "gradient_checkpointing": True}, None),
    "lora + gradient checkpointing, bf16": ({"trainable": "lora", "gradient_checkpointing": True}, "bfloat16"),
    "lora + gradient checkpointing, bf16, check_every 0": ({"trainable": "lora", "gradient_checkpointing": True, "check_every": 0},
                                                          "bfloat16"),
}


def configured_beear() -> BeearConfig:
    """conf/base's ``beear`` block, as ``kedro run`` reads it, its ``anchor_layer: null`` resolved to
    the scenario's layer as the run resolves it."""
    from kedro.config import OmegaConfigLoader

    from beear_pipeline.scenarios import scenario_anchor_layer

    params = OmegaConfigLoader(conf_source=str(ROOT / "conf"), base_env="base", default_run_env="base")["parameters"]
    beear = BeearConfig.from_dict(dict(params["beear"]))
    return dataclasses.replace(beear, anchor_layer=scenario_anchor_layer(beear.anchor_layer, params.get("scenario"))[0])


def largest_batch(shape, beear: BeearConfig, seq: int, device_bytes: int) -> int:
    """The largest power-of-two batch (safety = anchoring) up to beear's that fits, 0 if none."""
    size = beear.batch_size
    while size >= 1:
        plan = plan_memory(shape, dataclasses.replace(beear, batch_size=size, anchoring_batch_size=size), seq, "cuda")
        if plan.peak_device_bytes <= (1 - HEADROOM) * device_bytes:
            return size
        size //= 2
    return 0


def rows(seq: int) -> list[str]:
    base = configured_beear()
    out = ["| model | setting | weights | peak GPU memory (part of the run) | outer / inner level / final audit | disk "
           "(checkpoint) | fits 80 GB | fits 141 GB | largest batch 80 / 141 GB |", "|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for setting, (changes, dtype) in SETTINGS.items():
            shape = read_shape(CONFIGS / name, dtype, base.lora_target_modules, name)
            beear = dataclasses.replace(base, **changes)
            plan = plan_memory(shape, beear, seq, "cuda")
            fits = {gpu: "yes" if plan.peak_device_bytes <= (1 - HEADROOM) * size else "no" for gpu, size in GPUS.items()}
            batches = " / ".join(str(largest_batch(shape, beear, seq, size) or "none") for size in GPUS.values())
            levels = " / ".join(f"{plan.phases.get(k, 0) / GiB:,.0f}" for k in ("outer level", "inner level", "final audit"))
            out.append(f"| {name} ({shape.storage_dtype}) | {setting} | {plan.memory['weights'] / GiB:,.1f} GiB | "
                       f"**{plan.peak_device_bytes / GiB:,.1f} GiB** ({plan.phase}) | {levels} GiB | {plan.disk_bytes / GiB:,.0f} GiB "
                       f"({plan.checkpoint_bytes / GiB:,.1f}) | {fits['80 GB']} | {fits['141 GB']} | {batches} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence-length", type=int, default=256, help="the longest example of a batch, in tokens")
    args = parser.parse_args()
    base = configured_beear()
    print(f"Batches of {base.batch_size} + {base.anchoring_batch_size} examples x {args.sequence_length} tokens, anchor layer "
          f"{base.anchor_layer}, {base.outer_optimizer}, precision {base.precision} on a GPU (bf16 autocast), checkpoints in "
          f"{base.checkpoint_dir}; fits: peak <= {1 - HEADROOM:.0%} of the GPU's memory.\n")
    print("\n".join(rows(args.sequence_length)))


if __name__ == "__main__":
    main()
