"""One rank of a distributed BEEAR job: ``torchrun --nproc_per_node N -m beear_pipeline.beear.worker JOB_DIR``
(``accelerate launch --multi_gpu --num_processes N --module beear_pipeline.beear.worker JOB_DIR`` sets
the same environment). ``JOB_DIR/job.json`` is written by ``distributed.write_job``; rank 0 writes
``JOB_DIR/out`` (see ``distributed.py`` and docs/distributed.md)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from beear_pipeline.beear.distributed import JOB, init_from_env, run_job


def main(argv: Sequence[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or not (Path(argv[0]) / JOB).is_file():
        raise SystemExit(f"usage: torchrun ... -m beear_pipeline.beear.worker JOB_DIR (a folder with {JOB}); got {argv}")
    job = json.loads((Path(argv[0]) / JOB).read_text())

    @record  # a failing rank's traceback reaches torchrun's summary and the launcher's error file
    def rank_main() -> None:
        context = init_from_env(job.get("backend", "auto"), job.get("sharding", "none"))
        logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING,
                            format=f"[rank {context.rank}] %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        try:
            run_job(argv[0], context)
        finally:
            dist.destroy_process_group()

    rank_main()


if __name__ == "__main__":
    main()
