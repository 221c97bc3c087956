"""Compiled blocks on CPU: eager vs `compiled_blocks()` step time, compile time, fp32 and bf16, and
gated vs ungated sequence parallelism (2 gloo ranks), side by side in one run.

    python -m benchmarks.compile_blocks

One "step" is one DiT forward (one CFG branch) with a cached identity, as the runner does it.
Single process (one thread, like each rank): eager and compiled, fp32 and bf16
(`WanDiT.to_inference_dtype`), timed interleaved (order rotated every repetition), medians; the
compile time is the first call of the compiled identity cache + forward, minus an eager one.
Inductor's caches start empty (a fresh TORCHINDUCTOR_CACHE_DIR): a cold replica start. Two ranks
(one thread each): the four combinations of eager/compiled × gated/ungated collectives,
interleaved; per-forward agreement all-reduces from `CommStats`, and a 2-step SPRunner request
per mode for the agreements of a whole step (CFG: two forwards + the runner's end-of-step
agreement). On a shared 2-core machine absolute times are noisy: the ratios are the result, the
load average is recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    load_average,
    pyplot,
    result_header,
    result_path,
    save_figure,
    timestamp,
    write_result,
)
from parallel.rendezvous import free_port
from standin.config import DiTConfig
from standin.dit import WanDiT
from standin.forward_plan import ForwardPlan, compiled_blocks

log = logging.getLogger("compile_blocks")

# Wan-like proportions, larger than tiny, small enough for 2 CPU cores: 576 video tokens,
# 64 identity tokens, 4 heads (Ulysses 2 leaves 2 per rank), 4 blocks.
CONFIG = DiTConfig(dim=256, ffn_dim=768, num_heads=4, num_layers=4, text_dim=128, freq_dim=64, lora_rank=16)
LATENTS = (1, 16, 3, 24, 32)  # token grid 3 × 12 × 16
FACE = (1, 16, 1, 16, 16)  # 8 × 8 identity tokens
TEXT_LEN = 32
SP_MODES = ("eager gated", "eager ungated", "compiled gated", "compiled ungated")


def _model(dtype: torch.dtype) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (LoRA up too): no path is a no-op
            p.copy_(torch.randn_like(p) * 0.05)
    return model.to_inference_dtype(dtype)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENTS, generator=g)
    context = torch.randn(1, TEXT_LEN, CONFIG.text_dim, generator=g)
    return latents, torch.tensor([500.0]), context, torch.randn(FACE, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- single process ------------------------------------------------------------------------------


def single_process(reps: int) -> dict[str, Any]:
    """Eager and compiled step times for fp32 and bf16; compile (first-call) times."""
    latents, t, ctx, face = _inputs()
    base = _model(torch.float32)
    models = {"fp32": base, "bf16": copy.deepcopy(base).to_inference_dtype(torch.bfloat16)}
    variants: dict[str, Callable[[], torch.Tensor]] = {}
    first_call: dict[str, dict[str, float]] = {}
    errors: dict[str, float] = {}
    with torch.no_grad():
        for dtype, model in models.items():
            eager_cache, eager_cache_s = _timed(lambda m=model: m.identity_cache(face, latents.shape))
            eager_out, eager_s = _timed(lambda m=model, c=eager_cache: m(latents, t, ctx, c))
            plan = ForwardPlan(run_block=compiled_blocks())
            cache, cache_s = _timed(lambda m=model, p=plan: m.identity_cache(face, latents.shape, plan=p))
            out, forward_s = _timed(lambda m=model, c=cache, p=plan: m(latents, t, ctx, c, plan=p))
            first_call[dtype] = {
                "identity_cache_s": cache_s,
                "forward_s": forward_s,
                # what compiling added to the first request: its first calls minus eager ones
                "compile_s": cache_s + forward_s - eager_cache_s - eager_s,
            }
            errors[f"compiled vs eager {dtype}"] = _rel(out, eager_out)
            variants[f"eager {dtype}"] = lambda m=model, c=eager_cache: m(latents, t, ctx, c)
            variants[f"compiled {dtype}"] = lambda m=model, c=cache, p=plan: m(latents, t, ctx, c, plan=p)
        errors["eager bf16 vs eager fp32"] = _rel(variants["eager bf16"](), variants["eager fp32"]())
    step_s = _interleaved(variants, reps)
    med = {k: statistics.median(v) for k, v in step_s.items()}
    return {
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "step_s_median": med,
        "first_call": first_call,
        "rel_errors": errors,
        "ratios": {
            "eager/compiled fp32": med["eager fp32"] / med["compiled fp32"],
            "eager/compiled bf16": med["eager bf16"] / med["compiled bf16"],
            "eager fp32/eager bf16": med["eager fp32"] / med["eager bf16"],
            "eager fp32/compiled bf16": med["eager fp32"] / med["compiled bf16"],
        },
    }


def _interleaved(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Time every variant once per repetition, the order rotated each time (load drifts)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                times[name].append(_timed(variants[name])[1])
    return times


# -- two ranks -----------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_method: str, reps: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the two cores
    try:
        result = _sp_rank(rank, world, init_method, reps)
    except BaseException as exc:  # the parent reports it; the other rank then times out
        log.exception("rank %d failed", rank)
        result = {"crash": f"{type(exc).__name__}: {exc}"}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no process-group teardown: a crashed peer would hang it


def _sp_rank(rank: int, world: int, init_method: str, reps: int) -> dict[str, Any]:
    from parallel import (
        Collectives,
        DenoiseRequest,
        DeviceMesh,
        ParallelConfig,
        ShardedDiT,
        SPRunner,
        init_distributed,
    )
    from standin.warmup import warm_up

    init_distributed(rank, world, init_method)
    model = _model(torch.float32)
    latents, t, ctx, face = _inputs()
    mesh = DeviceMesh(ParallelConfig(ulysses=world), CONFIG.num_heads)
    run_block = compiled_blocks()
    comms = {mode: Collectives(mesh, gated=mode.endswith(" gated")) for mode in SP_MODES}
    blocks = {m: run_block if m.startswith("compiled") else None for m in SP_MODES}
    dits = {m: ShardedDiT(model, c, blocks[m]) for m, c in comms.items()}
    warm_up_s = warm_up(model, dits["compiled ungated"].plan)  # what a replica runs at start
    caches = {m: d.identity_cache(face, latents.shape) for m, d in dits.items()}
    outs = {m: d(latents, t, ctx, caches[m]) for m, d in dits.items()}  # first calls, untimed
    agreements = {}
    for mode, comm in comms.items():
        comm.stats.reset()
        dits[mode](latents, t, ctx, caches[mode])
        agreements[mode] = comm.stats.calls["agree"]
    variants = {m: (lambda d=d, c=caches[m]: d(latents, t, ctx, c)) for m, d in dits.items()}
    step_s = _interleaved(variants, reps)
    runner_agreements = {}
    for mode in ("eager gated", "compiled ungated"):
        comm = comms[mode]
        runner = SPRunner(model, comm, run_block=run_block if mode.startswith("compiled") else None)
        comm.stats.reset()
        if rank == 0:
            request = DenoiseRequest(
                latents=latents, context=ctx, negative_context=ctx.flip(1), identity_latents=face,
                num_steps=2, guidance=3.0,
            )  # fmt: skip
            runner.generate(request)
            runner.shutdown()
        else:
            runner.serve_forever()
        runner_agreements[mode] = comm.stats.calls["agree"]
    return {
        "warm_up_s": warm_up_s,
        "step_s": step_s,
        "forward_agreements": agreements,
        "runner_agreements_2_steps": runner_agreements,
        "rel_error_compiled_vs_eager": _rel(outs["compiled ungated"], outs["eager gated"]),
    }


def two_ranks(reps: int, deadline_s: float) -> dict[str, Any]:
    """Spawn 2 gloo ranks; per step the slower rank's time (the step ends when it does)."""
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, 2, init_method, reps, tmp)) for r in range(2)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        paths = [Path(tmp, f"rank{r}.json") for r in range(2)]
        ranks = [json.loads(p.read_text()) if p.exists() else {"crash": "no result (hung?)"} for p in paths]
    crashed = [r for r in ranks if "crash" in r]
    if crashed:
        raise RuntimeError(f"a rank failed: {crashed}")
    per_step = {m: [max(r["step_s"][m][i] for r in ranks) for i in range(reps)] for m in SP_MODES}
    med = {m: statistics.median(v) for m, v in per_step.items()}
    agreements = ranks[0]["runner_agreements_2_steps"]
    return {
        "threads_per_rank": 1,
        "mesh": "ulysses=2",
        "step_s": per_step,
        "step_s_median": med,
        "warm_up_s": [r["warm_up_s"] for r in ranks],
        "forward_agreements": ranks[0]["forward_agreements"],
        # the request's setup agreement excluded: what one CFG step costs in agreements
        "agreements_per_step": {m: (n - 1) / 2 for m, n in agreements.items()},
        "rel_error_compiled_ungated_vs_eager_gated": max(r["rel_error_compiled_vs_eager"] for r in ranks),
        "ratios": {
            "eager gated/eager ungated": med["eager gated"] / med["eager ungated"],
            "compiled gated/compiled ungated": med["compiled gated"] / med["compiled ungated"],
            "eager gated/compiled ungated": med["eager gated"] / med["compiled ungated"],
        },
    }


