"""bench/fsdp_scaling.py (issue 15 item 6) end to end on CPU: the tiny shape on 1 and 2 gloo
processes through torchrun (``distributed.launch``), 2 rounds each, gives a row per N with seconds
per round from the engine's ``on_round`` and a scaling efficiency; and an N that ran out of memory
is recorded as not fitting, the efficiency taken from the smallest N that fit. The launches cost
40-65 s on 2 busy cores: marked slow, like the other torchrun launches."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fsdp_scaling  # bench/ is not a package


@pytest.mark.slow
def test_the_tiny_shape_on_one_and_two_processes_gives_both_rows(tmp_path):
    rc = fsdp_scaling.main(["--shape", "tiny", "--processes", "1,2", "--rounds", "2", "--quiet",
                            "--workdir", str(tmp_path / "jobs"), "--out", str(tmp_path / "out")])
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "fsdp_scaling.jsonl").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["kind"] == "header" and header["backend"] == "gloo" and header["processes"] == [1, 2]
    assert [r["n"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    assert rows[1]["sharding"] == "fsdp"
    for r in rows:
        assert r["seconds_per_round"] > 0 and len(r["rounds_s_rank0"]) == 2  # the warm-up and one timed round
        assert r["memory"] == "peak_rss" and r["peak_gb"] > 0
        assert r["baseline_n"] == 1 and r["efficiency"] > 0
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[0]["seconds_per_round"] / (2 * rows[1]["seconds_per_round"]))
    table = (tmp_path / "out" / "fsdp_scaling.md").read_text()
    assert "| 1 | none (one process) | ok |" in table and "| 2 | fsdp | ok |" in table
    assert "peak RSS per process" in table  # CPU: says it is RSS, not GPU memory


def test_an_n_that_does_not_fit_moves_the_efficiency_baseline():
    rows = [{"n": 1, "sharding": "none (one process)", "status": "does not fit", "error": "rank 0: CUDA out of memory"},
            {"n": 2, "sharding": "fsdp", "status": "ok", "seconds_per_round": 10.0, "peak_gb": 100.0, "peak_gb_incl_setup": 110.0},
            {"n": 4, "sharding": "fsdp", "status": "ok", "seconds_per_round": 6.0, "peak_gb": 50.0, "peak_gb_incl_setup": 60.0}]
    rows = fsdp_scaling.with_efficiency(rows)
    assert "efficiency" not in rows[0]
    assert rows[1]["efficiency"] == 1.0 and rows[2]["efficiency"] == pytest.approx(10 * 2 / (6 * 4))
    header = {"shape": "13b", "params": 13_015_864_320, "trainable": "all", "rounds": 3, "global_batch": "8+8", "backend": "nccl",
              "device": "GPU", "date": "today"}
    table = fsdp_scaling.table(rows, header)
    assert "| 1 | none (one process) | does not fit: rank 0: CUDA out of memory |" in table
    assert "| 4 | fsdp | ok | 6.000 | 50.00 | 60.00 | 1.67 | 0.83 |" in table
    assert "relative to N = 2, the smallest N that fit (N = 1 did not)" in table
