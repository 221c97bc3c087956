"""What every benchmark shares: the machine description, statistics, and writing results.

A result is one JSON file `benchmarks/results/<name>.json` (plus `<name>.png` beside it) that
names the machine, the exact settings and the raw samples, so a number in the README can be
traced back to the command that produced it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: the machine may be shared, so results record it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (torch is imported lazily: the load generator needs none)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "load_average": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    return info


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p99, max of a sample (None where empty)."""
    return {
        "count": len(values),
        "mean": (sum(values) / len(values)) if values else None,
        "min": min(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def result_path(name: str, out_dir: Path | None = None) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    return (out_dir or RESULTS_DIR) / f"{name}.json"


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write `result` as indented JSON (NaN refused: it is not JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    log.info("wrote %s", path)
    return path


def result_header(benchmark: str, started: str, command: str | None = None) -> dict[str, Any]:
    """The fields every result starts with: what ran, how, when, and the machine it ran on (for
    the load generator: the client's)."""
    header: dict[str, Any] = {"benchmark": benchmark}
    if command is not None:
        header["command"] = command
    return header | {"started": started, "finished": timestamp(), "machine": machine()}


def save_figure(fig: Any, path: Path, dpi: int = 110, **savefig: Any) -> Path:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, **savefig)
    pyplot().close(fig)
    log.info("wrote %s", path)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (benchmarks run on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spawn_ranks(
    target: Callable[..., None], world: int, args: tuple[Any, ...], deadline_s: float
) -> list[dict[str, Any]]:
    """Run `target(rank, world, *args, out_dir)` in `world` spawned processes and collect what
    each wrote to `out_dir/rank<r>.json`. A rank that wrote nothing, or still runs at the deadline
    (then killed: a failed collective hangs its peers), gets a {"rank", "crash"} entry instead."""
    import multiprocessing
    import tempfile
    import time

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, world, *args, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = {r for r, p in enumerate(procs) if p.is_alive()}
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = Path(tmp, f"rank{r}.json")
            if r in hung:
                results.append({"rank": r, "crash": f"still running after {deadline_s:.0f} s"})
            elif path.exists():
                results.append(json.loads(path.read_text()))
            else:
                results.append({"rank": r, "crash": "exited without a result"})
    return results
