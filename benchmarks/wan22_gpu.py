"""Measure Wan2.2 A14B's two expert residencies on one GPU: peak memory, step times, the switch.

Two random experts of the 14B architecture (bf16, Stand-In LoRA rank 128; no checkpoint needed),
one request of `--steps` steps with CFG as two passes and a 1,024-token identity, sampled through
`standin.experts.ExpertRun` exactly as the pipeline does. With 2 steps and shift 5 the first step
is the high-noise expert's (t = 1000) and the second the low-noise one's (t = 833), so the switch,
its identity-cache build and (offload) its host-to-device copy are all inside the run.

    python -m benchmarks.wan22_gpu                      # 480p, both residencies, CUDA → JSON
    python -m benchmarks.wan22_gpu --smoke              # tiny sizes on the CPU (what CI runs)

Per residency it records `torch.cuda.max_memory_allocated()`, each step's seconds (the step that
switches expert includes the new expert's identity cache and, offloaded, waits for its copy), and
the time of one expert swap (host → slot, synchronised). Host memory: both experts pinned (57.8 GB)
for offload. The result names the device (benchmarks/results/wan22_gpu_<device>.json).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import result_header, result_path, timestamp, write_result
from benchmarks.gpu_plan import latent_shape
from standin.config import TINY_DIT, DiTConfig
from standin.dit import WanDiT
from standin.experts import LOW, ExpertRun, ExpertSet, OffloadedExperts, expert_per_step
from standin.presets import dit_preset
from standin.scheduler import FlowMatchSchedule

log = logging.getLogger(__name__)

GB = 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def random_expert(
    config: DiTConfig, seed: int, device: torch.device, dtype: torch.dtype, pin: bool
) -> WanDiT:
    """A DiT with seeded random weights built where it will live: on `device`, or (pin) in pinned
    host memory, filled on `device` first (fast) and copied over parameter by parameter."""
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device).manual_seed(seed)
    for p in model.parameters():
        p.normal_(0.0, 0.02, generator=gen)
    if pin:
        for p in model.parameters():
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=device.type == "cuda")
            p.data = host.copy_(p.data)
        _sync(device)
    return model.eval().requires_grad_(False)


def build_experts(config: DiTConfig, residency: str, device: torch.device, dtype: torch.dtype) -> ExpertSet:
    pin = residency == "offload"
    high = random_expert(config, 1, device, dtype, pin)
    low = random_expert(config, 2, device, dtype, pin)
    return ExpertSet.two(high, low, 0.875, residency, device)  # type: ignore[arg-type]


@torch.no_grad()
def measure(
    config: DiTConfig,
    residency: str,
    shape: tuple[int, ...],
    identity_side: int,
    text_len: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """One request with both experts; memory and times of `residency`."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    experts = build_experts(config, residency, device, dtype)
    _sync(device)
    build_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *shape, generator=g).to(device)
    context = torch.randn(1, text_len, config.text_dim, generator=g).to(device, dtype)
    negative = torch.randn(1, text_len, config.text_dim, generator=g).to(device, dtype)
    ident = torch.randn(1, config.in_dim, 1, identity_side, identity_side, generator=g).to(device)
    schedule = FlowMatchSchedule(steps, shift=5.0)

    def build(model: WanDiT, adapters: object) -> Any:
        return model.identity_cache(ident, latents.shape)

    step_s, names = [], []
    with experts.request():
        run = ExpertRun(experts, schedule, build, guidance=5.0)
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            expert = run.step(i)
            t = schedule.timestep(i).to(device)
            pos = expert.model(latents, t, context, expert.identity)
            neg = expert.model(latents, t, negative, expert.identity)
            latents = schedule.step(neg + expert.guidance * (pos - neg), i, latents)
            _sync(device)
            step_s.append(time.perf_counter() - t0)
            names.append(expert.name)
    swap_s = None
    if isinstance(experts.residency, OffloadedExperts):
        _sync(device)
        t0 = time.perf_counter()
        experts.residency.activate(LOW)  # the slot holds the high expert again after the request
        _sync(device)
        swap_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return {
        "residency": residency,
        "experts_per_step": names,
        "build_s": build_s,
        "weights_on_device_gb": weights,
        "peak_allocated_gb": peak,
        "step_s": step_s,
        "swap_s": swap_s,
        "finite": bool(torch.isfinite(latents).all()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="480p", choices=["480p", "720p"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--residency", nargs="+", default=["resident", "offload"], choices=["resident", "offload"]
    )
    parser.add_argument("--layers", type=int, help="fewer DiT layers (a quicker, smaller run)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", help="result file stem (default wan22_gpu_<device>)")
    parser.add_argument("--out-dir", type=Path, help="directory of the result (default benchmarks/results)")
    args = parser.parse_args(argv)
    started = timestamp()
    if args.smoke:
        config, device, dtype = TINY_DIT, torch.device("cpu"), torch.float32
        shape, identity_side, text_len = (16, 2, 6, 10), 4, 7
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device (use --smoke on a CPU)")
        config, device, dtype = dit_preset("wan2.2-t2v-a14b"), torch.device("cuda"), torch.bfloat16
        shape, identity_side, text_len = latent_shape(args.size), 64, 512
    if args.layers:
        config = replace(config, num_layers=args.layers)
    runs = [
        measure(config, r, shape, identity_side, text_len, args.steps, device, dtype) for r in args.residency
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        **result_header("wan22_gpu", started),
        "device": name,
        "size": "smoke" if args.smoke else args.size,
        "layers": config.num_layers,
        "steps": args.steps,
        "plan": expert_per_step(FlowMatchSchedule(args.steps, shift=5.0), 0.875),
        "runs": runs,
    }
    stem = args.out or "wan22_gpu_" + "".join(c if c.isalnum() else "_" for c in name.lower())
    write_result(result_path(stem, args.out_dir), result)
    for r in runs:
        log.info(
            "%s: peak %s GB, steps %s s, swap %s s",
            r["residency"],
            r["peak_allocated_gb"],
            r["step_s"],
            r["swap_s"],
        )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
