"""The harness of the distributed tests: one function on N ranks, each in its own spawned process
with a hard deadline (a failed collective hangs forever), results returned as JSON.

    def rank_main(rank: int, world: int, init_method: str, *args) -> dict: ...   # module level
    results = run_ranks(rank_main, 2, tmp_path, deadline_s=120)

`rank_main` forms the process group itself (`init_distributed(rank, world, init_method)`), so a
test can prepare what must exist before it (e.g. a recorder of sends). An exception in a rank
becomes {"crash": traceback}; a crash, a hang past the deadline or a rank without results fails
the test naming the rank.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from parallel.rendezvous import free_port

RankMain = Callable[..., dict]


def _child(rank_main: RankMain, rank: int, world: int, init_method: str, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N ranks share 2 cores
    try:
        result = rank_main(rank, world, init_method, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # skip process-group teardown: failure scenarios leave broken groups behind


def run_ranks(rank_main: RankMain, world: int, out_dir: Path, deadline_s: float, *args: Any) -> list[dict]:
    """Run `rank_main(rank, world, init_method, *args)` on ranks 0..world-1 → their results."""
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    procs = [
        ctx.Process(target=_child, args=(rank_main, r, world, init_method, str(out_dir), args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    name = getattr(rank_main, "__name__", "ranks")
    if hung:
        pytest.fail(f"{name}: ranks {hung} still running after {deadline_s} s (hang)")
    results = []
    for r in range(world):
        path = out_dir / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"{name}: rank {r} exited without results (exit code {procs[r].exitcode})")
        results.append(json.loads(path.read_text()))
    crashes = {r: res["crash"] for r, res in enumerate(results) if "crash" in res}
    if crashes:
        pytest.fail(f"{name} crashed:\n" + "\n".join(f"rank {r}:\n{tb}" for r, tb in crashes.items()))
    return results
