"""Loading the two-expert models: Wan2.2-T2V-A14B (+ Stand-In's high/low LoRAs) and `tiny-a14b`.

The official Wan2.2-T2V-A14B directory (Wan-AI/Wan2.2-T2V-A14B, as Stand-In's
`download_models.py --wan_version 2.2` fetches it):

    high_noise_model/diffusion_pytorch_model-0000{1..6}-of-00006.safetensors (+ .index.json)
    low_noise_model/diffusion_pytorch_model-0000{1..6}-of-00006.safetensors  (+ .index.json)
    Wan2.1_VAE.pth
    models_t5_umt5-xxl-enc-bf16.pth
    google/umt5-xxl/tokenizer.json
    Stand-In_wan2.2_T2V_A14B_high.ckpt      (Stand-In's files; any path by flag)
    Stand-In_wan2.2_T2V_A14B_low.ckpt

The diffusers layout names the experts `transformer/` (high noise) and `transformer_2/` (low
noise); their keys are renamed to the official ones on the way in. The VAE and umT5 are read
from the official files in either case. Every file is checked before anything loads, and one
`CheckpointError` lists every missing one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from standin.checkpoints import load_wan_dit, shard_files
from standin.dit import WanDiT
from standin.errors import CheckpointError
from standin.experts import HIGH, LOW, ExpertLayout, ExpertSet, Residency
from standin.presets import T5_FILE, TOKENIZER_FILE, VAE_FILE, ModelPreset
from standin.text_encoder import TextEncoder
from standin.tiny_weights import TINY_WEIGHTS, load_tiny_weights
from standin.vae import WanVAE, load_wan_vae

__all__ = [
    "TINY_LOW_EXPERT_SEED",
    "check_two_expert_dir",
    "derive_low_expert",
    "expert_dirs",
    "load_expert_dits",
    "load_two_experts",
    "standin_paths",
    "tiny_two_experts",
]

log = logging.getLogger(__name__)

# The tiny-a14b low-noise expert: the trained tiny DiT with its identity LoRA perturbed by this seed.
TINY_LOW_EXPERT_SEED = 22
TINY_LOW_EXPERT_NOISE = 0.25  # × each LoRA matrix's own standard deviation


def standin_paths(
    checkpoint_dir: Path, layout: ExpertLayout, high: Path | None = None, low: Path | None = None
) -> dict[str, Path]:
    """Each expert's Stand-In file: the given path, else the official name in `checkpoint_dir`."""
    return {
        HIGH: Path(high) if high is not None else checkpoint_dir / layout.standin_file(HIGH),
        LOW: Path(low) if low is not None else checkpoint_dir / layout.standin_file(LOW),
    }


def expert_dirs(checkpoint_dir: Path, layout: ExpertLayout) -> tuple[dict[str, Path], list[str]]:
    """Each expert's folder (official layout if any of its folders exists, else diffusers') and
    what is missing from them (a folder, or its shards)."""
    official = {name: checkpoint_dir / layout.dirs(name)[0] for name in layout.names}
    diffusers = {name: checkpoint_dir / layout.dirs(name)[1] for name in layout.names}
    if any(d.is_dir() for d in official.values()) or not any(d.is_dir() for d in diffusers.values()):
        dirs, other = official, diffusers
    else:
        dirs, other = diffusers, official
    missing: list[str] = []
    for name, d in dirs.items():
        if not d.is_dir():
            missing.append(f"{d}/ ({name}-noise expert; or the {other[name].name}/ of the other layout)")
            continue
        try:
            shard_files(d)
        except CheckpointError as e:
            missing.append(f"{name}-noise expert: {e}")
    return dirs, missing


