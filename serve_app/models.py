"""Load only the model parts one deployment needs (the DiT replica never holds the VAE, …)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from serve_app.settings import ServeSettings
from standin.checkpoints import load_wan_dit
from standin.config import DTYPES
from standin.dit import WanDiT
from standin.experts import HIGH, LOW, ExpertSet
from standin.pipeline import StandInPipeline
from standin.presets import STANDIN_FILE, VAE_FILE, get_preset
from standin.text_encoder import TextEncoder
from standin.vace import VaceBranch, load_vace_branch, load_vace_dit
from standin.vae import WanVAE, load_wan_vae
from standin.wan22 import check_two_expert_dir, load_expert_dits, standin_paths

log = logging.getLogger(__name__)


def device_of(settings: ServeSettings) -> torch.device:
    """This process's device, with an explicit index for CUDA (cuda:0 for a one-GPU Ray actor)."""
    from parallel.devices import device_environment, resolve_device

    gpu_ids: list[object] = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = list(ray.get_gpu_ids())
    except Exception:  # outside a Ray worker: no scheduler assignment to honour
        gpu_ids = []
    return resolve_device(settings.device, device_environment(gpu_ids))


def dtype_of(settings: ServeSettings) -> torch.dtype:
    if settings.dtype:
        return DTYPES[settings.dtype]
    return torch.bfloat16 if device_of(settings).type == "cuda" else torch.float32


def _tiny_pipeline(settings: ServeSettings) -> StandInPipeline:
    # The tiny weights come from one seeded stream (DiT, then VAE): build them together so every
    # deployment gets exactly the weights the local `standin generate` uses.
    return StandInPipeline.from_preset(settings.preset, device=device_of(settings), dtype=dtype_of(settings))


def _checkpoint_dir(settings: ServeSettings) -> Path:
    if not settings.checkpoint_dir:
        raise ValueError(f"preset {settings.preset} needs checkpoint_dir in serve_config.yaml")
    return Path(settings.checkpoint_dir)


def load_dit(settings: ServeSettings) -> WanDiT:
    preset = get_preset(settings.preset)
    if not preset.needs_checkpoint:
        return _tiny_pipeline(settings).dit
    ckpt = _checkpoint_dir(settings)
    lora = Path(settings.standin_checkpoint) if settings.standin_checkpoint else ckpt / STANDIN_FILE
    if preset.vace is not None:  # Wan2.1-VACE: the DiT's tensors of the shards (the branch: load_vace)
        dit, _ = load_vace_dit(
            ckpt, preset.dit, preset.vace, lora_path=lora, dtype=dtype_of(settings),
            device=device_of(settings), with_branch=False,
        )
        return dit
    return load_wan_dit(
        ckpt, preset.dit, lora_path=lora, dtype=dtype_of(settings), device=device_of(settings)
    )


def load_vace(settings: ServeSettings) -> VaceBranch | None:
    """The preset's VACE branch (every rank reads it: only the `vace_*` tensors), or None."""
    preset = get_preset(settings.preset)
    if preset.vace is None or preset.experts is not None:
        return None
    if not preset.needs_checkpoint:
        return _tiny_pipeline(settings).vace  # None when the tiny branch file is absent
    return load_vace_branch(
        _checkpoint_dir(settings), preset.dit, preset.vace, dtype=dtype_of(settings),
        device=device_of(settings),
    )


def _expert_files(settings: ServeSettings) -> dict[str, Path]:
    high, low = settings.standin_checkpoint, settings.standin_low_checkpoint
    preset = get_preset(settings.preset)
    return standin_paths(
        _checkpoint_dir(settings), preset.experts, Path(high) if high else None, Path(low) if low else None
    )


def load_expert(settings: ServeSettings, name: str) -> WanDiT:
    """One expert of a two-expert preset on this process's device, after checking every file."""
    preset = get_preset(settings.preset)
    files = _expert_files(settings)
    dirs = check_two_expert_dir(_checkpoint_dir(settings), preset.experts, files)
    return load_wan_dit(
        dirs[name], preset.dit, lora_path=files[name], dtype=dtype_of(settings), device=device_of(settings)
    )


def load_experts(settings: ServeSettings, world_size: int) -> ExpertSet:
    """Both experts of a two-expert preset for one DiT rank (`settings.expert_residency`).

    Resident in a group of several ranks: rank 0 reads each expert and broadcasts it (as the
    one-DiT presets). Offload: every rank reads both into its own pinned host memory.
    """
    preset = get_preset(settings.preset)
    device, dtype = device_of(settings), dtype_of(settings)
    residency = settings.expert_residency
    if not preset.needs_checkpoint:  # tiny-a14b: the shipped weights
        return StandInPipeline.from_preset(
            settings.preset, device=device, dtype=dtype, expert_residency=residency
        ).experts
    if residency == "offload" or world_size == 1:
        files = _expert_files(settings)
        return load_expert_dits(
            _checkpoint_dir(settings), preset, standin=files, dtype=dtype, device=device, residency=residency
        )
    from functools import partial

    from parallel import load_once_per_node

    empty = partial(WanDiT, preset.dit)
    high, _ = load_once_per_node(partial(load_expert, settings, HIGH), empty, device)
    low, _ = load_once_per_node(partial(load_expert, settings, LOW), empty, device)
    return ExpertSet.two(high, low, preset.experts.boundary)  # type: ignore[arg-type]


def load_encoders(settings: ServeSettings) -> tuple[TextEncoder, WanVAE]:
    preset = get_preset(settings.preset)
    if not preset.needs_checkpoint:
        pipe = _tiny_pipeline(settings)
        return pipe.text_encoder, pipe.vae
    return load_text_encoder(settings), load_vae(settings)


def load_text_encoder(settings: ServeSettings) -> TextEncoder:
    preset = get_preset(settings.preset)
    if not preset.needs_checkpoint:
        return _tiny_pipeline(settings).text_encoder
    return TextEncoder.from_checkpoint_dir(
        _checkpoint_dir(settings), dtype=dtype_of(settings), device=device_of(settings), config=preset.text
    )


def load_vae(settings: ServeSettings) -> WanVAE:
    preset = get_preset(settings.preset)
    if not preset.needs_checkpoint:
        return _tiny_pipeline(settings).vae
    return load_wan_vae(
        _checkpoint_dir(settings) / VAE_FILE,
        dtype=torch.float32,
        device=device_of(settings),
        config=preset.vae,
    )
