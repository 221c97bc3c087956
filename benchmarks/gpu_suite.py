"""The GPU suite: what production runs, measured on this machine's GPUs (random weights, bf16).

    python -m benchmarks.gpu_suite                    # node mode on 8+ GPUs, single mode otherwise
    python -m benchmarks.gpu_suite --mode single      # one GPU: 1.3B and 14B cut to 8 layers
    python -m benchmarks.gpu_suite --dry-run --gpus 8 # the plan and a time estimate, no GPU needed

Per case (model × size × SP degree, see benchmarks/gpu_plan.py) it reports:
- step time: one denoising step = the positive and the negative CFG pass, identity cached, the
  median over `--reps` steps after `--warmup` forwards; achieved TFLOP/s of the whole group and
  per GPU against the FLOP count of benchmarks/flops.py;
- identity overhead: the same forwards without identity (plain Wan2.1), and the cache build;
- peak memory per rank (allocated and reserved), every rank;
- the attention kernels that ran: the video attention backend and the ring blocks' log-sum-exp
  kernels (both standin.attention), counted while the case ran;
- the SP layout (Ulysses × ring) and the process group communicators.
Once per run: weight-load time (a bf16 checkpoint of a few 14B layers read from disk with the
page cache dropped, extrapolated to the whole model, plus the NCCL broadcast of the whole 14B
model from rank 0 in the widest world) and VAE decode time (fp32, as the Decoder runs it) at each
size. Node mode runs the VAE and loading on the last GPU while the narrow SP worlds use the
first ones.

Node mode (14B at SP 1/2/4/8 × 480p/720p, plus 1.3B at SP 8 = Ulysses 4 × ring 2) is sized to
finish in under 8 minutes on one 8×H100 node (`--dry-run` prints the estimate). Results: one JSON
`benchmarks/results/gpu_suite_<mode>_<gpu>.json` naming the device. Without CUDA it exits with
status 2 and says so.
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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, spawn_ranks
from benchmarks.gpu_plan import (
    ASSUMED_TFLOPS,
    NODE_BUDGET_S,
    SIZES,
    Case,
    estimate_seconds,
    latent_shape,
    memory_estimate,
    plan,
)
from parallel.rendezvous import free_port

log = logging.getLogger("benchmarks.gpu_suite")

NO_CUDA_EXIT = 2
# Layers of the 14B model written to disk for the load-time measurement (≈ 0.35 B params each).
LOAD_LAYERS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--mode", choices=["auto", "node", "single"], default="auto",
                        help="node: 14B at SP 1/2/4/8 (8 GPUs); single: one GPU; auto: node with 8+ GPUs")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--reps", type=int, default=2, help="timed steps per case (2 forwards each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per case")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--skip-vae", action="store_true", help="no VAE decode measurement")
    parser.add_argument("--skip-load", action="store_true", help="no weight-load measurement")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="result file stem (default: gpu_suite_<mode>_<gpu>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and time estimate only")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="NCCL collective timeout")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run of the machinery (tiny model, gloo; times mean nothing)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return args


def resolve_mode(mode: str, gpus: int) -> str:
    if mode == "auto":
        return "node" if gpus >= 8 else "single"
    return mode


def node_cases(mode: str, gpus: int, sizes: tuple[str, ...]) -> list[Case]:
    """The plan plus, on 8 GPUs, the ring path: 1.3B (12 heads) at SP 8 is Ulysses 4 × ring 2."""
    cases = plan(mode, gpus, sizes)
    if mode == "node" and gpus >= 8:
        cases += [Case("wan2.1-t2v-1.3b", size, 8, overhead=False) for size in sizes]
    return cases


def worlds(cases: list[Case]) -> list[tuple[int, list[Case]]]:
    """Cases grouped by SP degree (one process group each), narrowest first."""
    by_sp: dict[int, list[Case]] = {}
    for case in cases:
        by_sp.setdefault(case.sp, []).append(case)
    return sorted(by_sp.items())


def describe_plan(mode: str, gpus: int, cases: list[Case], args: argparse.Namespace) -> dict[str, Any]:
    estimate = estimate_seconds(cases, args.reps, args.warmup)
    return {
        "mode": mode,
        "gpus": gpus,
        "cases": [c.name for c in cases],
        "worlds": [{"sp": sp, "cases": [c.name for c in cs]} for sp, cs in worlds(cases)],
        "estimated_s": round(estimate, 1),
        "estimate_assumes_tflops_per_gpu": ASSUMED_TFLOPS,
        "node_budget_s": NODE_BUDGET_S,
    }


# -- one world of SP ranks ------------------------------------------------------------------



def _inputs(case: Case, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    config = case.config
    lat = torch.randn(1, *latent_shape(case.size), generator=g)
    return {
        "latents": lat.to(device),
        "context": torch.randn(1, 512, config.text_dim, generator=g).to(device, torch.bfloat16),
        "negative": torch.randn(1, 512, config.text_dim, generator=g).to(device, torch.bfloat16),
        "identity": torch.randn(1, 16, 1, 64, 64, generator=g).to(device),
        "t": torch.full((1,), 500.0, device=device),
    }


def _run_case(dit: Any, case: Case, device: Any, reps: int, warmup: int) -> dict[str, Any]:
    import torch

    from standin.attention import BACKEND_CALLS, select_backend

    x = _inputs(case, device)
    cuda = device.type == "cuda"

    def timed(fn: Any) -> tuple[float, Any]:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    BACKEND_CALLS.clear()
    build_s, cache = timed(lambda: dit.identity_cache(x["identity"], x["latents"].shape))
    for _ in range(warmup):
        timed(lambda: dit(x["latents"], x["t"], x["context"], cache))
    steps, wan = [], []
    for _ in range(reps):
        pos, _ = timed(lambda: dit(x["latents"], x["t"], x["context"], cache))
        neg, _ = timed(lambda: dit(x["latents"], x["t"], x["negative"], cache))
        steps.append(pos + neg)
        if case.overhead:
            wan.append(timed(lambda: dit(x["latents"], x["t"], x["context"], None))[0])
    probe = torch.zeros(1, 1, 1, 128, device=device, dtype=next(dit.model.parameters()).dtype)
    step = statistics.median(steps)
    forward_wan = statistics.median(wan) if wan else None
    flops = case.step_flops()
    return {
        "case": case.name,
        "preset": case.preset,
        "layers": case.config.num_layers,
        "size": case.size,
        "sp": case.sp,
        "tokens": {"video": case.tokens().video, "identity": case.tokens().identity, "text": 512},
        "step_s": step,
        "step_samples_s": steps,
        "identity_cache_build_s": build_s,
        "forward_without_identity_s": forward_wan,
        "identity_overhead": step / (2 * forward_wan) if forward_wan else None,
        "step_flops": flops,
        "achieved_tflops": flops / step / 1e12,
        "achieved_tflops_per_gpu": flops / step / 1e12 / case.sp,
        "attention": {
            "video_attention_backend": select_backend(probe),
            "ring_block_kernels": {k: n for k, n in BACKEND_CALLS.items() if k.endswith("+lse")},
        },
        "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if cuda else 0.0,
        "computed_memory_gb": memory_estimate(case.config, case.size, case.sp).total / 1e9
        if case.size in SIZES else None,
    }


def _world_main(rank: int, world: int, port: int, cases: list[Case], args: dict, out: str) -> None:
    result: dict[str, Any] = {"rank": rank}
    try:
        import torch
        import torch.distributed as dist

        from benchmarks.model import build_dit
        from parallel import Collectives, DeviceMesh, ParallelConfig, ShardedDiT, init_distributed
        from parallel.devices import DeviceEnvironment, resolve_device
        from parallel.weights import broadcast_module

        smoke = args["smoke"]
        if smoke:
            device, backend, dtype = torch.device("cpu"), "gloo", torch.float32
            torch.set_num_threads(1)
        else:
            env = DeviceEnvironment(True, torch.cuda.device_count(), local_rank=rank)
            device, backend, dtype = resolve_device("cuda", env), "nccl", torch.bfloat16
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=args["timeout_s"])
        if world > 1:
            init_distributed(rank, world, f"tcp://127.0.0.1:{port}", backend=backend, timeout=timeout,
                             device=device)
        rows = []
        models: dict[tuple[str, int], Any] = {}
        for case in cases:
            key = (case.preset, case.config.num_layers)
            if key not in models:
                models.clear()
                torch.cuda.empty_cache()
                start = time.perf_counter()
                models[key] = build_dit(case.config, device, dtype)
                result.setdefault("build_s", {})[case.name] = time.perf_counter() - start
            model = models[key]
            config = ParallelConfig.for_world(world, case.config.num_heads)
            start = time.perf_counter()
            mesh = DeviceMesh(config, case.config.num_heads, device=device)
            mesh_s = time.perf_counter() - start
            dit = ShardedDiT(model, Collectives(mesh))
            row = _run_case(dit, case, device, args["reps"], args["warmup"])
            row["mesh"] = {"ulysses": config.ulysses, "ring": config.ring, "groups": len(mesh.groups),
                           "new_groups": mesh.created, "build_s": mesh_s}
            peaks = [None] * world
            if world > 1:
                dist.all_gather_object(peaks, (row["peak_allocated_gb"], row["peak_reserved_gb"]))
            else:
                peaks = [(row["peak_allocated_gb"], row["peak_reserved_gb"])]
            row["peak_allocated_gb_per_rank"] = [p[0] for p in peaks]
            row["peak_reserved_gb_per_rank"] = [p[1] for p in peaks]
            rows.append(row)
            if rank == 0:
                log.info("%s: step %.2f s, %.0f TFLOP/s per GPU, peak %.1f GB", case.name, row["step_s"],
                         row["achieved_tflops_per_gpu"], max(row["peak_allocated_gb_per_rank"]))
        result["cases"] = rows
        if world > 1 and args["broadcast"] and cases:
            model = next(iter(models.values()))
            if not smoke:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            nbytes = broadcast_module(model, 0)
            if not smoke:
                torch.cuda.synchronize(device)
            result["weight_broadcast"] = {"model": cases[-1].name, "bytes": nbytes,
                                          "seconds": time.perf_counter() - start}
    except BaseException:
        result["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no process-group teardown: a crashed peer would hang it


def run_world(
    sp: int, cases: list[Case], args: argparse.Namespace, broadcast: bool, deadline_s: float
) -> dict[str, Any]:
    """Spawn `sp` ranks (GPUs 0..sp-1), run the cases, return rank 0's rows + every rank's peaks."""
    shared = {"reps": args.reps, "warmup": args.warmup, "timeout_s": args.timeout_s, "broadcast": broadcast,
              "smoke": args.smoke}
    results = spawn_ranks(_world_main, sp, (free_port("127.0.0.1"), cases, shared), deadline_s)
    crashes = {r["rank"]: r["crash"] for r in results if "crash" in r}
    out = dict(results[0])
    if crashes:
        out["errors"] = crashes
        log.error("SP %d world failed: %s", sp, crashes)
    return out


# -- once per run: VAE decode and weight loading (one GPU) -----------------------------------


def _aux_main(gpu: int, sizes: list[str], skip_vae: bool, skip_load: bool, out: str) -> None:
    result: dict[str, Any] = {}
    try:
        import torch

        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
        if not skip_vae:
            result["vae_decode"] = _vae_decode(device, sizes)
        if not skip_load:
            result["weight_load"] = _weight_load(device)
    except BaseException:
        result["crash"] = traceback.format_exc()
    Path(out).write_text(json.dumps(result))
    os._exit(0)


def _vae_decode(device: Any, sizes: list[str]) -> dict[str, Any]:
    """Decode 81 frames at each size with a random fp32 Wan2.1 VAE, as the Decoder does."""
    import torch

    from standin.vae import WAN21_VAE, WanVAE

    torch.manual_seed(0)
    with device:
        vae = WanVAE(WAN21_VAE).eval()
    out: dict[str, Any] = {}
    for size in sizes:
        latents = torch.randn(1, *latent_shape(size), device=device)
        torch.cuda.reset_peak_memory_stats(device)
        vae.decode(latents[:, :, :2])  # warm-up (cuDNN algorithm selection)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        video = vae.decode(latents)
        torch.cuda.synchronize(device)
        out[size] = {
            "seconds": time.perf_counter() - start,
            "video_shape": list(video.shape),
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
        }
        del video
        # The compute of one rank of an 8-rank parallel decode (parallel/vae_decode.py): the
        # tallest band of latent rows alone (its halo rows and the K/V gather left out).
        band = latents[..., : -(-latents.shape[-2] // 8), :]
        vae.decode(band[:, :, :2])  # warm-up for the band's shapes
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        vae.decode(band)
        torch.cuda.synchronize(device)
        out[size]["band_of_8_seconds"] = time.perf_counter() - start
    return out


def _weight_load(device: Any) -> dict[str, Any]:
    """Read a bf16 checkpoint of LOAD_LAYERS 14B layers from local disk onto the GPU, the way the
    replica loads (standin.checkpoints.load_wan_dit), with the page cache dropped first."""
    from dataclasses import replace

    import torch

    from benchmarks.model import build_dit
    from standin.checkpoints import load_wan_dit, save_safetensors_shards
    from standin.presets import dit_preset

    full = dit_preset("wan2.1-t2v-14b")
    config = replace(full, num_layers=LOAD_LAYERS, lora_rank=0)
    model = build_dit(config, device, torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=os.environ.get("STANDIN_BENCH_TMP")) as tmp:
        paths = save_safetensors_shards(model.state_dict(), Path(tmp), 2, "diffusion_pytorch_model")
        nbytes = sum(p.stat().st_size for p in paths)
        del model
        cache_dropped = _drop_page_cache(paths)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        load_wan_dit(Path(tmp), config, dtype=torch.bfloat16, device=device)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    from benchmarks.gpu_plan import dit_params

    full_bytes = dit_params(full) * 2
    return {
        "layers": LOAD_LAYERS,
        "bytes": nbytes,
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9,
        "page_cache_dropped": cache_dropped,
        "projected_14b_bf16_s": full_bytes / (nbytes / seconds),
        "note": "one rank reads (parallel.weights.load_once_per_node); the others receive the broadcast",
    }


def _drop_page_cache(paths: list[Path]) -> bool:
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


# -- the suite ------------------------------------------------------------------------------


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.dry_run:
        gpus = args.gpus or 8
        mode = resolve_mode(args.mode, gpus)
        cases = node_cases(mode, gpus, tuple(args.sizes))
        print(json.dumps(describe_plan(mode, gpus, cases, args), indent=1))
        return 0
    import torch

    if args.smoke:
        return _smoke(args)
    if not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing run. "
            "Use --dry-run to see the plan, or `python -m benchmarks.model identity` on a CPU.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    from benchmarks.common import result_header, timestamp

    visible = torch.cuda.device_count()
    gpus = min(args.gpus or visible, visible)
    mode = resolve_mode(args.mode, gpus)
    cases = node_cases(mode, gpus, tuple(args.sizes))
    planned = describe_plan(mode, gpus, cases, args)
    gpu = _gpu_name()
    log.info("GPU suite, %s mode on %d× %s: %d cases, ≈ %.0f s", mode, gpus, gpu, len(cases),
             planned["estimated_s"])
    started, t0 = timestamp(), time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    aux_out = Path(tempfile.mkdtemp()) / "aux.json"
    aux = None
    if not (args.skip_vae and args.skip_load):
        # VAE decode and weight loading on the last GPU: concurrently with the SP worlds that
        # leave it idle (node mode), alone before them when there are fewer than 3 GPUs.
        aux = ctx.Process(target=_aux_main, args=(gpus - 1, args.sizes, args.skip_vae, args.skip_load,
                                                  str(aux_out)))
        aux.start()
        if gpus < 3:
            aux.join()
    widest = max(c.sp for c in cases)
    world_results = []
    for sp, world_cases in worlds(cases):
        if aux is not None and sp > gpus - 1:
            aux.join()
        broadcast = not args.skip_load and sp == widest and sp > 1
        world_results.append(run_world(sp, world_cases, args, broadcast, deadline_s=540))
    if aux is not None:
        aux.join()
    extra = json.loads(aux_out.read_text()) if aux_out.exists() else {}
    command = "python -m benchmarks.gpu_suite " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        **result_header("gpu_suite", started, command),
        "device": f"{gpus}× {gpu}",
        "wall_s": time.perf_counter() - t0,
        "settings": {"dtype": "bfloat16", "weights": "random (seeded)", "reps": args.reps,
                     "warmup": args.warmup, "frames": 81, "identity_tokens": 1024, "text_tokens": 512,
                     "step": "positive + negative CFG forward, identity cached"},
        "plan": planned,
        "worlds": world_results,
        **extra,
    }
    name = args.name or f"gpu_suite_{mode}_" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=1))
    _print_summary(report)
    print(f"wrote {path}")
    failed = any("errors" in w for w in world_results) or "crash" in extra
    return 1 if failed else 0


def _smoke(args: argparse.Namespace) -> int:
    """The suite's machinery on CPU: tiny model (2 heads), gloo, SP 1 and SP 3 (ring 3, so the ring
    kernels and grouped shifts run), weight broadcast. Catches breakage without a GPU."""
    cases = [Case("tiny", "smoke", 1), Case("tiny", "smoke", 3)]
    world_results = [run_world(sp, cs, args, broadcast=sp == 3, deadline_s=150) for sp, cs in worlds(cases)]
    report = {"benchmark": "gpu_suite", "device": "cpu (smoke run: times mean nothing)", "wall_s": 0.0,
              "worlds": world_results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.name or 'gpu_suite_smoke'}.json"
    path.write_text(json.dumps(report, indent=1))
    _print_summary(report)
    return 1 if any("errors" in w for w in world_results) else 0


def _print_summary(report: dict[str, Any]) -> None:
    print(f"\nGPU suite on {report['device']} ({report['wall_s']:.0f} s)")
    print(f"  {'case':<34} {'step s':>8} {'TFLOP/s/GPU':>12} {'id. ovh':>8} {'peak GB':>8}  attention")
    for world in report["worlds"]:
        for row in world.get("cases", []):
            att = row["attention"]
            kernels = att["video_attention_backend"] + (
                f" + ring {','.join(att['ring_block_kernels'])}" if att["ring_block_kernels"] else ""
            )
            peak = max(row["peak_allocated_gb_per_rank"])
            ovh = row["identity_overhead"]
            ovh_text = f"{100 * (ovh - 1):+7.1f}%" if ovh else "       -"
            print(f"  {row['case']:<34} {row['step_s']:8.2f} {row['achieved_tflops_per_gpu']:12.0f} "
                  f"{ovh_text} {peak:8.1f}  {kernels}")
    for size, vae in report.get("vae_decode", {}).items():
        print(f"  VAE decode {size}: {vae['seconds']:.1f} s, peak {vae['peak_allocated_gb']:.1f} GB")
    if "weight_load" in report:
        wl = report["weight_load"]
        print(f"  weight read: {wl['gb_per_s']:.2f} GB/s → 14B bf16 in ≈ {wl['projected_14b_bf16_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
