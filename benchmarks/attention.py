"""Attention backends and the identity block on CPU, side by side in one run.

    python -m benchmarks.attention            # ≈ 2–3 min on 2 cores

Wan-like shapes scaled down (12 heads × 128, video tokens 1k–3k, identity tokens one latent frame
of 21 = tokens/21), fp32 and bf16. Per shape, interleaved in every repetition (order rotated):
each backend's plain call that runs on this machine (standin/attention/), and the identity block
as `restricted_attention` does it: concatenated to the video K/V (one call) or split-KV (two LSE
calls merged exactly). Medians over repetitions, ratios to the "auto" choice and split/concat.
The JSON also holds the traffic arithmetic of the real case (Wan 14B 480p on 8 GPUs), so a
reader sees when split-KV would pay. JSON + PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import pyplot, result_header, result_path, save_figure, timestamp, write_result
from standin.attention import BACKENDS, attention_with_lse, merge, restricted_attention, select_backend

TOKENS = (1024, 2048, 3072)
FRAMES = 21  # latent frames of an 81-frame Wan video; the identity is one frame's worth of tokens
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _variants(tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=g).to(dtype) for _ in range(3))
    s_id = tokens // FRAMES
    identity = tuple(torch.randn(1, s_id, heads, head_dim, generator=g).to(dtype) for _ in range(2))
    out: dict[str, Callable[[], Any]] = {}
    for name, backend in BACKENDS.items():
        if backend.refuses(q) is None:
            out[f"backend:{name}"] = lambda b=backend: b.plain(q, k, v)
    out["identity:concat"] = lambda: restricted_attention(q, k, v, identity, split_kv=False)
    out["identity:split"] = lambda: restricted_attention(q, k, v, identity, split_kv=True)
    # the two paths' own overheads, alone: the concatenation copy, and the merge of two blocks
    video, ident = attention_with_lse(q, k, v), attention_with_lse(q, *identity)
    k_id, v_id = identity
    out["overhead:concat_copy"] = lambda: (torch.cat([k, k_id], dim=1), torch.cat([v, v_id], dim=1))
    out["overhead:merge"] = lambda: merge(video, ident)[0].to(dtype)
    return out


def measure(tokens: int, heads: int, head_dim: int, dtype_name: str, reps: int) -> dict[str, Any]:
    """One shape: every variant once untimed, then `reps` interleaved rounds; medians and ratios."""
    dtype = DTYPES[dtype_name]
    variants = _variants(tokens, heads, head_dim, dtype)
    names = list(variants)
    for name in names:
        variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(_timed(variants[name]))
    median = {n: statistics.median(s) for n, s in samples.items()}
    auto = select_backend(torch.empty(1, 1, heads, head_dim, dtype=dtype))
    backends = {n.split(":", 1)[1]: t for n, t in median.items() if n.startswith("backend:")}
    row = {
        "dtype": dtype_name,
        "video_tokens": tokens,
        "identity_tokens": tokens // FRAMES,
        "auto": auto,
        "backend_s": backends,
        "backend_over_auto": {n: t / backends[auto] for n, t in backends.items()},
        "identity_concat_s": median["identity:concat"],
        "identity_split_s": median["identity:split"],
        "split_over_concat": median["identity:split"] / median["identity:concat"],
        "concat_copy_s": median["overhead:concat_copy"],
        "merge_s": median["overhead:merge"],
        "samples_s": samples,
    }
    log.info("%s %5d tokens: %s", dtype_name, tokens, _line(row))
    return row


def _line(row: dict[str, Any]) -> str:
    ratio = row["backend_over_auto"]
    backends = " ".join(f"{n}={t:.3f}s(×{ratio[n]:.2f})" for n, t in row["backend_s"].items())
    return (
        f"{backends} | concat={row['identity_concat_s']:.3f}s split×{row['split_over_concat']:.3f} "
        f"(copy {row['concat_copy_s'] * 1e3:.1f} ms, merge {row['merge_s'] * 1e3:.1f} ms)"
    )


def real_case(
    video_tokens: int = 32760, identity_tokens: int = 1560, heads: int = 40, head_dim: int = 128,
    gpus: int = 8, layers: int = 40, passes: int = 2, dtype_bytes: int = 2,
) -> dict[str, Any]:
    """Bytes moved per denoising step and GPU by the identity block: concat vs split-KV merge.

    Ulysses over the GPUs: each rank attends all S video queries on h = heads/gpus heads. Bytes
    per call, with e = S·h·D elements (one video-sized Q, K, V or output on one rank), b = 2:
    - concat: read and write video K and V plus the identity's: 4b·(S + S_id)·h·D;
    - split as implemented: the second call reads Q and writes its output (2b·e), both outputs
      cast to float32 (2b + 8)·e, the lerp reads two and writes one float32 output (12·e), the
      cast back (4 + b)·e: (5b + 24)·e;
    - split with an ideal fused merge in bf16 (second call 2b·e, read both outputs, write one):
      5b·e;
    - split with a kernel that starts from the previous block's (out, lse) (flash-attn's API
      offers none): re-read Q and the running output, write it: 3b·e.
    Split pays only when its bytes are below concat's; for reference, the attention FLOPs of the
    same calls at an achieved 600 TFLOP/s.
    """
    h = heads // gpus
    unit = video_tokens * h * head_dim * dtype_bytes
    calls = layers * passes
    per_call = {
        "concat_copy": 4 * (video_tokens + identity_tokens) * h * head_dim * dtype_bytes,
        "split_as_implemented": (5 * dtype_bytes + 24) * video_tokens * h * head_dim,
        "split_fused_bf16_merge": 5 * unit,
        "split_accumulating_kernel": 3 * unit,
    }
    return {
        "model": "Wan2.1 14B, 480p (832×480, 81 frames), bf16, Ulysses over the GPUs",
        "video_tokens": video_tokens,
        "identity_tokens": identity_tokens,
        "heads_per_gpu": h,
        "head_dim": head_dim,
        "gpus": gpus,
        "attention_calls_per_step": calls,
        "bytes_per_call_per_gpu": per_call,
        "gb_per_step_per_gpu": {k: v * calls / 1e9 for k, v in per_call.items()},
        "ms_per_step_at_4_tb_s": {k: v * calls / 4e12 * 1e3 for k, v in per_call.items()},
        "attention_ms_per_step_at_600_tflops": 4 * video_tokens * (video_tokens + identity_tokens) * h
        * head_dim * calls / 600e12 * 1e3,
        "concat_transient_memory_mb": 2 * (video_tokens + identity_tokens) * h * head_dim * dtype_bytes / 1e6,
        "split_pays_when": "split bytes < concat bytes: 5·S < 4·(S + S_id) (fused merge), i.e. S_id > S/4; "
        "3·S < 4·(S + S_id) (accumulating kernel), always",
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["rows"]
    styles = {"fp32": "-", "bf16": "--"}
    for dtype, style in styles.items():
        mine = [r for r in rows if r["dtype"] == dtype]
        if not mine:
            continue
        x = [r["video_tokens"] for r in mine]
        for i, name in enumerate(mine[0]["backend_s"]):
            left.plot(x, [r["backend_s"][name] for r in mine], style, marker="o", color=f"C{i}",
                      label=f"{name} ({dtype})")
        right.plot(x, [r["split_over_concat"] for r in mine], style, marker="o", color="C0",
                   label=f"split-KV / concat ({dtype})")
    left.set(xlabel="video tokens (12 heads × 128)", ylabel="seconds per call (median)", yscale="log",
             title="attention backends on CPU")
    left.legend(fontsize=7)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="video tokens (identity = tokens/21)", ylabel="time ratio",
              title="identity block: split-KV LSE merge vs concatenation")
    right.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=TOKENS)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=tuple(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--name", default="attention_cpu")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = timestamp()
    rows = [measure(t, args.heads, args.head_dim, d, args.reps) for d in args.dtypes for t in args.tokens]
    report = {
        **result_header("attention", started, "python -m benchmarks.attention " + " ".join(argv)),
        "settings": {
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": 1,
            "identity_tokens": f"video tokens // {FRAMES}",
            "reps": args.reps,
            "torch_threads": torch.get_num_threads(),
            "order": "every variant once untimed, then reps rounds with the order rotated each round",
            "timed_unit": "one call: a backend's plain kernel, or restricted_attention with the identity",
        },
        "rows": rows,
        "real_case": real_case(),
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    for row in rows:
        print(f"{row['dtype']} {row['video_tokens']:>5}: {_line(row)}")
    return report


if __name__ == "__main__":
    main()
