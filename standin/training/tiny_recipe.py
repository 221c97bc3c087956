"""The tiny preset's full training run: VAE, base text-to-video, identity branch → one file.

`standin train --recipe demo` runs `train_tiny`; it regenerates `standin/weights/tiny.safetensors`
from seed 0. What each part is:

- text encoder: the tiny umT5 with fixed seeded random weights (seed 0), never trained; the
  prompts are a closed vocabulary ("moves left on navy") the DiT learns to read through it.
- VAE: the Wan2.1 architecture at dim 8, fitted as an autoencoder on the synthetic clips
  (`vae_fit`), so that decode inverts encode on this data.
- DiT: stage 1 ``base`` (plain text-to-video), stage 2 ``lora`` or ``demo`` on the identity
  branch, on identities disjoint from the held-out ones the quality test uses.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from standin.dit import WanDiT
from standin.presets import ModelPreset, get_preset
from standin.text_encoder import TextEncoder
from standin.tiny_weights import save_tiny_weights
from standin.training.synthetic import (
    BACKGROUNDS,
    DIRECTIONS,
    Clip,
    Identity,
    make_identities,
    render_clip,
    split_identities,
)
from standin.training.trainer import LatentBatch, TrainConfig, train
from standin.training.vae_fit import fit_vae, to_video_tensor
from standin.vae import WanVAE

log = logging.getLogger(__name__)

TEXT_ENCODER_SEED = 0
NUM_IDENTITIES = 240
HELD_OUT = 40  # the last 40 identities of seed 0 are never trained on


@dataclass
class TinySchedule:
    """Step counts and rates of the tiny run (the defaults are what produced the shipped file)."""

    clips_per_identity: int = 6
    vae_steps: int = 1200
    vae_batch: int = 8
    base_steps: int = 5000
    identity_steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-3
    reference_dropout: float = 0.15  # demo only
    subject_weight: float = 2.0  # extra loss weight where the subject is

    def scaled(self, factor: float) -> TinySchedule:
        """The same run with every step count multiplied by `factor` (for smoke tests)."""
        s = TinySchedule(**self.__dict__)
        for name in ("vae_steps", "base_steps", "identity_steps"):
            setattr(s, name, max(1, round(getattr(s, name) * factor)))
        return s


def tiny_identities() -> tuple[list[Identity], list[Identity]]:
    """(train, held-out) identities of the tiny preset."""
    return split_identities(make_identities(NUM_IDENTITIES, seed=0), HELD_OUT)


def latent_mask(mask: np.ndarray, preset: ModelPreset) -> torch.Tensor:
    """Pixel subject masks [N, F, H, W] → latent masks [N, 1, F', H/8, W/8] in {0, 1}.

    Latent frame 0 is video frame 0; latent frame k covers frames 4k-3 … 4k (the VAE's grouping).
    """
    m = torch.from_numpy(mask).float()[:, None]
    first, rest = m[:, :, :1], m[:, :, 1:]
    if rest.shape[2]:
        n, c, f, h, w = rest.shape
        rest = rest.reshape(n, c, f // 4, 4, h, w).amax(dim=3)
        m = torch.cat([first, rest], dim=2)
    else:
        m = first
    s = preset.vae.spatial_factor
    return torch.nn.functional.max_pool3d(m, (1, s, s))


class SyntheticLatents:
    """Encoded synthetic clips: the `LatentSource` of the tiny preset."""

    def __init__(
        self,
        clips: list[Clip],
        vae: WanVAE,
        text: TextEncoder,
        preset: ModelPreset,
        null_prompt: str,
        subject_weight: float = 0.0,
    ) -> None:
        self.clips = clips
        with torch.no_grad():
            videos = to_video_tensor(np.stack([c.video for c in clips]))
            refs = to_video_tensor(np.stack([c.reference for c in clips])[:, None])
            self.latents = torch.cat([vae.encode(v) for v in videos.split(64)])
            self.identity = torch.cat([vae.encode(r) for r in refs.split(256)])
            prompts = sorted({c.prompt for c in clips})
            table = text.encode_prompts(prompts).float()
            index = {p: i for i, p in enumerate(prompts)}
            self.context = table[torch.tensor([index[c.prompt] for c in clips])]
            self.null_context = text.encode_prompts([null_prompt]).float()
        self.subject = latent_mask(np.stack([c.mask for c in clips]), preset)
        self.weight = 1.0 + subject_weight * self.subject
        self.labels = torch.tensor([c.identity for c in clips])

    def __len__(self) -> int:
        return len(self.clips)

    def batch(self, idx: torch.Tensor) -> LatentBatch:
        return LatentBatch(self.latents[idx], self.context[idx], self.identity[idx], self.weight[idx])

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator))


def synthetic_clips(
    identities: list[Identity], per_identity: int, preset: ModelPreset, seed: int = 0
) -> list[Clip]:
    """`per_identity` clips of each identity at the preset's size (directions/backgrounds cycled)."""
    dirs, bgs = list(DIRECTIONS), list(BACKGROUNDS)
    clips = []
    for ident in identities:
        for k in range(per_identity):
            combo = (ident.index + k) % 16  # every prompt appears for many identities
            clips.append(
                render_clip(
                    ident,
                    seed * 100_000 + k,
                    size=preset.width,
                    num_frames=preset.num_frames,
                    reference_size=preset.reference_size,
                    direction=dirs[combo % 4],
                    background=bgs[combo // 4],
                )
            )
    return clips


def train_tiny(
    recipe: str,
    out: Path,
    *,
    seed: int = 0,
    schedule: TinySchedule | None = None,
    preset_name: str = "tiny",
) -> Path:
    """Stage 0 (VAE), 1 (base T2V), 2 (`recipe` on the identity branch) → `out` (safetensors)."""

    sched = schedule or TinySchedule()
    preset = get_preset(preset_name)
    started = time.perf_counter()
    # The tiny model's ops are so small that a second OpenMP thread costs more in
    # synchronisation than it gains (10x slower on a loaded 2-core machine): one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny(recipe, out, seed, sched, preset, started)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(
    recipe: str, out: Path, seed: int, sched: TinySchedule, preset: ModelPreset, started: float
) -> Path:
    from standin.pipeline import WAN_NEGATIVE_PROMPT

    torch.manual_seed(seed)
    train_ids, _ = tiny_identities()
    clips = synthetic_clips(train_ids, sched.clips_per_identity, preset, seed)
    text = TextEncoder.tiny(TEXT_ENCODER_SEED, config=preset.text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit, vae = WanDiT(preset.dit), WanVAE(preset.vae)

    log.info("stage 0: VAE on %d clips (load average %s)", len(clips), os.getloadavg())
    vae_stats = fit_vae(
        vae,
        np.stack([c.video for c in clips]),
        np.stack([c.reference for c in clips[:: sched.clips_per_identity]]),
        steps=sched.vae_steps,
        batch_size=sched.vae_batch,
        seed=seed,
    )
    data = SyntheticLatents(clips, vae, text, preset, WAN_NEGATIVE_PROMPT, sched.subject_weight)
    timings = {"vae_s": time.perf_counter() - started}

    log.info("stage 1: base text-to-video")
    train(
        dit, data, TrainConfig("base", sched.base_steps, sched.batch_size, sched.lr, seed=seed, log_every=500)
    )
    timings["base_s"] = time.perf_counter() - started - sum(timings.values())

    log.info("stage 2: identity branch, recipe %s", recipe)
    stage2 = TrainConfig(
        recipe,
        sched.identity_steps,
        sched.batch_size,
        sched.lr,
        seed=seed + 1,
        reference_dropout=sched.reference_dropout if recipe == "demo" else 0.0,
        log_every=500,
    )
    last = train(dit, data, stage2)
    timings["identity_s"] = time.perf_counter() - started - sum(timings.values())
    metadata = {
        "recipe": recipe,
        "seed": seed,
        "text_encoder_seed": TEXT_ENCODER_SEED,
        "video": f"{preset.width}x{preset.height}x{preset.num_frames}",
        "schedule": sched.__dict__,
        "vae_mse": vae_stats,
        "final_loss": last.get("loss"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        # the machine's load while training (the timings above depend on it)
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    save_tiny_weights(out, dit, vae, metadata)
    log.info("wrote %s in %.0fs", out, time.perf_counter() - started)
    return out
