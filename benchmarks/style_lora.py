"""Per-step cost of unmerged style LoRAs against no LoRA, and of the "pinned" (merged) mode.

    python -m benchmarks.style_lora                       # medium preset, CPU, float32
    python -m benchmarks.style_lora --preset wan2.1-t2v-14b --device cuda

Times one DiT call (one CFG branch of one denoising step, identity K/V cached, batch 1) for:

- `none`: no style;
- `attention_r{16,64,128}`: a style LoRA of that rank on every attention projection of every
  block (self- and cross-attention q, k, v, o), applied unmerged through the forward's adapter
  seam (`standin.styles.StyleSet`);
- `all_r{16,64,128}`: the same on every linear layer of every block (attention + FFN);
- `pinned_all_r128`: the largest set merged once into a private copy of the model
  (`standin.styles.pinned_model`), no adapters: what a replica dedicated to one style runs.

Variants run interleaved in one process, their order rotated every repetition; the headline is
the median of per-repetition ratios to `none` ("paired", which cancels load drift on a shared
machine). The LoRA's extra FLOPs are computed exactly (2·S·r·(in+out) per adapted layer) so the
measured overhead can be read against the arithmetic. Note the scale: the medium preset has dim
512, so rank 128 there is 25 % of the width; at Wan2.1-14B (dim 5120) rank 128 is 2.5 %, like
rank 13 here. Weights are random (seeded). Results: benchmarks/results/<name>.json and .png.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import pyplot, result_header, result_path, save_figure, timestamp, write_result
from benchmarks.model import IDENTITY_PRESETS, build_dit
from standin.styles import LayerDelta, StyleLoRA, StyleSet, pinned_model

log = logging.getLogger("benchmarks.style_lora")

RANKS = (16, 64, 128)
ATTENTION = tuple(f"{kind}.{p}" for kind in ("self_attn", "cross_attn") for p in "qkvo")
ALL_LINEAR = (*ATTENTION, "ffn.0", "ffn.2")
SETS = {"attention": ATTENTION, "all": ALL_LINEAR}
PINNED = "pinned_all_r128"


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def random_style(dit: Any, layers: tuple[str, ...], rank: int, seed: int) -> StyleLoRA:
    """A style of `rank` on `layers` of every block, random down and up (nothing is a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    p = dit.patch_embedding.weight
    modules = dict(dit.named_modules())
    deltas = {}
    for i in range(len(dit.blocks)):
        for layer in layers:
            name = f"blocks.{i}.{layer}"
            lin = modules[name]
            down = torch.randn(rank, lin.in_features, generator=gen) / lin.in_features**0.5
            up = torch.randn(lin.out_features, rank, generator=gen) * 0.01
            deltas[name] = LayerDelta(down.to(p.device, p.dtype), up.to(p.device, p.dtype), 1.0)
    return StyleLoRA(f"r{rank}", "synthetic", deltas)


def lora_flops(dit: Any, style: StyleLoRA, video_tokens: int, text_tokens: int) -> int:
    """Extra FLOPs of one call: 2·tokens·r·(in + out) per adapted layer (K/V of cross-attention
    see the text tokens, everything else the video tokens)."""
    modules = dict(dit.named_modules())
    total = 0
    for name, d in style.layers.items():
        lin = modules[name]
        tokens = text_tokens if name.endswith(("cross_attn.k", "cross_attn.v")) else video_tokens
        total += 2 * tokens * d.rank * (lin.in_features + lin.out_features)
    return total


def run(preset: str, reps: int, warmup: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    bench = IDENTITY_PRESETS[preset]
    dit = build_dit(bench.config, device, dtype)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *bench.latent_shape, generator=g).to(device, dtype)
    identity = torch.randn(1, *bench.identity_shape, generator=g).to(device, dtype)
    context = torch.randn(1, bench.text_len, bench.config.text_dim, generator=g).to(device, dtype)
    t = torch.full((1,), 500.0, device=device)
    video_tokens = bench.latent_shape[1] * bench.latent_shape[2] * bench.latent_shape[3] // 4

    styles: dict[str, StyleSet | None] = {"none": None}
    extra_flops: dict[str, int] = {"none": 0}
    for kind, layers in SETS.items():
        for rank in RANKS:
            style = random_style(dit, layers, rank, seed=rank)
            styles[f"{kind}_r{rank}"] = StyleSet([(style, 1.0)])
            extra_flops[f"{kind}_r{rank}"] = lora_flops(dit, style, video_tokens, bench.text_len)
    with torch.inference_mode():
        pinned = pinned_model(dit, styles["all_r128"])
        caches = {name: dit.identity_cache(identity, latents.shape, adapters=s) for name, s in styles.items()}
        caches[PINNED] = pinned.identity_cache(identity, latents.shape)
    calls = {
        name: (lambda n=name, s=s: dit(latents, t, context, caches[n], adapters=s))
        for name, s in styles.items()
    }
    calls[PINNED] = lambda: pinned(latents, t, context, caches[PINNED])
    extra_flops[PINNED] = 0
    variants = list(calls)

    samples: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for rep in range(warmup + reps):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for name in order:
                elapsed = _timed(calls[name], device)
                if rep >= warmup:
                    samples[name].append(elapsed)
            log.info("rep %d/%d", rep + 1, warmup + reps)
        # the pinned copy must give what the unmerged set gives (fp32: rounding only)
        a, b = calls["all_r128"](), calls[PINNED]()
        pinned_err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = {
        k: statistics.median(s / n for s, n in zip(samples[k], samples["none"], strict=True))
        for k in variants
        if k != "none"
    }
    from benchmarks.flops import dit_forward_flops, token_counts

    tokens = token_counts(bench.config, (1, *bench.latent_shape), (1, *bench.identity_shape), bench.text_len)
    base_flops = dit_forward_flops(bench.config, tokens).forward
    return {
        "preset": preset,
        "note": bench.note,
        "video_tokens": video_tokens,
        "text_tokens": bench.text_len,
        "samples_s": samples,
        "median_s": med,
        "paired_ratio_to_none": paired,
        "median_ratio_to_none": {k: med[k] / med["none"] for k in paired},
        "base_forward_flops": base_flops,
        "lora_extra_flops": extra_flops,
        "lora_flop_ratio": {k: v / base_flops for k, v in extra_flops.items()},
        "pinned_vs_unmerged_max_rel_err": pinned_err,
    }


def plot(report: dict[str, Any], path: Any) -> None:
    plt = pyplot()
    res = report["results"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [f"{k}_r{r}" for k in SETS for r in RANKS] + [PINNED]
    pct = [100 * (res["median_ratio_to_none"][n] - 1) for n in names]
    paired = [100 * (res["paired_ratio_to_none"][n] - 1) for n in names]
    flop = [100 * res["lora_flop_ratio"][n] for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], pct, width=0.4, label="measured (ratio of medians)", color="#2b7bba")
    ax.plot([i - 0.2 for i in x], paired, "k.", label="measured (median of paired ratios)")
    ax.bar([i + 0.2 for i in x], flop, width=0.4, label="extra FLOPs", color="#bbbbbb")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("% over no LoRA, per DiT call")
    ax.legend(fontsize=8)
    m, s = report["machine"], report["settings"]
    ax.set_title(
        f"Unmerged style LoRAs — {res['preset']} ({res['video_tokens']} video tokens), "
        f"{m.get('gpu') or m['cpu']}, {s['dtype']}",
        fontsize=9,
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.style_lora", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="medium", choices=sorted(IDENTITY_PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--name", help="result file stem (default: style_lora_<preset>_<device type>)")
    p.add_argument("--out-dir", type=lambda s: __import__("pathlib").Path(s))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ]
    started = timestamp()
    res = run(args.preset, args.reps, args.warmup, device, dtype)
    report = {
        **result_header("style_lora_overhead", started, "python -m benchmarks.style_lora " + " ".join(argv)),
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "reps": args.reps,
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "timed_unit": "one DiT call (one CFG branch of one step), batch 1, identity K/V cached",
            "order": "variants interleaved, order rotated every repetition",
        },
        "results": res,
    }
    name = args.name or f"style_lora_{args.preset}_{device.type}"
    path = write_result(result_path(name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    print(f"\n{args.preset}: median ms per call; overhead vs no LoRA (medians, paired); extra FLOPs")
    print(f"  {'none':<18} {1000 * res['median_s']['none']:9.1f}")
    for k, ratio in res["paired_ratio_to_none"].items():
        by_median = res["median_ratio_to_none"][k]
        print(
            f"  {k:<18} {1000 * res['median_s'][k]:9.1f}  {100 * (by_median - 1):+6.1f} %"
            f"  {100 * (ratio - 1):+6.1f} %  FLOPs {100 * res['lora_flop_ratio'][k]:+5.1f} %"
        )
    print(f"  pinned vs unmerged max relative difference: {res['pinned_vs_unmerged_max_rel_err']:.1e}")
    return report


if __name__ == "__main__":
    main()
