"""What the GPU suite runs, how long it should take, and how much memory a rank needs.

Pure arithmetic, no GPU: the suite (benchmarks/gpu_suite.py) plans with it, the CPU tests check
it, and the memory table in cluster/README.md is printed by it:

    python -m benchmarks.gpu_plan                       # the memory table (markdown)
    python -m benchmarks.gpu_plan --plan node --gpus 8  # the cases and a time estimate

Sizes are Wan2.1's: 81 frames of 832×480 (480p) or 1280×720 (720p); the VAE compresses 4× in
time and 8× in space, the DiT patch is 1×2×2, so 480p is 21×30×52 = 32,760 video tokens and 720p
21×45×80 = 75,600; a 512² face is 1,024 identity tokens; umT5 gives 512 text tokens.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from benchmarks.flops import Tokens, dit_forward_flops
from standin.config import DiTConfig
from standin.presets import dit_preset

__all__ = [
    "SIZES",
    "Case",
    "MemoryEstimate",
    "estimate_seconds",
    "memory_estimate",
    "memory_table",
    "plan",
]

GB = 1e9
FRAMES = 81
IDENTITY_TOKENS = 1024
TEXT_TOKENS = 512
# (width, height) of each benchmarked size
SIZES: dict[str, tuple[int, int]] = {"480p": (832, 480), "720p": (1280, 720)}
# Sizes only the CPU smoke run of the suite uses (never in the plan or the memory table).
SMOKE_SIZES: dict[str, tuple[int, int]] = {"smoke": (64, 48)}
# The suite must finish within this on one 8-GPU node.
NODE_BUDGET_S = 8 * 60
# For the time estimate only: sustained bf16 dense throughput of one GPU (H100 SXM runs DiT
# forwards at ≈ 40–50 % of its 989 TFLOP/s peak).
ASSUMED_TFLOPS = 400.0
# Per-process fixed costs the estimate adds: start, CUDA + NCCL init, random 14B weights.
WORLD_START_S = 40.0


def latent_shape(size: str, frames: int = FRAMES) -> tuple[int, int, int, int]:
    """[C, F, H, W] of the video latents for a size name."""
    width, height = SIZES.get(size) or SMOKE_SIZES[size]
    return (16, 1 + (frames - 1) // 4, height // 8, width // 8)


def video_tokens(config: DiTConfig, size: str) -> int:
    _, f, h, w = latent_shape(size)
    pt, ph, pw = config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


@dataclass(frozen=True)
class Case:
    """One measured configuration: a model (possibly with fewer layers), a size, an SP degree."""

    preset: str
    size: str
    sp: int
    layers: int | None = None  # None: all of the preset's layers
    # Also time forwards without identity (plain Wan2.1) for the identity overhead. The overhead
    # does not depend on the SP degree: node mode measures it in the widest world only.
    overhead: bool = True

    @property
    def config(self) -> DiTConfig:
        base = dit_preset(self.preset)
        return base if self.layers is None else replace(base, num_layers=self.layers)

    @property
    def name(self) -> str:
        layers = "" if self.layers is None else f"-{self.layers}layers"
        return f"{self.preset}{layers}_{self.size}_sp{self.sp}"

    def tokens(self) -> Tokens:
        return Tokens(video_tokens(self.config, self.size), IDENTITY_TOKENS, TEXT_TOKENS)

    def step_flops(self) -> int:
        """One denoising step: two forwards (CFG), identity cached."""
        return 2 * dit_forward_flops(self.config, self.tokens()).forward


def plan(mode: str, gpus: int, sizes: tuple[str, ...] = ("480p", "720p")) -> list[Case]:
    """The cases of a mode. node: 14B (all 40 layers) at SP 1, 2, 4, 8 (up to the GPUs present)
    × sizes; single (one GPU): 1.3B in full and 14B cut to 8 layers, SP 1 × sizes."""
    if gpus < 1:
        raise ValueError("the GPU suite needs at least one GPU")
    for size in sizes:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    if mode == "node":
        degrees = [d for d in (1, 2, 4, 8) if d <= gpus]
        widest = degrees[-1]
        return [Case("wan2.1-t2v-14b", size, sp, overhead=sp == widest) for sp in degrees for size in sizes]
    if mode == "single":
        return [
            *(Case("wan2.1-t2v-1.3b", size, 1) for size in sizes),
            *(Case("wan2.1-t2v-14b", size, 1, layers=8) for size in sizes),
        ]
    raise ValueError(f"unknown mode {mode!r}; choose node (8 GPUs) or single (1 GPU)")


def estimate_seconds(
    cases: list[Case], reps: int, warmup: int, tflops: float = ASSUMED_TFLOPS
) -> float:
    """Expected wall time, as the suite runs a case: the identity cache build (≈ 5 % of a step at
    1,024 identity tokens), `warmup` forwards (half a step each), `reps` steps, and with
    `overhead` one forward without identity per rep; plus one world start per SP degree."""
    total = 0.0
    for case in cases:
        step = case.step_flops() / (case.sp * tflops * 1e12)
        total += 0.05 * step + warmup * step / 2 + reps * step + (reps * step / 2 if case.overhead else 0)
    worlds = {(c.sp, c.preset, c.layers) for c in cases}
    return total + WORLD_START_S * len(worlds)


# -- memory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the peak of a forward (bf16 DiT, one block's activations live)."""

    weights: float
    identity_cache: float
    text: float
    activations: float
    runtime: float  # CUDA context, NCCL buffers, allocator slack (an estimate, not computed)

    @property
    def total(self) -> float:
        return self.weights + self.identity_cache + self.text + self.activations + self.runtime


