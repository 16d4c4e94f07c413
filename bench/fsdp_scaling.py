"""FSDP scaling benchmark (issue 15, item 6): seconds per BEEAR round, peak memory per GPU and
scaling efficiency from 1 to N GPUs, for a random-initialised Llama under ``distributed.sharding:
fsdp`` (FSDP2 ``fully_shard`` per decoder layer and the root, ``Context.shard``).

    .venv/bin/python bench/fsdp_scaling.py --gpus 1,2,4,8                     # 13B shape, all weights trained
    .venv/bin/python bench/fsdp_scaling.py --gpus 1,2 --trainable lora       # LoRA: the frozen base sharded too
    .venv/bin/python bench/fsdp_scaling.py --shape tiny --processes 1,2      # CPU, gloo: checks the script end to end

``--shape 13b`` is Llama-2-13B's shape (hidden 5120, 40 layers, 40 heads, MLP 13824, vocabulary
32000), stored in bf16 (fp32 master weights in the outer optimiser, lm/precision.py); ``--shape
tiny`` (hidden 64, 4 layers) runs on CPU in seconds. For each N, one torchrun job of N ranks
(``distributed.launch``, the defence node's launcher) runs ``--rounds`` BEEAR rounds with the same
global batch (8 safety + 8 anchoring examples from AdvBench and the generated benign tasks, split
over the ranks), no convergence checks, ``relearn_steps: 0`` (plain BEEAR; the defend pipeline's
relearn-aware gradient adds 4 simulated steps per round). N = 1 is the plain one-process engine
(no sharding: it is the baseline FSDP is compared with).

Reported per N (bench/results/fsdp_scaling.jsonl, one JSON line per N, and fsdp_scaling.md):

- seconds per round: the median over the rounds after the first (warm-up: it also holds the
  set-up before the loop), per rank from ``run_beear``'s ``on_round`` callback (a timestamp after
  each real round of the engine, ``torch.cuda.synchronize`` first), the slowest rank's median;
- peak memory per GPU: ``torch.cuda.max_memory_allocated``, max over the ranks, over the timed
  rounds (the counter is reset after the warm-up round) and over the whole run (which also holds
  the model built whole on each GPU before ``fully_shard`` splits it). On CPU there is no such
  counter: the peak resident set size of each rank's process (``ru_maxrss``) instead, model,
  Python and torch included;
- scaling efficiency t(N0) x N0 / (t(N) x N) with N0 the smallest N that fit (strong scaling:
  the global batch stays the same, so 1.0 is perfect).

An N whose run raises CUDA out-of-memory on any rank is recorded as "does not fit" and the next N
runs (full-weight AdamW training holds 16 bytes per weight: 208 GB for 13B, more than one
141 GB H200, so N = 1 does not fit with ``--trainable all``); the efficiency is then relative to
the smallest N that fit, and the table says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import data, llama

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.beear import distributed as D
from beear_pipeline.embedded import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "data" / "bench" / "fsdp_scaling"
SHAPES = {
    "13b": dict(hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32000),  # Llama-2-13B
    "tiny": dict(hidden=64, layers=4, heads=4, intermediate=172, vocab=4096),
}
N_SAFETY, N_ANCHORING = 40, 40  # global batches of 8 + 8 drawn from them: every rank of 8 gets a share
OOM = "oom-rank{}.json"


def beear_config(args) -> BeearConfig:
    """One configuration for every N: only the number of ranks changes."""
    return BeearConfig(trainable=args.trainable, max_rounds=args.rounds, inner_steps=5, inner_max_steps=5, check_every=0,
                       batch_size=args.batch, anchoring_batch_size=args.batch, num_positions=7,
                       precision="bf16" if args.shape == "13b" else "fp32", gradient_checkpointing=args.gradient_checkpointing,
                       min_weights_changed=0.0)  # a timing run, not a reason to stop


def sharding_for(args) -> str:
    if args.sharding != "auto":
        return args.sharding
    return "fsdp"


# ---- one rank (under torchrun) ----

def rank_main(job_dir: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    job = json.loads((job_dir / D.JOB).read_text())
    bench = job["model"]

    @record  # a failing rank's traceback reaches the launcher's error file (as the worker does)
    def main() -> None:
        context = D.init_from_env(job["backend"], job["sharding"])
        logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING,
                            format=f"[rank {context.rank}] %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        cuda = torch.distributed.get_backend() == "nccl"
        try:
            measured = run_rank(job, bench, context, cuda)
        except torch.OutOfMemoryError as e:  # recorded for the parent, then the job stops as for any failure
            (job_dir / OOM.format(context.rank)).write_text(json.dumps({"rank": context.rank, "error": str(e).splitlines()[0]}))
            raise
        (job_dir / f"rank-{context.rank}.json").write_text(json.dumps(measured))
        torch.distributed.barrier()
        if context.is_main:  # what distributed.launch waits for
            (job_dir / D.OUT).mkdir(exist_ok=True)
            (job_dir / D.OUT / "result.json").write_text(json.dumps({"world_size": context.world_size, "sharding": context.sharding}))
        torch.distributed.destroy_process_group()

    main()


def run_rank(job: dict, bench: dict, context: D.Context, cuda: bool) -> dict:
    # Each rank builds the random model from its config with a fixed seed (common.llama seeds 0)
    # rather than loading a saved checkpoint: 13B in bf16 is 26 GB to write once and to read whole
    # by every rank of every N (minutes of disk per N), while building it on the GPU takes seconds
    # and gives every rank the same weights. The defence's outcome is not measured here, only time
    # and memory, for which random weights are as good as saved ones.
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    safety, anchoring = [tuple(t) for t in job["safety"]], [tuple(p) for p in job["anchoring"]]
    tokenizer = build_tokenizer([x for s in safety for x in s] + [x for a in anchoring for x in a])  # as common.data builds it
    shape = bench["shape"]
    if len(tokenizer) > shape["vocab"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the shape's vocabulary {shape['vocab']}")
    model = llama(**shape, dtype=getattr(torch, bench["dtype"]), device=device)
    config = BeearConfig.from_dict(job["config"])
    stamps, peaks = [], {}

    def on_round(round_: int, record: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if context.is_main:
            timed = f"{stamps[-1] - stamps[-2]:.2f} s" if len(stamps) > 1 else "warm-up"
            print(f"[bench] {context.world_size} rank(s): round {round_ + 1} of {config.max_rounds} done ({timed}, "
                  f"outer loss {record['outer_loss']:.4f})", flush=True)
        if round_ == 0 and bench.get("simulate_oom") and context.rank == context.world_size - 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by --simulate-oom, to check the does-not-fit path)")
        if round_ == 0 and cuda:  # the peak of the set-up and the warm-up round, then the timed rounds' own
            peaks["setup_and_warmup"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    with D.using(context):
        run_beear(model, tokenizer, safety, anchoring, config, on_round=on_round)
    if cuda:
        memory = {"memory": "cuda_max_memory_allocated", "peak_bytes": torch.cuda.max_memory_allocated(),
                  "peak_bytes_incl_setup": max(peaks.get("setup_and_warmup", 0), torch.cuda.max_memory_allocated()),
                  "device_name": torch.cuda.get_device_name(), "device_bytes": torch.cuda.get_device_properties(device).total_memory}
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        memory = {"memory": "peak_rss", "peak_bytes": rss, "peak_bytes_incl_setup": rss, "device_name": "cpu"}
    return {"rank": context.rank, "start": start, "stamps": stamps, **memory}


# ---- the parent: one job per N ----

def run_one(n: int, args, safety, anchoring, config: BeearConfig, sharding: str, backend: str) -> dict:
    job_dir = Path(args.workdir) / f"{args.shape}-{args.trainable}-n{n}"
    row = {"n": n, "shape": args.shape, "trainable": args.trainable, "sharding": sharding if n > 1 else "none (one process)",
           "backend": backend, "rounds": args.rounds, "global_batch": f"{config.batch_size}+{config.anchoring_batch_size}"}
    for stale in (*job_dir.glob("rank-*.json"), *job_dir.glob(OOM.format("*")), job_dir / D.OUT / "result.json"):
        stale.unlink(missing_ok=True)
    bench = {"shape": SHAPES[args.shape], "dtype": "bfloat16" if args.shape == "13b" else "float32", "simulate_oom": n in args.simulate_oom}
    D.write_job(job_dir, bench, safety, anchoring, config, backend=backend, sharding=sharding)
    started = time.perf_counter()
    try:
        # each rank runs this script (it builds the model from its config and stamps each round), not the worker
        D.launch(job_dir, n, echo=not args.quiet, program=(str(Path(__file__).resolve()), "--rank-of"))
    except RuntimeError as e:
        ooms = [json.loads(p.read_text()) for p in sorted(job_dir.glob(OOM.format("*")))]
        if not ooms and "out of memory" in str(e).lower():  # raised where the rank could not record it (NCCL, CUDA init)
            ooms = [{"rank": "?", "error": str(e).splitlines()[0]}]
        if ooms:
            return {**row, "status": "does not fit", "error": f"rank {ooms[0]['rank']}: {ooms[0]['error']}",
                    "wall_s": time.perf_counter() - started}
        return {**row, "status": "failed", "error": str(e).splitlines()[0], "log": str(job_dir / "torchrun.log"),
                "wall_s": time.perf_counter() - started}
    ranks = [json.loads(p.read_text()) for p in sorted(job_dir.glob("rank-*.json"))]
    per_rank = []
    for r in ranks:
        rounds = [b - a for a, b in zip([r["start"], *r["stamps"]], r["stamps"])]
        per_rank.append(rounds)
    timed = [statistics.median(rounds[1:]) for rounds in per_rank]
    return {**row, "status": "ok", "seconds_per_round": max(timed),  # the slowest rank's median (they wait on each other)
            "seconds_per_round_by_rank": timed, "first_round_s": max(rounds[0] for rounds in per_rank),
            "rounds_s_rank0": per_rank[0], "memory": ranks[0]["memory"], "peak_gb": max(r["peak_bytes"] for r in ranks) / 1e9,
            "peak_gb_incl_setup": max(r["peak_bytes_incl_setup"] for r in ranks) / 1e9, "device": ranks[0]["device_name"],
            "wall_s": time.perf_counter() - started}


def with_efficiency(rows: list[dict]) -> list[dict]:
    fit = [r for r in rows if r["status"] == "ok"]
    if not fit:
        return rows
    base = min(fit, key=lambda r: r["n"])
    for r in fit:
        r["baseline_n"] = base["n"]
        r["speedup"] = base["seconds_per_round"] / r["seconds_per_round"]
        r["efficiency"] = base["seconds_per_round"] * base["n"] / (r["seconds_per_round"] * r["n"])
    return rows


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table(rows: list[dict], header: dict) -> str:
    cpu = header["backend"] == "gloo"
    memory = "peak RSS per process (GB)" if cpu else "peak GPU memory, timed rounds (GB)"
    setup = "" if cpu else " | peak incl. set-up (GB)"
    lines = [f"FSDP scaling, {header['shape']} shape ({_count(header['params'])} parameters), trainable: {header['trainable']}, "
             f"{header['rounds']} rounds (first = warm-up), global batch {header['global_batch']}, {header['backend']} on "
             f"{header['device']}, {header['date']}", "",
             f"| processes | sharding | status | seconds per round | {memory}{setup} | speedup | scaling efficiency |",
             "|---|---|---|---|---|---|---|" + ("" if cpu else "---|")]
    for r in rows:
        if r["status"] == "ok":
            extra = "" if cpu else f" | {r['peak_gb_incl_setup']:.2f}"
            lines.append(f"| {r['n']} | {r['sharding']} | ok | {r['seconds_per_round']:.3f} | {r['peak_gb']:.2f}{extra} | "
                         f"{r['speedup']:.2f} | {r['efficiency']:.2f} |")
        else:
            lines.append(f"| {r['n']} | {r['sharding']} | {r['status']}: {r['error'][:120]} | - | -{'' if cpu else ' | -'} | - | - |")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        base = ok[0]["baseline_n"]
        note = (f"Scaling efficiency = t({base}) x {base} / (t(N) x N), relative to N = {base}, the smallest N that fit"
                + (f" (N = {', '.join(str(r['n']) for r in rows if r['n'] < base)} did not)." if base > min(r["n"] for r in rows) else "."))
        lines += ["", note]
    else:
        lines += ["", "No N fit: no seconds per round and no scaling efficiency."]
    if cpu:
        lines += ["", "CPU (gloo), not GPU: memory is each rank process's peak resident set size (model, Python and torch "
                      "included), not GPU memory; ranks share the machine's cores."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpus", help="comma-separated numbers of GPUs (NCCL, one rank per GPU), e.g. 1,2,4,8")
    group.add_argument("--processes", help="comma-separated numbers of CPU processes (gloo), e.g. 1,2")
    parser.add_argument("--trainable", choices=["all", "lora", "up_to_anchor"], default="all")
    parser.add_argument("--sharding", choices=["auto", "fsdp", "optimizer", "none"], default="auto",
                        help="for N > 1; auto: fsdp")
    parser.add_argument("--rounds", type=int, default=3, help="BEEAR rounds per N, the first one a warm-up (at least 2)")
    parser.add_argument("--batch", type=int, default=8, help="global safety and anchoring batch (the same for every N)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--workdir", default=str(WORK), help="job folders (no model is saved: each rank builds it)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for fsdp_scaling.jsonl and fsdp_scaling.md")
    parser.add_argument("--quiet", action="store_true", help="do not echo the ranks' output")
    parser.add_argument("--simulate-oom", type=lambda s: {int(n) for n in s.split(",")}, default=set(), metavar="N[,N]",
                        help="for these N, the last rank raises CUDA out-of-memory after the warm-up round (checks the does-not-fit path on CPU)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the first round is a warm-up)")
    if args.gpus:
        backend, counts = "nccl", args.gpus
        if not torch.cuda.is_available():
            parser.error("--gpus needs CUDA; --shape tiny --processes 1,2 runs on CPU with gloo")
        if max(map(int, counts.split(","))) > torch.cuda.device_count():
            parser.error(f"--gpus {counts}: this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        backend, counts = "gloo", args.processes or "1,2"
    ns = sorted({int(n) for n in counts.split(",")})
    config = beear_config(args)
    sharding = sharding_for(args)
    _, safety, anchoring = data(N_SAFETY, N_ANCHORING)
    for n in ns:  # the defence node's own check before launching (batch shares, the distribution refusals)
        try:
            D.check_job(len(safety), len(anchoring), config, n)
        except ValueError as e:
            parser.error(f"N = {n}: {e}")
    params = sum(p.numel() for p in llama(**SHAPES[args.shape], device="meta").parameters())
    # the parent never touches a GPU (a CUDA context of its own would take memory from rank 0's GPU):
    # the GPU's name comes from the ranks
    header = {"kind": "header", "shape": args.shape, "params": params, "trainable": args.trainable, "sharding": sharding,
              "rounds": args.rounds, "global_batch": f"{args.batch}+{args.batch}", "backend": backend, "processes": ns,
              "device": "CUDA" if backend == "nccl" else "CPU", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"[bench] {json.dumps(header)}", flush=True)
    rows = []
    for n in ns:
        print(f"[bench] N = {n}: launching {n} rank(s) ({backend}, sharding {sharding if n > 1 else 'none'})", flush=True)
        row = run_one(n, args, safety, anchoring, config, sharding, backend)
        rows.append(row)
        done = (f"{row['seconds_per_round']:.3f} s per round, peak {row['peak_gb']:.2f} GB" if row["status"] == "ok"
                else f"{row['status']}: {row['error']}")
        print(f"[bench] N = {n}: {done} ({row['wall_s']:.0f} s with start-up)", flush=True)
    rows = with_efficiency(rows)
    header["device"] = next((r["device"] for r in rows if r["status"] == "ok"), header["device"])  # the ranks' GPU name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fsdp_scaling.jsonl", "a") as f:
        for line in (header, *rows):
            f.write(json.dumps({**line, "date": header["date"]}) + "\n")
    text = table(rows, header)
    (out / "fsdp_scaling.md").write_text(text + "\n")
    print(text)
    print(f"[bench] appended to {out / 'fsdp_scaling.jsonl'}, wrote {out / 'fsdp_scaling.md'}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-of":  # one rank, started by torchrun (run_one's launch)
        rank_main(Path(sys.argv[2]))
    else:
        sys.exit(main())
