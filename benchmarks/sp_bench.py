"""Sequence-parallel DiT micro-benchmark: per-step time and bytes moved per rank, SP degree 1/2/4.

One "step" is one DiT forward (one CFG branch) with a cached identity, as the runner does it.
For each preset and degree it spawns `degree` ranks (gloo on CPU, NCCL with --device cuda),
runs warm-up steps, then timed steps, and records per rank the bytes its collectives sent
(parallel.CommStats: all-to-all, ring shifts, output all-gather, agreement all-reduces).
Results are printed and saved as JSON naming the machine (CPU/GPU model, core count, torch).

    python -m benchmarks.sp_bench                          # tiny + medium, SP 1/2/4, CPU gloo
    python -m benchmarks.sp_bench --presets tiny --degrees 1 2 --steps 3

On a machine with fewer cores than ranks the ranks share cores: the times then show the
communication overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from parallel import Collectives, DeviceMesh, ParallelConfig, ShardedDiT, init_distributed
from parallel.rendezvous import free_port
from standin.config import DiTConfig
from standin.dit import WanDiT
from standin.presets import dit_preset

log = logging.getLogger("sp_bench")

RESULTS_DIR = Path(__file__).parent / "results"

# name → (model config, latent shape [C, F, H, W], identity latent [C, 1, h, w], text tokens)
PRESETS: dict[str, tuple[DiTConfig, tuple[int, ...], tuple[int, ...], int]] = {
    "tiny": (dit_preset("tiny"), (16, 3, 6, 10), (16, 1, 6, 6), 7),
    # Wan-like proportions at a size two CPU cores finish in seconds: 1,280 video tokens,
    # 256 identity tokens, 8 heads (Ulysses up to 8).
    "medium": (
        DiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=4, text_dim=256, freq_dim=256, lora_rank=32),
        (16, 4, 32, 40),
        (16, 1, 32, 32),
        64,
    ),
}


def _rank_main(
    rank: int,
    world: int,
    port: int,
    preset: str,
    steps: int,
    warmup: int,
    device: str,
    gated: bool,
    threads: int,
    out: str,
) -> None:
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        init_distributed(rank, world, f"tcp://127.0.0.1:{port}", backend=backend)
    config, latent_shape, identity_shape, text_len = PRESETS[preset]
    torch.manual_seed(0)
    model = WanDiT(config).eval().to(dev)
    mesh = DeviceMesh(ParallelConfig.for_world(world, config.num_heads), config.num_heads, device=dev)
    comm = Collectives(mesh, gated=gated)
    dit = ShardedDiT(model, comm)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent_shape, generator=g).to(dev)
    context = torch.randn(1, text_len, config.text_dim, generator=g).to(dev)
    identity = dit.identity_cache(torch.randn(1, *identity_shape, generator=g).to(dev), latents.shape)
    t = torch.full((1,), 500.0, device=dev)

    times = []
    for i in range(warmup + steps):
        comm.stats.reset()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dit(latents, t, context, identity)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    mine = {"times": times, "bytes": dict(comm.stats.bytes_sent), "calls": dict(comm.stats.calls)}
    everyone = comm.all_gather_object(mine)
    if rank == 0:
        grid = model.token_grid(latents.shape)
        _, ih, iw = model.token_grid((1, *identity_shape))
        # Slowest rank per step: the step is done when the last rank is.
        per_step = [max(r["times"][i] for r in everyone) for i in range(steps)]
        result = {
            "preset": preset,
            "model": {k: getattr(config, k) for k in ("dim", "num_heads", "num_layers", "ffn_dim")},
            "video_tokens": grid[0] * grid[1] * grid[2],
            "identity_tokens": ih * iw,
            "degree": world,
            "mesh": {"ulysses": mesh.config.ulysses, "ring": mesh.config.ring},
            "backend": backend if world > 1 else "none",
            "gated": comm.gated,
            "threads_per_rank": torch.get_num_threads(),
            "step_time_s": {
                "median": statistics.median(per_step),
                "min": min(per_step),
                "mean": statistics.fmean(per_step),
            },
            "bytes_per_step_per_rank": [r["bytes"] for r in everyone],
            "collective_calls_per_step": everyone[0]["calls"],
        }
        Path(out).write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()



def run_one(
    preset: str,
    degree: int,
    steps: int,
    warmup: int,
    device: str = "cpu",
    gated: bool = True,
    timeout_s: float = 600.0,
    threads: int = 0,
) -> dict:
    """Spawn `degree` ranks for one measurement; raise if they fail or outlive timeout_s."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = (degree, port, preset, steps, warmup, device, gated, threads, out)
        procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(degree)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        if alive or any(p.exitcode for p in procs) or not os.path.exists(out):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"{preset} SP={degree} failed (exit codes {codes}, timed out: {bool(alive)})")
        return json.loads(Path(out).read_text())


def default_output() -> Path:
    info = machine()
    name = info.get("gpu") or info["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d")
    torch_version = torch.__version__.split("+")[0]
    return RESULTS_DIR / f"sp_bench_{slug}_torch{torch_version}_{stamp}.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--degrees", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--ungated",
        action="store_true",
        help="drop the per-collective agreement all-reduces (measures their cost)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (default: cores // degree)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    report = {
        "machine": machine(),
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": [],
    }
    for preset in args.presets:
        for degree in args.degrees:
            res = run_one(
                preset,
                degree,
                args.steps,
                args.warmup,
                args.device,
                not args.ungated,
                args.timeout,
                args.threads,
            )
            report["results"].append(res)
            sent = max(sum(b.values()) for b in res["bytes_per_step_per_rank"])
            log.info(
                "%-7s SP=%d (ulysses %d × ring %d): %8.1f ms/step (median), %8.1f (min), "
                "%10.0f bytes/step/rank",
                preset,
                degree,
                res["mesh"]["ulysses"],
                res["mesh"]["ring"],
                1000 * res["step_time_s"]["median"],
                1000 * res["step_time_s"]["min"],
                sent,
            )
    out = args.out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return report


if __name__ == "__main__":
    main()