def dit_params(config: DiTConfig) -> int:
    """Parameters of the DiT incl. LoRA, counted on the meta device (no memory)."""
    import torch

    from standin.dit import WanDiT

    with torch.device("meta"):
        return sum(p.numel() for p in WanDiT(config).parameters())


def memory_estimate(config: DiTConfig, size: str, sp: int, dtype_bytes: int = 2) -> MemoryEstimate:
    """Per-rank memory for Ulysses SP of degree `sp` (ring degrees hold the same per rank).

    Activations: the larger of (a) the patch embedding of all S tokens before sharding,
    S·C float32, and (b) the sum of one block's tensors as if all were live at once (an upper
    bound), with S_loc = ⌈S/N⌉ tokens per rank, C = dim, F = ffn_dim. The residual stream and
    adaLN modulation are float32 (as in the official model), linear layers bf16:
    residual + modulated copy 2·S_loc·C fp32, its bf16 cast S_loc·C; Q, K, V 3·S_loc·C and
    RoPE's float32 temporaries for Q and K 2·S_loc·C fp32; after the all-to-all 3·S·C/N and one
    layout copy 3·S·C/N; attention output and its all-to-all back 2·S_loc·C; FFN hidden + GELU
    output 2·S_loc·F. Attention itself is a fused kernel (no S×S matrix).
    Identity K/V cache: layers × 2 × S_id × C/N.
    """
    s = video_tokens(config, size)
    s_loc = math.ceil(s / sp)
    c, f, b = config.dim, config.ffn_dim, dtype_bytes
    fp32 = 4
    block = (
        2 * s_loc * c * fp32
        + s_loc * c * b
        + 3 * s_loc * c * b
        + 2 * s_loc * c * fp32
        + 2 * 3 * s_loc * c * b
        + 2 * s_loc * c * b
        + 2 * s_loc * f * b
    )
    embedding = s * c * fp32
    identity = config.num_layers * 2 * IDENTITY_TOKENS * c / sp * b
    # umT5 embeddings [L, 4096] and their projection [L, C], prompt and negative prompt
    text = 2 * TEXT_TOKENS * (config.text_dim + c) * b
    return MemoryEstimate(
        weights=dit_params(config) * b,
        identity_cache=identity,
        text=text,
        activations=max(block, embedding),
        runtime=3 * GB,
    )


def vae_decode_bytes(size: str, ranks: int = 1) -> float:
    """The peak of one video's VAE decode on each of `ranks` ranks (fp32 VAE, decoded one latent
    frame = 4 video frames at a time): weights (73 M decoder params) + about five live
    full-resolution 96-channel activations of 4 frames of the rank's band of rows (1/ranks; the
    one-row halos are noise) + the decoded video [3, 81, H, W] fp32, which the rank that receives
    the gathered bands holds (rank 0; the others' peak is lower by that much)."""
    width, height = SIZES[size]
    weights = 73.3e6 * 4
    full_res = 96 * 4 * math.ceil(height / ranks) * width * 4
    video = 3 * FRAMES * height * width * 4
    return weights + 5 * full_res + video


def memory_table(gpus_gb: tuple[int, ...] = (80, 141)) -> str:
    """Markdown: per preset, size and SP degree, each term and whether it fits each GPU."""
    lines = [
        "| model | size | SP | weights | identity cache | text | activations | runtime | total per rank | "
        + " | ".join(f"{g} GB GPU" for g in gpus_gb)
        + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(gpus_gb),
    ]
    for preset in ("wan2.1-t2v-14b", "wan2.1-t2v-1.3b"):
        config = dit_preset(preset)
        for size in SIZES:
            for sp in (1, 2, 4, 8):
                m = memory_estimate(config, size, sp)
                fits = [
                    f"fits ({g - m.total / GB:.0f} GB free)" if m.total / GB <= 0.9 * g else "**no**"
                    for g in gpus_gb
                ]
                lines.append(
                    f"| {preset.removeprefix('wan2.1-t2v-')} | {size} | {sp} | {m.weights / GB:.1f} | "
                    f"{m.identity_cache / GB:.2f} | {m.text / GB:.2f} | {m.activations / GB:.2f} | "
                    f"{m.runtime / GB:.0f} | {m.total / GB:.1f} | " + " | ".join(fits) + " |"
                )
    lines.append("")
    lines.append("| VAE decode, fp32, peak | " + " | ".join(SIZES) + " |")
    lines.append("|---|" + "---|" * len(SIZES))
    for where, ranks in (("the Decoder deployment (`decode_on: decoder`)", 1),
                         ("each of 8 DiT ranks (`decode_on: dit`)", 8)):
        peaks = " | ".join(f"{vae_decode_bytes(s, ranks) / GB:.1f} GB" for s in SIZES)
        lines.append(f"| {where} | {peaks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=["node", "single"], help="print a mode's cases instead")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.plan is None:
        print(memory_table())
        return
    cases = plan(args.plan, args.gpus)
    for case in cases:
        print(f"{case.name:<40} {case.step_flops() / 1e15:7.2f} PFLOP per step")
    seconds = estimate_seconds(cases, args.reps, args.warmup)
    print(f"estimated {seconds:.0f} s at {ASSUMED_TFLOPS:.0f} TFLOP/s per GPU")


if __name__ == "__main__":
    main()
