"""Smoke test of the sequence-parallel benchmark: it runs, and writes well-formed JSON whose
byte counts match what Ulysses must send."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_sp_bench_writes_machine_named_json_with_times_and_bytes(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.sp_bench", "--presets", "tiny", "--degrees", "1", "2"]
    cmd += ["--steps", "2", "--warmup", "1", "--timeout", "120", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=150, capture_output=True)

    report = json.loads(out.read_text())
    assert {"cpu", "cores", "torch"} <= set(report["machine"])
    by_degree = {r["degree"]: r for r in report["results"]}
    assert sorted(by_degree) == [1, 2]
    for res in by_degree.values():
        assert res["step_time_s"]["min"] > 0
        assert len(res["bytes_per_step_per_rank"]) == res["degree"]
    assert by_degree[1]["bytes_per_step_per_rank"] == [{}]

    # Ulysses 2 on tiny (2 layers, 2 heads of 32, 45 tokens → 2 shards of 23, 64 outputs/token):
    # per layer q/k/v out and attention back, half of each buffer leaves the rank; then the
    # output all-gather; and one 16-byte agreement per gated collective.
    n, layers, heads, head_dim, shard, out_dim, f32 = 2, 2, 2, 32, 23, 64, 4
    assert by_degree[2]["mesh"] == {"ulysses": 2, "ring": 1}
    all_to_all = layers * 4 * shard * n * heads * head_dim * f32 // n * (n - 1) // n
    expected = {"all_to_all": all_to_all, "all_gather": shard * out_dim * f32 * (n - 1)}
    expected["agree"] = (2 * layers + 1) * 16
    for sent in by_degree[2]["bytes_per_step_per_rank"]:
        assert sent == expected
    assert math.isclose(sum(expected.values()), 29520)
