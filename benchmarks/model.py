"""Model micro-benchmarks: the cost of the identity branch, and where a request's time goes.

    python -m benchmarks.model identity --presets tiny medium       # CPU
    python -m benchmarks.model identity --presets wan2.1-t2v-1.3b wan2.1-t2v-14b --device cuda
    python -m benchmarks.model breakdown                             # tiny pipeline, one request

**identity** times one DiT call (one CFG branch of one denoising step) in four variants, in one
process, interleaved (the order rotates every repetition, so drift in machine load hits all
variants alike):

- `wan`: the same DiT without identity (plain Wan2.1);
- `standin_cached`: Stand-In with the request's identity K/V cache built beforehand;
- `standin_uncached`: Stand-In rebuilding the identity K/V in every call, as an implementation
  without the cache does (the identity tokens go through every block each time; the
  pipeline's `denoise(reuse_identity_cache=False)` rebuilds once per step, shared by both CFG
  passes, i.e. half as often);
- `identity_build`: building the cache alone (once per request in the cached variant).

It reports medians and minima; overhead ratios against `wan`, the headline one being the median
of per-repetition ratios ("paired", which cancels load drift on a shared machine); the
per-request overhead of the cached variant at the preset's step count with CFG (2 calls per
step, one cache build); and FLOP counts with achieved TFLOP/s (benchmarks/flops.py). The paper
reports +2.3 % (cached) and +3.6 % (uncached) at 14B.

**breakdown** runs one tiny-preset request through the real stages — face preprocessing
(offline backend), text encoding, identity VAE encode, identity cache build, DiT steps, VAE
decode, MP4 encode — several times and plots the median as a stacked bar.

Weights are random (seeded); no checkpoint is needed. Results: benchmarks/results/<name>.json
and <name>.png, naming the machine, its load and every setting.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import pyplot, result_header, result_path, save_figure, timestamp, write_result
from benchmarks.flops import dit_forward_flops, tflops, token_counts
from standin.config import DiTConfig
from standin.presets import dit_preset

log = logging.getLogger("benchmarks.model")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FACE = REPO / "tests" / "data" / "faces" / "astronaut.jpg"


@dataclass(frozen=True)
class IdentityBench:
    """A DiT size and the token counts one call processes."""

    config: DiTConfig
    latent_shape: tuple[int, int, int, int]  # video latents [C, F, H, W]
    identity_shape: tuple[int, int, int, int]  # identity latents [C, 1, h, w]
    text_len: int
    steps: int  # denoising steps of a request (for the per-request overhead)
    note: str


# Real sizes: 832×480, 81 frames → latents 21×60×104 → 32,760 video tokens; a 512² face →
# 64×64 latent → 1,024 identity tokens (ratio 32 : 1); umT5 gives 512 text tokens.
_REAL = dict(latent_shape=(16, 21, 60, 104), identity_shape=(16, 1, 64, 64), text_len=512, steps=20)

IDENTITY_PRESETS: dict[str, IdentityBench] = {
    # Exactly what the tiny pipeline runs (128×128×17 video, 512² face): identity tokens
    # outnumber video tokens 1,024 : 320, so its overhead says nothing about real sizes.
    "tiny": IdentityBench(
        dit_preset("tiny"), (16, 5, 16, 16), (16, 1, 64, 64), 512, 8,
        "the tiny pipeline's own shapes: 320 video, 1,024 identity, 512 text tokens",
    ),
    # Wan-like proportions at a size two loaded CPU cores finish in about a second per call:
    # 512 video : 16 identity tokens is the real 32 : 1 ratio (32,760 : 1,024); LoRA rank is
    # 1/32 of dim as at 14B (128 / 5120 ≈ 1/40); FFN 3× dim (14B: 2.7×).
    "medium": IdentityBench(
        DiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=8, text_dim=512, freq_dim=256, lora_rank=16),
        (16, 2, 32, 32), (16, 1, 8, 8), 32, 20,
        "dim 512, 8 heads, 8 layers; 512 video : 16 identity tokens (the real 32 : 1), 32 text tokens",
    ),
    "wan2.1-t2v-1.3b": IdentityBench(
        dit_preset("wan2.1-t2v-1.3b"), **_REAL, note="real 1.3B size, 832×480×81, random weights"
    ),
    "wan2.1-t2v-14b": IdentityBench(
        dit_preset("wan2.1-t2v-14b"), **_REAL, note="real 14B size, 832×480×81, random weights"
    ),
}

VARIANTS = ("wan", "standin_cached", "standin_uncached", "identity_build")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_dit(config: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A seeded random WanDiT created directly on `device` in `dtype` (a 14B model never
    materialises in float32 on the host)."""
    from standin.dit import WanDiT

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device, _default_dtype(dtype):
            dit = WanDiT(config)
    return dit.eval().requires_grad_(False)


