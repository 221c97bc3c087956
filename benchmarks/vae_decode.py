"""Parallel VAE decode: single-process vs bands of rows over gloo ranks, and where decoding should run.

    python -m benchmarks.vae_decode            # ~3 min on 2 cores
    python -m benchmarks.vae_decode --quick    # a smoke run (tiny VAE, 1 repetition)

Measured (CPU): the Wan2.1 VAE architecture at a medium width decodes the same latents
(1) in one process (`WanVAE.decode`), (2) as one band through the split path (its overhead),
(3) as 2 bands on 2 gloo ranks (parallel/vae_decode.py), each rank with its share of the cores;
per variant the wall time (median of repetitions) and, per rank, the bytes its halo exchanges
and gathers sent (parallel.CommStats). The split's output is checked against (1).

Arithmetic (real sizes): the official Wan2.1 VAE decoder on 81 frames at 480×832 and 720×1280,
FLOPs counted from the module shapes (every conv's output elements × its input channels ×
kernel volume, and the attention block's two matmuls) on the meta device, the halo and gather
bytes of the tallest band of 8 ranks from the real split path (a counting split), and from
them the decode time on 1 GPU vs on 8 ranks at stated throughput assumptions, against the
DiT's time per video. JSON + PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import pyplot, result_header, result_path, save_figure, timestamp, write_result
from parallel import Collectives, DeviceMesh, ParallelConfig, init_distributed
from parallel.rendezvous import free_port
from parallel.vae_decode import RowBands, decode_bands
from standin.vae import TINY_VAE, WAN21_VAE, AttentionBlock, VAEConfig, WanVAE

log = logging.getLogger("vae_decode")

MEDIUM_VAE = VAEConfig(dim=32)  # a third of Wan2.1's width: the same layers, ~1/9 of the FLOPs

# Assumptions of the real-size arithmetic (stated in the result, change them with the flags).
ASSUMED = {
    # H100 SXM: 67 TFLOP/s fp32 without tensor cores, ~495 dense TF32 (cuDNN convs use TF32 by
    # default in PyTorch). 3D convs with few channels at high resolution, norms and SiLU between
    # them reach a fraction of that: 50 TFLOP/s effective, and the sensitivity at 25 and 100.
    "gpu_tflops": 50.0,
    "gpu_tflops_range": (25.0, 100.0),
    # NVLink 4 is 450 GB/s per direction; halo rows are small messages: 100 GB/s effective.
    "link_gbps": 100.0,
    # per halo exchange or gather: the NCCL call plus the gloo gate all-reduce on the CPU
    "latency_us_per_exchange": 100.0,
    "dit_seconds_per_video": (38.0, 60.0),
    "replicas_per_shared_decoder": 4,
    "ranks": 8,
}
REAL_SIZES = ((480, 832), (720, 1280))
REAL_FRAMES = 81


# ---------------------------------------------------------------------------------------------
# Measured on CPU
# ---------------------------------------------------------------------------------------------


def random_vae(config: VAEConfig, seed: int = 0) -> WanVAE:
    """Deterministic weights (the same in every process); the zero-initialised attention
    projections made non-zero so the attention path does work."""
    torch.manual_seed(seed)
    vae = WanVAE(config).eval()
    for m in vae.modules():
        if isinstance(m, AttentionBlock):
            nn.init.normal_(m.proj.weight, std=m.proj.in_channels**-0.5)
    return vae.requires_grad_(False)


def _latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _time(fn: Any, reps: int) -> tuple[list[float], Any]:
    out = fn()  # warm-up, untimed
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _rank_main(
    rank: int, world: int, init_method: str, config: VAEConfig, shape: tuple[int, ...], reps: int,
    threads: int, out_dir: str,
) -> None:
    torch.set_num_threads(threads)
    init_distributed(rank, world, init_method, timeout=datetime.timedelta(minutes=10))
    comm = Collectives(DeviceMesh(ParallelConfig(ring=world), num_heads=1))
    vae, z = random_vae(config), _latents(shape)
    decode_bands(vae, z, comm)  # warm-up
    seconds, sent, calls = [], Counter(), Counter()
    for _ in range(reps):
        comm.agree()  # start together
        comm.stats.reset()
        start = time.perf_counter()
        video = decode_bands(vae, z, comm)
        seconds.append(time.perf_counter() - start)
        sent, calls = Counter(comm.stats.bytes_sent), Counter(comm.stats.calls)
    result = {"seconds": seconds, "bytes_sent": dict(sent), "calls": dict(calls)}
    if rank == 0:
        torch.save(video, Path(out_dir) / "video.pt")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(world: int, *args: Any) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, init_method, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)
        if p.is_alive() or p.exitcode:
            for q in procs:
                q.kill()
            raise RuntimeError(f"a decode rank failed (exit code {p.exitcode})")
    out_dir = Path(args[-1])
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def measure(config: VAEConfig, shape: tuple[int, ...], reps: int, cores: int) -> dict[str, Any]:
    """Single process vs 1 band vs 2 gloo ranks, the same latents and weights."""
    torch.set_num_threads(cores)
    vae, z = random_vae(config), _latents(shape)
    single_s, reference = _time(lambda: vae.decode(z), reps)
    one = Collectives(DeviceMesh(ParallelConfig(), num_heads=1))
    band_s, band_video = _time(lambda: decode_bands(vae, z, one), reps)
    rows = [
        {"variant": "single process", "ranks": 1, "threads_per_rank": cores, "seconds": single_s},
        {
            "variant": "split, 1 band",
            "ranks": 1,
            "threads_per_rank": cores,
            "seconds": band_s,
            "rel_error": _rel(band_video, reference),
        },
    ]
    with tempfile.TemporaryDirectory() as tmp:
        threads = max(1, cores // 2)
        ranks = _spawn(2, config, shape, reps, threads, tmp)
        video = torch.load(Path(tmp) / "video.pt")
    rows.append(
        {
            "variant": "split, 2 gloo ranks",
            "ranks": 2,
            "threads_per_rank": threads,
            # the request ends when the slowest rank does
            "seconds": [max(s) for s in zip(*(r["seconds"] for r in ranks), strict=True)],
            "rel_error": _rel(video, reference),
            "per_rank": ranks,
        }
    )
    for row in rows:
        row["median_s"] = statistics.median(row["seconds"])
    return {
        "config": {"dim": config.dim, "dim_mult": list(config.dim_mult), "res_blocks": config.num_res_blocks},
        "latents": list(shape),
        "video": list(reference.shape),
        "decoder_gflop": decoder_flops(config, shape)["total_flop"] / 1e9,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Arithmetic at real sizes (meta device: shapes only)
# ---------------------------------------------------------------------------------------------


class CountingSplit:
    """standin.vae.SpatialSplit for one band of `bands` on the meta device: counts what a middle
    band would send (one halo row to each side per spatial layer; its K/V band to N−1 ranks)."""

    def __init__(self, bands: RowBands, index: int) -> None:
        self.bands, self.index = bands, index
        self.halo_calls = self.halo_bytes = self.gather_calls = self.gather_bytes = 0

    def halo(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        self.halo_calls += 1
        self.halo_bytes += 2 * rows * x[..., :1, :].numel() * x.element_size()
        return F.pad(x, (0, 0, rows, rows))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        self.gather_calls += 1
        self.gather_bytes += (self.bands.bands - 1) * x.numel() * x.element_size()
        scale = x.shape[-2] // self.bands.sizes[self.index]
        return x.new_zeros(*x.shape[:-2], scale * self.bands.rows, x.shape[-1])


def _conv_macs(vae: WanVAE) -> tuple[Counter, list[Any]]:
    """Hooks adding each conv's MACs (output elements × input channels / groups × kernel volume)
    and the attention block's QKᵀ and PV MACs, per module name, over a decode."""
    macs: Counter = Counter()
    handles = []
    for name, m in vae.decoder.named_modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):

            def conv(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                macs[name] += out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)

            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, AttentionBlock):

            def attention(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                b, c, t, h, w = out.shape
                macs[name + ".attention"] += 2 * b * t * (h * w) ** 2 * c

            handles.append(m.register_forward_hook(attention))
    return macs, handles


def _stage(name: str) -> str:
    """decoder layer name → its stage (conv1, middle, upsamples.i, head)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "upsamples" else parts[0]


def decoder_flops(config: VAEConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """FLOPs (2 per MAC) of decoding latents `shape` [B, 16, T, h, w] with `config`, per stage,
    counted from the module shapes; torch's FlopCounterMode total beside it as a check."""
    with torch.device("meta"):
        vae = WanVAE(config)
    macs, handles = _conv_macs(vae)
    z = torch.empty(shape, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode_frames(z)
    for h in handles:
        h.remove()
    stages: Counter = Counter()
    for name, n in macs.items():
        stages[_stage(name)] += 2 * n
    return {
        "total_flop": 2 * sum(macs.values()),
        "flop_per_stage": dict(stages),
        "attention_flop": 2 * sum(n for k, n in macs.items() if k.endswith(".attention")),
        "torch_flop_counter": counter.get_total_flops(),
    }


def band_costs(config: VAEConfig, shape: tuple[int, ...], ranks: int) -> dict[str, Any]:
    """The tallest band of `ranks` (a middle one: two neighbours): its FLOPs, halo exchanges
    and bytes, K/V gather bytes, and the bytes of gathering the video bands (all fp32)."""
    bands = RowBands(shape[-2], ranks)
    index = 1 if ranks > 2 else 0  # the first bands are the tallest; band 1 has two neighbours
    start, stop = bands.bounds(index)
    split = CountingSplit(bands, index)
    with torch.device("meta"):
        vae = WanVAE(config)
    z = torch.empty(*shape[:-2], stop - start, shape[-1], device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        band = vae.decode_frames(z, split=split)
    return {
        "band_latent_rows": stop - start,
        "band_flop": counter.get_total_flops(),
        "halo_exchanges": split.halo_calls,
        "halo_bytes_sent": split.halo_bytes,
        "kv_gathers": split.gather_calls,
        "kv_gather_bytes_sent": split.gather_bytes,
        "video_gather_bytes_sent": (ranks - 1) * band.numel() * 4,
    }


def real_size_arithmetic(assumed: dict[str, Any], frames: int = REAL_FRAMES) -> list[dict[str, Any]]:
    ranks = assumed["ranks"]
    tflops = assumed["gpu_tflops"] * 1e12
    link = assumed["link_gbps"] * 1e9
    latency = assumed["latency_us_per_exchange"] * 1e-6
    dit_fast, dit_slow = assumed["dit_seconds_per_video"]
    tflops_range = assumed["gpu_tflops_range"]
    out = []
    for height, width in REAL_SIZES:
        shape = (1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
        full = decoder_flops(WAN21_VAE, shape)
        band = band_costs(WAN21_VAE, shape, ranks)
        one_gpu_s = full["total_flop"] / tflops
        comm_bytes = band["halo_bytes_sent"] + band["kv_gather_bytes_sent"] + band["video_gather_bytes_sent"]
        comm_s = comm_bytes / link + (band["halo_exchanges"] + band["kv_gathers"] + 1) * latency
        rank_s = band["band_flop"] / tflops + comm_s
        # A decoder shared by R replicas gets a video every (DiT time / R) seconds at most.
        budget_s = dit_fast / assumed["replicas_per_shared_decoder"]
        out.append(
            {
                "video": [frames, height, width],
                "latents": list(shape),
                **full,
                **band,
                "one_gpu_decode_s": one_gpu_s,
                "one_gpu_decode_s_range": [full["total_flop"] / (t * 1e12) for t in tflops_range],
                "rank_compute_s": band["band_flop"] / tflops,
                "rank_comm_s": comm_s,
                "parallel_decode_s": rank_s,
                "speedup": one_gpu_s / rank_s,
                "shared_decoder_budget_s": budget_s,
                "shared_decoder_utilisation": one_gpu_s / budget_s,
                "parallel_decode_share_of_video": [rank_s / (dit + rank_s) for dit in (dit_fast, dit_slow)],
            }
        )
    return out


def decide(sizes: list[dict[str, Any]], assumed: dict[str, Any]) -> str:
    r = assumed["replicas_per_shared_decoder"]
    worst = max(sizes, key=lambda s: s["one_gpu_decode_s"])
    lines = []
    for s in sizes:
        _, h, w = s["video"]
        lines.append(
            f"{h}x{w}: one GPU {s['one_gpu_decode_s']:.1f} s "
            f"({s['one_gpu_decode_s_range'][1]:.1f}-{s['one_gpu_decode_s_range'][0]:.1f} s at "
            f"{assumed['gpu_tflops_range'][1]:g}-{assumed['gpu_tflops_range'][0]:g} TFLOP/s), "
            f"{assumed['ranks']} ranks {s['parallel_decode_s']:.2f} s "
            f"({100 * s['parallel_decode_share_of_video'][0]:.1f}% of a video's time at the fastest DiT)"
        )
    if worst["shared_decoder_utilisation"] > 1:
        verdict = (
            f"decode on the DiT replica's ranks in parallel: one fp32 decoder shared by {r} replicas "
            f"would need {worst['one_gpu_decode_s']:.1f} s per video but gets one every "
            f"{worst['shared_decoder_budget_s']:.1f} s (utilisation "
            f"{worst['shared_decoder_utilisation']:.1f}: a bottleneck), while the split costs each "
            f"replica {worst['parallel_decode_s']:.2f} s per video"
        )
    else:
        verdict = (
            f"a shared decoder keeps up ({worst['shared_decoder_utilisation']:.2f} utilisation for "
            f"{r} replicas); decoding on the replica's ranks still cuts each video's latency by "
            f"{worst['one_gpu_decode_s'] - worst['parallel_decode_s']:.1f} s"
        )
    return verdict + ". " + "; ".join(lines)


# ---------------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    m = report["measured"]
    ax = axes[0]
    names = [r["variant"] for r in m["rows"]]
    times = [r["median_s"] for r in m["rows"]]
    bars = ax.bar(range(len(names)), times, color=["C0", "C1", "C2"])
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("decode wall time (s, median)")
    two = m["rows"][-1]["per_rank"]
    halo = max(r["bytes_sent"].get("neighbour_exchange", 0) for r in two)
    gather = max(r["bytes_sent"].get("all_gather", 0) for r in two)
    ax.bar_label(bars, [f"{t:.2f} s" for t in times], fontsize=8)
    ax.set_title(
        f"CPU, dim {m['config']['dim']}, latents {m['latents'][2:]}\n"
        f"2 ranks: halo {halo / 1e6:.1f} MB, gathers {gather / 1e6:.1f} MB sent per rank",
        fontsize=9,
    )
    ax = axes[1]
    sizes = report["real_sizes"]
    labels = [f"{s['video'][1]}x{s['video'][2]}" for s in sizes]
    x = range(len(sizes))
    ax.bar([i - 0.2 for i in x], [s["one_gpu_decode_s"] for s in sizes], 0.4, label="1 GPU")
    ax.bar([i + 0.2 for i in x], [s["parallel_decode_s"] for s in sizes], 0.4, label="8 ranks")
    a = report["assumed"]
    lo, hi = a["dit_seconds_per_video"]
    budget = lo / a["replicas_per_shared_decoder"]
    replicas = a["replicas_per_shared_decoder"]
    ax.axhline(budget, color="C3", ls="--", label=f"one video per {budget:.1f} s ({replicas} replicas)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel(f"seconds per {sizes[0]['video'][0]}-frame video (estimate)")
    title = f"Wan2.1 VAE decoder, fp32 at {a['gpu_tflops']:g} TFLOP/s (DiT {lo:g}-{hi:g} s/video)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_decode", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny VAE, small latents, 1 repetition; real sizes at 5 frames"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cores", type=int, default=2, help="CPU threads in all (each of 2 ranks gets half)")
    p.add_argument("--gpu-tflops", type=float, default=ASSUMED["gpu_tflops"])
    p.add_argument("--name", default="vae_decode_cpu")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = timestamp()
    config, shape, reps, frames = MEDIUM_VAE, (1, 16, 3, 20, 16), args.reps, REAL_FRAMES
    if args.quick:
        config, shape, reps, frames = TINY_VAE, (1, 16, 2, 3, 4), 1, 5
    measured = measure(config, shape, reps, args.cores)
    assumed = {**ASSUMED, "gpu_tflops": args.gpu_tflops}
    sizes = real_size_arithmetic(assumed, frames)
    report = {
        **result_header("vae_decode", started, "python -m benchmarks.vae_decode " + " ".join(argv)),
        "settings": {
            "timed_unit": "one WanVAE decode of the latents (fp32), median of repetitions after one warm-up; "
            "2 ranks: the slower rank per repetition",
            "reps": reps,
            "cores": args.cores,
        },
        "measured": measured,
        "assumed": assumed,
        "real_sizes": sizes,
        "decision": decide(sizes, assumed),
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    for row in measured["rows"]:
        print(f"{row['variant']:>22}: {row['median_s']:.3f} s  rel error {row.get('rel_error', 0.0):.1e}")
    print(report["decision"])
    return report


if __name__ == "__main__":
    main()
