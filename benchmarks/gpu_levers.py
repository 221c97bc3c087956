"""The GPU speed levers, each measured against its baseline side by side in one run (issue 19).

    python -m benchmarks.gpu_levers                 # every visible GPU (1 GPU: the one-GPU levers)
    python -m benchmarks.gpu_levers --dry-run       # the plan, no GPU needed
    python -m benchmarks.gpu_levers --smoke         # CPU: tiny model, gloo, 2 ranks (times mean nothing)

One GPU (rank 0 alone, the 14B DiT cut to `--layers` layers, 480p × 81 frames, random weights
in bf16 as `WanDiT.to_inference_dtype` keeps them):
- attention: the video attention of real per-GPU shapes (S = 32,760 video + 1,560 identity
  tokens, 40/`--sp` heads × 128) with every installed backend (standin.attention: flash3, flash2,
  sage, sdpa_cudnn, sdpa_flash, sdpa_efficient, sdpa), and the identity block concatenated vs
  split-KV with a log-sum-exp merge; then the whole CFG step with the "auto" choice against
  plain `sdpa`;
- compiled blocks: `compiled_blocks()` against eager, its first-call (compile) time;
- step caching: a call the first-block cache skips against a full call (what one skip saves);
- VAE decode: the whole video in fp32 as the Decoder runs it, and one rank's band of a parallel
  decode over `--sp` ranks (its compute without the halo exchange).
With 2+ GPUs, the same world of ranks also measures sequence parallelism's levers: per-collective
agreement gates against one agreement per step, compiled blocks under SP, and the parallel VAE
decode (parallel/vae_decode.py) over every rank against the one-GPU decode.

Results: benchmarks/results/gpu_levers_<gpu>.json naming the device. Without CUDA it exits with
status 2 (unless --smoke or --dry-run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, result_header, spawn_ranks, timestamp
from benchmarks.gpu_plan import SIZES, latent_shape
from parallel.rendezvous import free_port

log = logging.getLogger("benchmarks.gpu_levers")

NO_CUDA_EXIT = 2
ATTENTION_CANDIDATES = ("flash3", "flash2", "sage", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa")
IDENTITY_TOKENS = 1560  # one 480p frame of identity tokens (30 × 52)
TEXT_TOKENS = 512
# Rough per-lever seconds on one H100 at the defaults, for the plan (not a promise).
PLANNED_S = {"attention": 40, "step": 60, "compile": 120, "step_cache": 20, "vae": 90, "sp": 150}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_levers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="480p", choices=list(SIZES))
    parser.add_argument("--layers", type=int, default=8, help="DiT blocks of the 14B model to keep")
    parser.add_argument("--sp", type=int, default=8,
                        help="SP degree whose per-GPU attention shapes and VAE band are measured")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per variant")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for the SP levers (default: all)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="result file stem (default: gpu_levers_<gpu>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--smoke", action="store_true", help="CPU machinery check (tiny model, gloo)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.layers < 1 or args.sp < 1:
        parser.error("--reps, --layers and --sp must be >= 1")
    return args


# -- measuring ------------------------------------------------------------------------------


class Timer:
    """Median wall time of a callable on one device (CUDA synchronised around each call)."""

    def __init__(self, device: Any, reps: int) -> None:
        self.device = device
        self.reps = reps

    def once(self, fn: Callable[[], Any]) -> float:
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def median(self, fn: Callable[[], Any], warmup: int = 1) -> float:
        for _ in range(warmup):
            self.once(fn)
        return statistics.median(self.once(fn) for _ in range(self.reps))


def _ratio_rows(rows: dict[str, float], baseline: str) -> dict[str, dict[str, float]]:
    base = rows[baseline]
    return {name: {"seconds": s, "speedup_vs_" + baseline: base / s} for name, s in rows.items()}


def attention_levers(device: Any, dtype: Any, heads: int, head_dim: int, tokens: int, timer: Timer) -> dict:
    """Every installed backend on the real per-GPU shapes, and identity concat vs split-KV."""
    import torch

    from standin.attention import BACKENDS, configure_attention, restricted_attention
    from standin.attention.backends import installed

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=g).to(device, dtype) for _ in range(3))
    k_id, v_id = (torch.randn(1, IDENTITY_TOKENS, heads, head_dim, generator=g).to(device, dtype)
                  for _ in range(2))
    backends: dict[str, float] = {}
    errors: dict[str, float] = {}
    refused: dict[str, str] = {}
    # the reference: exact math in float32 (sdpa_math), against which every kernel's error shows
    reference = _sdpa_math_reference(q, k, v, k_id, v_id)
    for name in ATTENTION_CANDIDATES:
        reason = None if installed(name) else "not installed"
        if reason := reason or BACKENDS[name].refuses(q):
            refused[name] = reason
            continue
        configure_attention(name)
        out = restricted_attention(q, k, v, (k_id, v_id), split_kv=False)
        errors[name] = float((out.float() - reference).abs().max() / reference.abs().max())
        backends[name] = timer.median(lambda: restricted_attention(q, k, v, (k_id, v_id), split_kv=False))
        log.info("attention %s: %.2f ms, max rel error %.1e", name, 1e3 * backends[name], errors[name])
    configure_attention("auto")
    identity = {
        "concat": timer.median(lambda: restricted_attention(q, k, v, (k_id, v_id), split_kv=False)),
        "split_kv": timer.median(lambda: restricted_attention(q, k, v, (k_id, v_id), split_kv=True)),
    }
    configure_attention(None)
    baseline = "sdpa" if "sdpa" in backends else next(iter(backends))
    return {
        "shape": {"video_tokens": tokens, "identity_tokens": IDENTITY_TOKENS, "heads": heads,
                  "head_dim": head_dim, "dtype": str(dtype)},
        "backends": {name: row | {"max_rel_error_vs_fp32_math": errors[name]}
                     for name, row in _ratio_rows(backends, baseline).items()},
        "not_run": refused,
        "identity": _ratio_rows(identity, "concat"),
    }


def _sdpa_math_reference(q: Any, k: Any, v: Any, k_id: Any, v_id: Any) -> Any:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    keys, values = torch.cat([k, k_id], dim=1).float(), torch.cat([v, v_id], dim=1).float()
    heads_first = [t.transpose(1, 2) for t in (q.float(), keys, values)]
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(*heads_first).transpose(1, 2)


def _step_inputs(config: Any, size: str, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(1, *latent_shape(size), generator=g).to(device),
        "t": torch.full((1,), 500.0, device=device),
        "context": torch.randn(1, TEXT_TOKENS, config.text_dim, generator=g).to(device),
        "negative": torch.randn(1, TEXT_TOKENS, config.text_dim, generator=g).to(device),
        "identity": torch.randn(1, 16, 1, 64, 64, generator=g).to(device),
    }


def step_levers(dit: Any, config: Any, size: str, device: Any, dtype: Any, timer: Timer) -> dict[str, Any]:
    """One CFG step (identity cached): sdpa vs auto attention, eager vs compiled, and a skipped
    first-block-cache call vs a full one."""
    import torch

    from standin.attention import configure_attention, select_backend
    from standin.forward_plan import ForwardPlan, compiled_blocks
    from standin.step_cache import FirstBlockCache

    x = _step_inputs(config, size, device)
    with torch.no_grad():
        cache = dit.identity_cache(x["identity"], x["latents"].shape)

        def step(plan: ForwardPlan | None = None) -> Callable[[], Any]:
            kw = {} if plan is None else {"plan": plan}
            return lambda: (dit(x["latents"], x["t"], x["context"], cache, **kw),
                            dit(x["latents"], x["t"], x["negative"], cache, **kw))

        rows: dict[str, float] = {}
        configure_attention("sdpa")
        rows["eager_sdpa"] = timer.median(step())
        configure_attention("auto")
        auto = select_backend(torch.zeros(1, 1, 1, config.head_dim, device=device, dtype=dtype))
        rows["eager_auto"] = timer.median(step())
        compiled = ForwardPlan(run_block=compiled_blocks())
        compile_s = timer.once(step(compiled))
        rows["compiled_auto"] = timer.median(step(compiled), warmup=0)
        # Step caching: threshold 1 skips every call after the first of each CFG slot.
        skipping = FirstBlockCache(1.0)
        skipping.begin_step(0)
        full_call = timer.once(lambda: skipping.call(dit, cache)(x["latents"], x["t"], x["context"]))
        skips = []
        for i in range(1, timer.reps + 1):
            skipping.begin_step(i)
            skips.append(timer.once(lambda: skipping.call(dit, cache)(x["latents"], x["t"], x["context"])))
        configure_attention(None)
    return {
        "auto_backend": auto,
        "cfg_step": _ratio_rows(rows, "eager_sdpa"),
        "compile_first_call_s": compile_s,
        "step_cache": {"full_call_s": full_call, "skipped_call_s": statistics.median(skips),
                       "skipped": skipping.skipped, "calls": skipping.calls,
                       "blocks": config.num_layers},
    }


def vae_levers(size: str, bands: int, device: Any, timer: Timer, vae_config: Any) -> dict[str, Any]:
    """Decode in fp32 (the whole frame) and one band of 1/bands of the latent rows."""
    import torch

    from standin.vae import WanVAE

    torch.manual_seed(0)
    with device:
        vae = WanVAE(vae_config).eval()
    latents = torch.randn(1, *latent_shape(size), device=device)
    rows = latents.shape[-2]
    band = latents[..., : max(1, rows // bands), :]
    whole = timer.median(lambda: vae.decode(latents), warmup=1)
    one_band = timer.median(lambda: vae.decode(band), warmup=1)
    return {"latent_rows": rows, "bands": bands,
            "decode": _ratio_rows({"whole_frame_fp32": whole, f"one_band_of_{bands}": one_band},
                                  "whole_frame_fp32")}


# -- the SP levers, every rank --------------------------------------------------------------


def _sp_levers(rank: int, world: int, port: int, args: dict, out: str) -> None:
    """Gated vs per-step agreement, compiled under SP, and the parallel VAE decode."""
    result: dict[str, Any] = {"rank": rank}
    try:
        import torch

        from parallel import Collectives, DeviceMesh, ParallelConfig, ShardedDiT, init_distributed
        from standin.forward_plan import compiled_blocks

        device, backend, dtype, config, vae_config = _setup(rank, args)
        init_distributed(rank, world, f"tcp://127.0.0.1:{port}", backend=backend,
                         timeout=datetime.timedelta(seconds=args["timeout_s"]), device=device)
        dit = _build(config, device, dtype)
        timer = Timer(device, args["reps"])
        x = _step_inputs(config, args["size"], device)
        parallel_config = ParallelConfig.for_world(world, config.num_heads)
        mesh = DeviceMesh(parallel_config, config.num_heads, device=device)
        rows: dict[str, float] = {}
        agreements: dict[str, int] = {}
        with torch.no_grad():
            for name, gated, run_block in (("gated_eager", True, None), ("per_step_eager", False, None),
                                           ("per_step_compiled", False, compiled_blocks())):
                comm = Collectives(mesh, gated=gated)
                sharded = ShardedDiT(dit, comm, run_block=run_block)
                cache = sharded.identity_cache(x["identity"], x["latents"].shape)

                def step(sharded: Any = sharded, cache: Any = cache) -> None:
                    sharded(x["latents"], x["t"], x["context"], cache)
                    sharded(x["latents"], x["t"], x["negative"], cache)

                timer.once(step)  # warm-up (and compile)
                comm.stats.reset()
                rows[name] = timer.median(step, warmup=0)
                agreements[name] = comm.stats.calls["agree"] // args["reps"]
        result["cfg_step"] = _ratio_rows(rows, "gated_eager")
        # in the forwards only: the runner adds one agreement at the end of every step
        result["forward_agreements_per_cfg_step"] = agreements
        result["parallel_vae"] = _parallel_vae(mesh, vae_config, args["size"], device, timer)
    except BaseException:
        result["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no process-group teardown: a crashed peer would hang it


def _parallel_vae(mesh: Any, vae_config: Any, size: str, device: Any, timer: Timer) -> dict[str, Any]:
    import torch

    from parallel import Collectives
    from parallel.vae_decode import decode_bands
    from standin.vae import WanVAE

    torch.manual_seed(0)
    with device:
        vae = WanVAE(vae_config).eval()
    latents = torch.randn(1, *latent_shape(size), generator=torch.Generator().manual_seed(2)).to(device)
    comm = Collectives(mesh, gated=False)
    with torch.no_grad():
        single = timer.median(lambda: vae.decode(latents), warmup=1)
        comm.stats.reset()
        parallel = timer.median(lambda: decode_bands(vae, latents, comm, root=0), warmup=1)
    return {"ranks": mesh.world_size,
            "decode": _ratio_rows({"one_rank_fp32": single, "all_ranks_fp32": parallel}, "one_rank_fp32"),
            "bytes_sent_per_rank": dict(comm.stats.bytes_sent)}


# -- set-up ---------------------------------------------------------------------------------


def _setup(rank: int, args: dict) -> tuple[Any, str, Any, Any, Any]:
    """device, process-group backend, DiT dtype, DiT config and VAE config of this run."""
    from dataclasses import replace

    import torch

    from standin.presets import get_preset
    from standin.vae import TINY_VAE, WAN21_VAE

    if args["smoke"]:
        torch.set_num_threads(1)
        return torch.device("cpu"), "gloo", torch.float32, get_preset("tiny").dit, TINY_VAE
    torch.cuda.set_device(rank)
    config = replace(get_preset("wan2.1-t2v-14b").dit, num_layers=args["layers"])
    return torch.device("cuda", rank), "nccl", torch.bfloat16, config, WAN21_VAE


def _build(config: Any, device: Any, dtype: Any) -> Any:
    """A seeded random DiT in the inference dtype, float32 where the official keeps it."""
    from benchmarks.model import build_dit

    return build_dit(config, device, dtype).to_inference_dtype(dtype)


def one_gpu_levers(args: argparse.Namespace) -> dict[str, Any]:
    settings = vars(args) | {"out_dir": str(args.out_dir)}
    device, _, dtype, config, vae_config = _setup(0, settings)
    timer = Timer(device, args.reps)
    tokens = 32760 if not args.smoke else 64
    heads = max(1, config.num_heads // args.sp) if not args.smoke else config.num_heads
    result: dict[str, Any] = {}
    for name, run in (
        ("attention", lambda: attention_levers(device, dtype, heads, config.head_dim, tokens, timer)),
        ("step", lambda: step_levers(_build(config, device, dtype), config, args.size, device, dtype, timer)),
        ("vae", lambda: vae_levers(args.size, args.sp, device, timer, vae_config)),
    ):
        try:
            result[name] = run()
        except Exception:  # one lever failing must not lose the others' numbers
            result[name] = {"crash": traceback.format_exc()}
            log.exception("lever %s failed", name)
    return result


def describe_plan(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    levers = ["attention", "step", "compile", "step_cache", "vae"] + (["sp"] if gpus > 1 else [])
    return {"gpus": gpus, "levers": levers, "estimated_s": sum(PLANNED_S[name] for name in levers),
            "size": args.size, "layers": args.layers, "sp_shapes": args.sp}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.dry_run:
        print(json.dumps(describe_plan(args, args.gpus or 8), indent=1))
        return 0
    import torch

    if args.smoke:
        args.size, gpus, gpu = "smoke", 2, "cpu (smoke run: times mean nothing)"
    elif not torch.cuda.is_available():
        print("gpu_levers: no CUDA GPU visible to torch; nothing run (--dry-run shows the plan, "
              "benchmarks/attention.py and benchmarks/compile_blocks.py measure on a CPU)", file=sys.stderr)
        return NO_CUDA_EXIT
    else:
        gpus = min(args.gpus or torch.cuda.device_count(), torch.cuda.device_count())
        gpu = torch.cuda.get_device_name(0)
    started, t0 = timestamp(), time.perf_counter()
    report: dict[str, Any] = {"one_gpu": one_gpu_levers(args)}
    if gpus > 1:
        shared = {"smoke": args.smoke, "layers": args.layers, "size": args.size, "reps": args.reps,
                  "timeout_s": args.timeout_s}
        ranks = spawn_ranks(_sp_levers, gpus, (free_port("127.0.0.1"), shared), deadline_s=540)
        report["sp"] = ranks[0]
        errors = {r["rank"]: r["crash"] for r in ranks if "crash" in r}
        if errors:
            report["sp"]["errors"] = errors
    command = "python -m benchmarks.gpu_levers " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {**result_header("gpu_levers", started, command), "device": f"{gpus}× {gpu}",
              "wall_s": time.perf_counter() - t0, "settings": vars(args) | {"out_dir": str(args.out_dir)},
              **report}
    name = args.name or ("gpu_levers_smoke" if args.smoke else
                         "gpu_levers_" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    crashed = "errors" in report.get("sp", {}) or any("crash" in v for v in report["one_gpu"].values())
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