def run_identity(
    preset: str, reps: int, warmup: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Interleaved timings of the four variants for one preset."""
    bench = IDENTITY_PRESETS[preset]
    dit = build_dit(bench.config, device, dtype)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *bench.latent_shape, generator=g).to(device)
    identity = torch.randn(1, *bench.identity_shape, generator=g).to(device)
    context = torch.randn(1, bench.text_len, bench.config.text_dim, generator=g).to(device)
    t = torch.full((1,), 500.0, device=device)
    cache = dit.identity_cache(identity, latents.shape)

    calls: dict[str, Callable[[], object]] = {
        "wan": lambda: dit(latents, t, context, None),
        "standin_cached": lambda: dit(latents, t, context, cache),
        "standin_uncached": lambda: dit(latents, t, context, dit.identity_cache(identity, latents.shape)),
        "identity_build": lambda: dit.identity_cache(identity, latents.shape),
    }
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        for rep in range(warmup + reps):
            # Rotate the order so no variant always runs first (caches, turbo, neighbours).
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for name in order:
                elapsed = _timed(calls[name], device)
                if rep >= warmup:
                    samples[name].append(elapsed)
            log.debug("%s rep %d: %s", preset, rep, {k: v[-1] for k, v in samples.items() if v})

    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = {
        k: statistics.median(s / w for s, w in zip(samples[k], samples["wan"], strict=True))
        for k in ("standin_cached", "standin_uncached")
    }
    tokens = token_counts(bench.config, (1, *bench.latent_shape), (1, *bench.identity_shape), bench.text_len)
    flops = dit_forward_flops(bench.config, tokens)
    wan_flops = dit_forward_flops(bench.config, type(tokens)(tokens.video, 0, tokens.text)).forward
    calls_per_request = 2 * bench.steps  # CFG: positive and negative pass per step
    # Paired ratio per call plus the one cache build spread over the request's calls.
    request_cached = paired["standin_cached"] + med["identity_build"] / (calls_per_request * med["wan"])
    flop_of = {
        "wan": wan_flops,
        "standin_cached": flops.forward,
        "standin_uncached": flops.forward_uncached,
        "identity_build": flops.identity_build,
    }
    return {
        "preset": preset,
        "note": bench.note,
        "model": asdict(bench.config),
        "latent_shape": list(bench.latent_shape),
        "identity_shape": list(bench.identity_shape),
        "tokens": asdict(tokens),
        "samples_s": samples,
        "median_s": med,
        "min_s": {k: min(v) for k, v in samples.items()},
        "ratio_to_wan": {k: med[k] / med["wan"] for k in ("standin_cached", "standin_uncached")},
        "paired_ratio_to_wan": paired,
        "min_ratio_to_wan": {k: min(samples[k]) / min(samples["wan"]) for k in paired},
        "request_steps": bench.steps,
        "request_ratio_cached": request_cached,
        "flops": {**flops.as_dict(), "wan_forward": wan_flops},
        "achieved_tflops": {k: tflops(flop_of[k], med[k]) for k in VARIANTS},
    }


def identity_main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ]
    started = timestamp()
    results = []
    for preset in args.presets:
        reps = args.reps or (30 if preset == "tiny" else 15)
        log.info("identity overhead: %s, %d reps + %d warm-up, %s %s",
                 preset, reps, args.warmup, device, dtype)
        res = run_identity(preset, reps, args.warmup, device, dtype)
        results.append(res)
        _print_identity(res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        **result_header("identity_overhead", started, _command("identity", args)),
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "timed_unit": "one DiT call (one CFG branch of one step), batch 1, timestep 500",
            "order": "variants interleaved, order rotated every repetition",
        },
        "results": results,
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot_identity(report, path.with_suffix(".png"))
    return report


def _print_identity(res: dict[str, Any]) -> None:
    med, low, paired = res["median_s"], res["min_s"], res["paired_ratio_to_wan"]
    print(f"\n{res['preset']}  ({res['note']})")
    print(f"  {'variant':<17} {'median ms':>10} {'min ms':>10} {'TFLOP/s':>8}  paired ratio to wan")
    for k in VARIANTS:
        extra = f"  ×{paired[k]:.3f}" if k in paired else ""
        tf = res["achieved_tflops"][k]
        print(f"  {k:<17} {1000 * med[k]:10.2f} {1000 * low[k]:10.2f} {tf:8.3f}{extra}")
    print(f"  per request ({res['request_steps']} steps, CFG, one cache build): "
          f"×{res['request_ratio_cached']:.3f} of wan")


def plot_identity(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        names = ["wan", "standin_cached", "standin_uncached"]
        ms = [1000 * res["median_s"][k] for k in names]
        bars = ax.bar(["Wan2.1\n(no identity)", "Stand-In\ncached", "Stand-In\nuncached"], ms,
                      color=["#999999", "#2b7bba", "#e6550d"])
        for bar, k in zip(bars[1:], names[1:], strict=True):
            ax.annotate(f"{100 * (res['paired_ratio_to_wan'][k] - 1):+.1f}% (paired)",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        tok = res["tokens"]
        ax.set_title(f"{res['preset']}: {tok['video']} video / {tok['identity']} identity tokens", fontsize=9)
        ax.set_ylabel("median ms per DiT call")
        ax.set_ylim(0, max(ms) * 1.15)
    m = report["machine"]
    fig.suptitle(f"Identity overhead — {m.get('gpu') or m['cpu']}, torch {m.get('torch')}, "
                 f"{report['settings']['dtype']}", fontsize=10)
    return save_figure(fig, path)


def _command(subcommand: str, args: argparse.Namespace) -> str:
    return f"python -m benchmarks.model {subcommand} " + " ".join(args.argv)


# -- pipeline breakdown ------------------------------------------------------------------

STAGES = (
    "face_preprocess",
    "text_encode",
    "identity_vae_encode",
    "identity_cache_build",
    "dit_steps",
    "vae_decode",
    "mp4_encode",
)


def run_breakdown_once(pipeline: Any, face: Any, image_bytes: bytes, params: Any) -> dict[str, float]:
    """One request through every stage; seconds per stage."""
    from standin.pipeline import DenoiseInputs
    from standin.video import encode_mp4

    times: dict[str, float] = {}
    dev = pipeline.device

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        _sync(dev)
        start = time.perf_counter()
        out = fn()
        _sync(dev)
        times[name] = time.perf_counter() - start
        return out

    reference = stage("face_preprocess", lambda: face.process_bytes(image_bytes).to_array())
    ctx, neg = stage("text_encode", lambda: pipeline.encode_prompts(params.prompt, params.negative_prompt))
    identity = stage("identity_vae_encode", lambda: pipeline.encode_identity(reference))
    inputs = DenoiseInputs.for_request(params, ctx, neg, identity)
    # The real denoise loop builds the cache itself; time that call from inside it (the wrapper
    # lives on this benchmark's own pipeline object only) and count the rest as DiT steps.
    build_times: list[float] = []
    real_build = pipeline.dit.identity_cache

    def timed_build(*a: Any, **kw: Any) -> Any:
        _sync(dev)
        start = time.perf_counter()
        out = real_build(*a, **kw)
        _sync(dev)
        build_times.append(time.perf_counter() - start)
        return out

    pipeline.dit.identity_cache = timed_build
    try:
        latents = stage("dit_steps", lambda: pipeline.denoise(inputs))
    finally:
        del pipeline.dit.identity_cache
    times["identity_cache_build"] = sum(build_times)
    times["dit_steps"] -= times["identity_cache_build"]
    video = stage("vae_decode", lambda: pipeline.decode(latents))
    stage("mp4_encode", lambda: encode_mp4(video, fps=16))
    return {k: times[k] for k in STAGES}


def breakdown_main(args: argparse.Namespace) -> dict[str, Any]:
    from standin.face import FaceConfig, FacePreprocessor
    from standin.pipeline import GenerationParams, StandInPipeline

    started = timestamp()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    pipeline = StandInPipeline.from_preset(args.preset, device=device)
    face = FacePreprocessor(FaceConfig(backend="offline"))
    setup_s = time.perf_counter() - t0
    preset = pipeline.preset
    params = GenerationParams(
        prompt="a person walking on the beach at sunset",
        width=preset.width,
        height=preset.height,
        num_frames=args.num_frames or preset.num_frames,
        num_steps=args.steps or preset.num_steps,
        seed=0,
    )
    params.validate()
    image_bytes = Path(args.image).read_bytes()
    runs = []
    with torch.inference_mode():
        for i in range(args.warmup + args.reps):
            times = run_breakdown_once(pipeline, face, image_bytes, params)
            log.info("run %d%s: %.3f s", i, " (warm-up)" if i < args.warmup else "", sum(times.values()))
            if i >= args.warmup:
                runs.append(times)
    found = face.process_bytes(image_bytes).face  # recorded: the stage did find the face
    median = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    total = sum(median.values())
    report = {
        **result_header("pipeline_breakdown", started, _command("breakdown", args)),
        "settings": {
            "preset": args.preset,
            "device": str(device),
            "dtype": str(pipeline.dit.patch_embedding.weight.dtype).removeprefix("torch."),
            "image": str(Path(args.image).resolve().relative_to(REPO))
            if Path(args.image).resolve().is_relative_to(REPO) else str(args.image),
            "face_backend": "offline",
            "face_box": [round(v, 1) for v in (found.x1, found.y1, found.x2, found.y2)] if found else None,
            "torch_threads": torch.get_num_threads(),
            "width": params.width,
            "height": params.height,
            "num_frames": params.num_frames,
            "num_steps": params.num_steps,
            "guidance_scale": params.guidance_scale,
            "cfg_mode": params.cfg_mode,
            "reps": args.reps,
            "warmup": args.warmup,
        },
        "setup_s": setup_s,
        "runs_s": runs,
        "median_s": median,
        "median_total_s": total,
        "share": {k: median[k] / total for k in STAGES},
    }
    print(f"\npipeline breakdown ({args.preset}, {params.num_steps} steps, median of {args.reps}):")
    for k in STAGES:
        print(f"  {k:<21} {1000 * median[k]:9.1f} ms  {100 * median[k] / total:5.1f} %")
    print(f"  {'total':<21} {1000 * total:9.1f} ms")
    path = write_result(result_path(args.name, args.out_dir), report)
    plot_breakdown(report, path.with_suffix(".png"))
    return report


def plot_breakdown(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    bars = [("median", report["median_s"])] + [(f"run {i + 1}", r) for i, r in enumerate(report["runs_s"])]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(bars)))
    colors = plt.get_cmap("tab10").colors
    for y, (_, times) in enumerate(bars):
        left = 0.0
        for j, stage in enumerate(STAGES):
            ax.barh(y, 1000 * times[stage], left=left, color=colors[j], label=stage if y == 0 else None)
            left += 1000 * times[stage]
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    s, m = report["settings"], report["machine"]
    ax.set_title(f"One request, {s['preset']} preset ({s['width']}×{s['height']}×{s['num_frames']}, "
                 f"{s['num_steps']} steps) — {m.get('gpu') or m['cpu']}", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.02 * len(bars)))
    return save_figure(fig, path, bbox_inches="tight")


# -- CLI -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--warmup", type=int, default=1)
    common.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/")
    common.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives stable numbers on a shared machine)")
    common.add_argument("-v", "--verbose", action="store_true")

    ident = sub.add_parser("identity", parents=[common], help="identity-branch overhead per DiT call")
    ident.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(IDENTITY_PRESETS))
    ident.add_argument("--reps", type=int, default=None, help="default: 30 for tiny, 15 otherwise")
    ident.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                       help="default: bfloat16 on CUDA, float32 on CPU")
    ident.add_argument("--name", default="identity_overhead_cpu")

    brk = sub.add_parser("breakdown", parents=[common], help="time per stage of one request")
    brk.add_argument("--preset", default="tiny")
    brk.add_argument("--image", type=Path, default=DEFAULT_FACE)
    brk.add_argument("--steps", type=int, default=None, help="default: the preset's step count")
    brk.add_argument("--num-frames", type=int, default=None, help="default: the preset's (4k+1)")
    brk.add_argument("--reps", type=int, default=3)
    brk.add_argument("--name", default="pipeline_breakdown_tiny_cpu")
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "identity":
        return identity_main(args)
    return breakdown_main(args)


if __name__ == "__main__":
    main()