def check_two_expert_dir(
    checkpoint_dir: Path, layout: ExpertLayout, standin: Mapping[str, Path] | None
) -> dict[str, Path]:
    """Raise one `CheckpointError` listing every file a two-expert directory lacks; return the
    experts' folders. `standin`: each expert's Stand-In file (None: plain Wan2.2)."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory does not exist: {checkpoint_dir}")
    dirs, missing = expert_dirs(checkpoint_dir, layout)
    missing += [
        str(checkpoint_dir / rel)
        for rel in (VAE_FILE, T5_FILE, TOKENIZER_FILE)
        if not (checkpoint_dir / rel).is_file()
    ]
    for name, path in (standin or {}).items():
        if not path.is_file():
            missing.append(f"{path} (Stand-In, {name}-noise expert)")
    if missing:
        raise CheckpointError("missing checkpoint files:\n  " + "\n  ".join(missing))
    return dirs


def load_expert_dits(
    checkpoint_dir: Path,
    preset: ModelPreset,
    *,
    standin: Mapping[str, Path] | None,
    dtype: torch.dtype,
    device: torch.device,
    residency: Residency = "resident",
) -> ExpertSet:
    """Both experts of a two-expert directory (each with its own Stand-In LoRA; `standin` None:
    plain Wan2.2), after checking every file of the directory. Strict: a missing, unexpected or
    mis-shaped key is a `CheckpointError` naming the expert and the file. `offload`: the experts
    are read into host memory and one device slot takes whichever runs (`OffloadedExperts`)."""
    layout = preset.experts
    if layout is None:
        raise CheckpointError(f"preset {preset.name} has one DiT, not two experts")
    dirs = check_two_expert_dir(checkpoint_dir, layout, standin)
    load_to = torch.device("cpu") if residency == "offload" else device
    models = {}
    for name in layout.names:
        try:
            models[name] = load_wan_dit(
                dirs[name], preset.dit, lora_path=(standin or {}).get(name), dtype=dtype, device=load_to
            )
        except CheckpointError as e:
            raise CheckpointError(f"{name}-noise expert ({dirs[name]}): {e}") from e
    return ExpertSet.two(models[HIGH], models[LOW], layout.boundary, residency, device=device)


def load_two_experts(
    checkpoint_dir: Path,
    preset: ModelPreset,
    *,
    standin: Mapping[str, Path] | None,
    dtype: torch.dtype,
    device: torch.device,
    residency: Residency = "resident",
) -> tuple[ExpertSet, WanVAE, TextEncoder]:
    """`load_expert_dits`, then the Wan2.1 VAE and umT5 of the same directory."""
    experts = load_expert_dits(
        checkpoint_dir, preset, standin=standin, dtype=dtype, device=device, residency=residency
    )
    vae = load_wan_vae(checkpoint_dir / VAE_FILE, dtype=torch.float32, device=device, config=preset.vae)
    text = TextEncoder.from_checkpoint_dir(checkpoint_dir, dtype=dtype, device=device, config=preset.text)
    return experts, vae, text


@torch.no_grad()
def derive_low_expert(high: WanDiT, seed: int = TINY_LOW_EXPERT_SEED) -> WanDiT:
    """A second expert for the tiny two-expert preset: the same base weights and an identity LoRA
    of its own (each LoRA matrix plus seeded noise of `TINY_LOW_EXPERT_NOISE` × its std).

    Deterministic: the same weights on every machine and every rank."""
    low = copy.deepcopy(high)
    gen = torch.Generator().manual_seed(seed)
    for name, p in low.named_parameters():
        if "_loras." not in name:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        scale = TINY_LOW_EXPERT_NOISE * float(p.float().std())
        p.add_((noise * scale).to(p.device, p.dtype))
    return low


def tiny_two_experts(
    preset: ModelPreset, device: torch.device, dtype: torch.dtype, residency: Residency = "resident"
) -> tuple[ExpertSet, WanVAE, dict]:
    """The tiny-a14b experts from the shipped tiny weights: high = the trained tiny DiT, low =
    `derive_low_expert` of it; the trained tiny VAE; the weights' metadata."""
    layout = preset.experts
    if layout is None:
        raise CheckpointError(f"preset {preset.name} has one DiT, not two experts")
    high, vae, meta = load_tiny_weights(TINY_WEIGHTS, preset)
    low = derive_low_expert(high)
    if residency == "offload":
        high, low = (m.to_inference_dtype(dtype) for m in (high, low))  # float32 parts kept
        experts = ExpertSet.two(high, low, layout.boundary, residency, device)
    else:
        high, low = (m.to(device=device).to_inference_dtype(dtype) for m in (high, low))
        experts = ExpertSet.two(high, low, layout.boundary, residency)
    return experts, vae.to(device=device), meta