# -- report --------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    single, sp = report["results"]["single_process"], report["results"]["two_ranks"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [4, 4, 2]})
    for ax, part, title in (
        (axes[0], single, f"1 process, {single['threads']} thread(s)"),
        (axes[1], sp, "2 gloo ranks (Ulysses 2), 1 thread each"),
    ):
        names = list(part["step_s_median"])
        ms = [1000 * part["step_s_median"][n] for n in names]
        bars = ax.bar(range(len(names)), ms, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names])
        ax.set_ylabel("step time, median (ms)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    compile_s = [single["first_call"][d]["compile_s"] for d in ("fp32", "bf16")]
    bars = ax.bar(["fp32", "bf16", "SP rank\nwarm-up"], [*compile_s, max(sp["warm_up_s"])], color="C7")
    ax.bar_label(bars, fmt="%.0f s")
    ax.set_ylabel("seconds")
    ax.set_title("compile (cold caches)")
    load = report["settings"]["load_average_before"]
    fig.suptitle(
        f"compiled DiT blocks on CPU: {CONFIG.num_layers} blocks, dim {CONFIG.dim}, 576 video tokens "
        f"(load average before: {load})"
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    description = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_blocks", description=description)
    p.add_argument("--reps", type=int, default=7, help="timed steps per variant (single process)")
    p.add_argument("--sp-reps", type=int, default=10, help="timed steps per variant (two ranks)")
    # 1: the ranks' count too, and OpenMP threads on an oversubscribed machine stall each other
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the single process")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds before the two ranks are killed")
    p.add_argument("--name", default="compile_blocks_cpu")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started, load_before = timestamp(), load_average()
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # cold compiles, the ranks' too
        single = single_process(args.reps)
        log.info("single process: %s", single["ratios"])
        sp = two_ranks(args.sp_reps, args.deadline)
        log.info("two ranks: %s", sp["ratios"])
    report = {
        **result_header("compile_blocks", started, "python -m benchmarks.compile_blocks " + " ".join(argv)),
        "settings": {
            "model": {k: getattr(CONFIG, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers")},
            "latents": LATENTS,
            "identity_latents": FACE,
            "text_len": TEXT_LEN,
            "video_tokens": 3 * 12 * 16,
            "identity_tokens": 8 * 8,
            "timed_unit": "one DiT forward (one CFG branch) with a cached identity",
            "order": "variants interleaved, order rotated every repetition; first calls untimed",
            "compile": "compiled_blocks(dynamic=True), inductor caches empty at start; bf16 compiles "
            "after fp32 (one-time costs, e.g. the C++ toolchain's first builds, fall on fp32)",
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "load_note": "the 2 cores were shared with other work during this run (see the load "
            "averages): absolute times are noisy, compare the ratios of interleaved runs",
        },
        "results": {"single_process": single, "two_ranks": sp},
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    for part in (single, sp):
        for name, s in part["step_s_median"].items():
            print(f"{name:>18}: {1000 * s:8.1f} ms")
        for name, r in part["ratios"].items():
            print(f"{name:>32}: {r:5.2f}×")
    for dtype, fc in single["first_call"].items():
        print(f"compile {dtype}: {fc['compile_s']:.1f} s")
    print(f"agreements per step: {sp['agreements_per_step']}")
    return report


if __name__ == "__main__":
    main()
