"""Step caching on the trained tiny model: speed against quality for several thresholds.

    python -m benchmarks.step_cache --threads 1

Each held-out identity of standin/training/quality.py (its prompt and reference) is one request
(batch 1, CFG 3.0, the same seed) sampled without a cache and with the first-block cache
(standin/step_cache.py) at every threshold, interleaved per repetition in one process. Per
threshold: DiT calls that skipped blocks 1..N−1, wall time of the denoising loop (median over
repetitions of the sum over requests) and its ratio to the uncached loop, PSNR of the decoded
frames against the uncached video of the same request, and the held-out top-1 colour retrieval
(the video's foreground colours matched against every reference). JSON + PNG under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import pyplot, result_header, result_path, save_figure, timestamp, write_result
from standin.pipeline import WAN_NEGATIVE_PROMPT, DenoiseInputs, StandInPipeline
from standin.scheduler import FlowMatchSchedule
from standin.step_cache import StepCache
from standin.training.quality import retrieval_accuracy
from standin.training.tiny_recipe import synthetic_clips, tiny_identities
from standin.video import to_uint8_frames

THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


class _FullCalls:
    """Counts DiT calls that ran block 1 (a skipped call stops after block 0)."""

    def __init__(self, pipe: StandInPipeline) -> None:
        self.count = 0
        pipe.dit.blocks[1].register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.count += 1


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR (dB) of uint8 videos; None when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run(identities: int, steps: int, reps: int, guidance: float, thresholds: tuple[float, ...]) -> dict:
    pipe = StandInPipeline.from_preset("tiny", device="cpu")
    p = pipe.preset
    _, held_out = tiny_identities()
    clips = synthetic_clips(held_out[:identities], 1, p, seed=7)
    refs = [c.reference for c in clips]
    shape = (1, 16, (p.num_frames - 1) // 4 + 1, p.height // 8, p.width // 8)
    neg = pipe.text_encoder.encode_prompts([WAN_NEGATIVE_PROMPT]).to(pipe.device)
    requests = []
    for i, clip in enumerate(clips):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))
        requests.append(
            DenoiseInputs(
                noise=noise,
                context=pipe.text_encoder.encode_prompts([clip.prompt]).to(pipe.device),
                negative_context=neg,
                identity_latents=pipe.encode_identity(clip.reference),
                schedule=FlowMatchSchedule(steps),
                guidance_scale=guidance,
            )
        )
    variants: list[float | None] = [None, *thresholds]
    counter = _FullCalls(pipe)
    seconds: dict[str, list[float]] = {_key(v): [] for v in variants}
    full_calls: dict[str, int] = {}
    latents: dict[str, list[torch.Tensor]] = {}
    for rep in range(reps + 1):  # repetition 0 warms up and is not timed
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for v in order:
            cache = None if v is None else StepCache("first_block", v)
            counter.count = 0
            start = time.perf_counter()
            out = [pipe.denoise(_with_cache(r, cache)) for r in requests]
            elapsed = time.perf_counter() - start
            if rep == 0:
                full_calls[_key(v)] = counter.count
                latents[_key(v)] = out
            else:
                seconds[_key(v)].append(elapsed)
    videos = {k: [to_uint8_frames(pipe.decode(x)) for x in xs] for k, xs in latents.items()}
    calls = 2 * steps * len(requests)
    layers = pipe.dit.config.num_layers
    base_s = statistics.median(seconds["off"])
    base_min = min(seconds["off"])
    truth = list(range(len(clips)))
    rows = []
    for v in variants:
        k = _key(v)
        ps = [psnr(a, b) for a, b in zip(videos[k], videos["off"], strict=True)]
        finite = [x for x in ps if x is not None]
        median_s = statistics.median(seconds[k])
        rows.append(
            {
                "threshold": v,
                "dit_calls": calls,
                "skipped_calls": calls - full_calls[k],
                "skipped_fraction": (calls - full_calls[k]) / calls,
                # blocks not run: a skipped call still runs block 0 (the tiny DiT has 2 blocks)
                "blocks_skipped_fraction": (calls - full_calls[k]) * (layers - 1) / (calls * layers),
                "denoise_s_median": median_s,
                "denoise_s": seconds[k],
                "speedup": base_s / median_s,
                "speedup_of_fastest": base_min / min(seconds[k]),
                "psnr_db_mean": statistics.mean(finite) if finite else None,
                "psnr_db_min": min(finite) if finite else None,
                "identical_videos": sum(x is None for x in ps),
                "top1_retrieval": retrieval_accuracy(np.stack(videos[k]), clips, refs, truth),
            }
        )
    return {
        "num_layers": layers,
        "requests": len(requests),
        "rows": rows,
        "chance": 1 / len(clips),
    }


def _key(v: float | None) -> str:
    return "off" if v is None else f"{v:g}"


def _with_cache(inputs: DenoiseInputs, cache: StepCache | None) -> DenoiseInputs:
    from dataclasses import replace

    return replace(inputs, cache=cache)


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    rows = [r for r in report["results"]["rows"] if r["threshold"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    th = [r["threshold"] for r in rows]
    ax = axes[0]
    ax.plot(th, [r["speedup"] for r in rows], "o-", label="wall-time speedup (medians)")
    ax.plot(th, [r["speedup_of_fastest"] for r in rows], "^-", label="wall-time speedup (fastest runs)")
    ideal_14b = [1 / (1 - r["skipped_fraction"] * 39 / 40) for r in rows]
    ax.plot(th, ideal_14b, "s--", label="blocks-run ratio if it had 40 blocks (14B)")
    ax.set_xlabel("threshold (relative L1 of block-0 residual)")
    ax.set_ylabel("× vs uncached")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    psnr_db = [r["psnr_db_mean"] or float("nan") for r in rows]  # NaN: identical to uncached
    ax.plot(th, psnr_db, "o-", color="C2", label="PSNR vs uncached (dB)")
    ax.set_xlabel("threshold")
    ax.set_ylabel("PSNR (dB)")
    ax2 = ax.twinx()
    ax2.plot(th, [r["top1_retrieval"] for r in rows], "s--", color="C3", label="top-1 retrieval")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("held-out top-1 retrieval")
    ax.legend(loc="lower left")
    ax2.legend(loc="upper right")
    ax.grid(alpha=0.3)
    s = report["settings"]
    fig.suptitle(
        f"first-block cache, tiny preset, {s['requests']} held-out identities, {s['steps']} steps, CFG"
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_cache", description=__doc__.split("\n")[0])
    p.add_argument("--identities", type=int, default=16, help="held-out identities (one request each)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--thresholds", type=lambda s: tuple(float(x) for x in s.split(",")), default=THRESHOLDS)
    p.add_argument("--name", default="step_cache_tiny_cpu")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = timestamp()
    res = run(args.identities, args.steps, args.reps, args.guidance, args.thresholds)
    report = {
        **result_header("step_cache", started, "python -m benchmarks.step_cache " + " ".join(argv)),
        "settings": {
            "preset": "tiny",
            "requests": res["requests"],
            "steps": args.steps,
            "guidance": args.guidance,
            "reps": args.reps,
            "torch_threads": torch.get_num_threads(),
            "timed_unit": "the denoising loops of every request (batch 1, CFG as two passes), summed",
            "order": "variants interleaved, order rotated every repetition; repetition 0 untimed",
            "quality": "PSNR of decoded uint8 frames vs the uncached video; top-1 colour retrieval "
            "as standin/training/quality.py",
        },
        "results": res,
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    print(f"{'threshold':>9} {'skipped':>9} {'speedup':>8} {'fastest':>8} {'PSNR dB':>8} {'top-1':>6}")
    for r in res["rows"]:
        psnr_text = "exact" if r["psnr_db_mean"] is None else f"{r['psnr_db_mean']:.1f}"
        print(
            f"{_key(r['threshold']):>9} {r['skipped_calls']:>4}/{r['dit_calls']:<4} {r['speedup']:8.2f} "
            f"{r['speedup_of_fastest']:8.2f} "
            f"{psnr_text:>8} {r['top1_retrieval']:6.2f}"
        )
    return report


if __name__ == "__main__":
    main()
