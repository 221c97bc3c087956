"""The tiny preset's VACE branch: the glyph follows a control track (`standin train --recipe vace`).

The control video of a synthetic clip is its subject's silhouette (white glyph on black, frame by
frame): it gives where the glyph is in every frame, which the prompt ("moves left on navy") does
not (the start position is random). The shipped tiny DiT (base + identity LoRA) stays frozen;
only the VACE branch trains, with the flow-matching loss of the clip given its prompt, its
reference (dropped for some examples) and its control context. As the official VACE, the
VACE blocks start as copies of the DiT blocks they run beside and the projections start at zero
(hints start at zero: the model starts as the plain one).

Output: `standin/weights/tiny_vace.safetensors` (official VACE key names, fp16, ~0.2 MB).
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
from standin.pipeline import WAN_NEGATIVE_PROMPT, StandInPipeline
from standin.presets import get_preset
from standin.scheduler import DEFAULT_SHIFT
from standin.training.synthetic import Clip
from standin.training.tiny_recipe import SyntheticLatents, synthetic_clips, tiny_identities
from standin.training.trainer import TrainConfig, lr_at, sample_sigmas
from standin.vace import TINY_VACE_WEIGHTS, VaceBranch, VaceInputs, save_tiny_vace, vace_call
from standin.vace_conditioning import fold_mask
from standin.vae import WanVAE

log = logging.getLogger(__name__)


@dataclass
class VaceSchedule:
    """The tiny VACE run (the defaults produced the shipped file)."""

    identities: int = 200  # train identities used (of 200)
    clips_per_identity: int = 4
    steps: int = 2500
    batch_size: int = 48
    lr: float = 2e-3
    reference_dropout: float = 0.15
    prompt_dropout: float = 0.1
    subject_weight: float = 2.0


def silhouette_frames(clip: Clip) -> np.ndarray:
    """The clip's control video: its subject mask as white on black, uint8 [F, H, W, 3]."""
    return np.repeat((clip.mask.astype(np.uint8) * 255)[..., None], 3, axis=3)


@torch.no_grad()
def silhouette_contexts(vae: WanVAE, clips: list[Clip], chunk: int = 64) -> torch.Tensor:
    """VACE contexts [N, 96, F', h, w] of the clips' silhouettes without a mask video (all ones:
    inactive = encode(0), reactive = encode(video)); equal to `encode_control` per clip, batched."""
    videos = torch.from_numpy(np.stack([silhouette_frames(c) for c in clips])).permute(0, 4, 1, 2, 3)
    videos = videos.float() / 127.5 - 1.0  # [N, 3, F, H, W]
    reactive = torch.cat([vae.encode(v) for v in videos.split(chunk)])
    inactive = vae.encode(torch.zeros_like(videos[:1])).expand_as(reactive)
    n, _, f, h, w = videos.shape
    mask = fold_mask(torch.ones(1, f, h, w), reactive.shape[2]).expand(n, -1, -1, -1, -1)
    return torch.cat([inactive, reactive, mask], dim=1)


def init_branch(dit: WanDiT, seed: int) -> VaceBranch:
    """A VACE branch whose blocks copy the DiT blocks they sit beside; projections zero."""
    cfg = dit.config
    vace_cfg = get_preset("tiny").vace
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        branch = VaceBranch(cfg, vace_cfg)
    for j, layer in enumerate(vace_cfg.layers):
        own = dit.blocks[layer].state_dict()
        base = {k: v for k, v in own.items() if "_loras." not in k}
        branch.vace_blocks[j].load_state_dict(base, strict=False)
    for block in branch.vace_blocks:
        for name in ("before_proj", "after_proj"):
            if hasattr(block, name):
                torch.nn.init.zeros_(getattr(block, name).weight)
                torch.nn.init.zeros_(getattr(block, name).bias)
    return branch


def train_vace(out: Path = TINY_VACE_WEIGHTS, *, seed: int = 0, schedule: VaceSchedule | None = None) -> Path:
    """Train the tiny VACE branch on the shipped tiny model → `out`. One CPU thread."""
    sched = schedule or VaceSchedule()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small for a second thread
    try:
        return _train(out, seed, sched)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, seed: int, sched: VaceSchedule) -> Path:
    started = time.perf_counter()
    pipe = StandInPipeline.from_preset("tiny", device="cpu", dtype=torch.float32)
    dit, preset = pipe.dit, pipe.preset
    train_ids, _ = tiny_identities()
    clips = synthetic_clips(train_ids[: sched.identities], sched.clips_per_identity, preset, seed=seed + 11)
    data = SyntheticLatents(
        clips, pipe.vae, pipe.text_encoder, preset, WAN_NEGATIVE_PROMPT, sched.subject_weight
    )
    contexts = silhouette_contexts(pipe.vae, clips)
    log.info("vace: %d clips encoded in %.0fs", len(clips), time.perf_counter() - started)

    branch = init_branch(dit, seed)
    branch.train().requires_grad_(True)
    dit.eval().requires_grad_(False)
    params = list(branch.parameters())
    opt = torch.optim.AdamW(params, lr=sched.lr, betas=(0.9, 0.99), weight_decay=0.01)
    cfg = TrainConfig("demo", sched.steps, sched.batch_size, sched.lr, warmup=50, seed=seed)
    gen = torch.Generator().manual_seed(seed * 1000 + 5)
    running = 0.0
    for step in range(sched.steps):
        idx = torch.randint(len(data), (sched.batch_size,), generator=gen)
        batch = data.batch(idx)
        ctx = batch.context.clone()
        drop = torch.rand(len(idx), generator=gen) < sched.prompt_dropout
        ctx[drop] = data.null_context.to(ctx)
        sigma = sample_sigmas(len(idx), DEFAULT_SHIFT, gen)
        noise = torch.randn(batch.latents.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * batch.latents + s * noise
        target = noise - batch.latents
        use_ref = torch.rand(len(idx), generator=gen) >= sched.reference_dropout
        pred = torch.empty_like(target)
        for flag in (True, False):  # an identity cache is per request: with and without apart
            sub = torch.nonzero(use_ref == flag).flatten()
            if len(sub) == 0:
                continue
            cache = None
            if flag:
                with torch.no_grad():
                    cache = dit.identity_cache(batch.identity[sub], noisy.shape)
            call = vace_call(dit, branch, VaceInputs(contexts[idx[sub]], 1.0), cache)
            pred[sub] = call(noisy[sub], sigma[sub] * 1000, ctx[sub])
        w = batch.weight.expand_as(target)
        loss = ((pred - target).pow(2) * w).flatten(1).sum(1).div(w.flatten(1).sum(1)).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step == sched.steps - 1:
            log.info("vace step %d/%d  loss %.4f  (%.0fs)", step + 1, sched.steps, running,
                     time.perf_counter() - started)
    branch.eval().requires_grad_(False)
    metadata = {
        "recipe": "vace",
        "seed": seed,
        "schedule": sched.__dict__,
        "final_loss": running,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    save_tiny_vace(out, branch, metadata)
    log.info("wrote %s in %.0fs", out, time.perf_counter() - started)
    return out


# -- evaluation: does the glyph follow the control track? --------------------------------------


def held_out_clips(count: int, seed: int = 3) -> list[Clip]:
    """One clip of each of the first `count` held-out identities (never trained on)."""
    _, held_out = tiny_identities()
    return synthetic_clips(held_out[:count], 1, get_preset("tiny"), seed=seed)


def foreground_centroids(
    video: np.ndarray, background: tuple[int, int, int], threshold: float = 60
) -> np.ndarray:
    """[F, H, W, 3] uint8 → [F, 2] (row, column) centroids of the pixels far from `background`
    (NaN where a frame has none)."""
    far = np.linalg.norm(video.astype(float) - np.asarray(background, float), axis=-1) > threshold
    out = np.full((video.shape[0], 2), np.nan)
    for f, m in enumerate(far):
        ys, xs = np.nonzero(m)
        if len(ys):
            out[f] = ys.mean() + 0.5, xs.mean() + 0.5
    return out


def mask_centroids(mask: np.ndarray) -> np.ndarray:
    """[F, H, W] bool → [F, 2] (row, column) centroids."""
    return np.stack([np.argwhere(m).mean(0) + 0.5 for m in mask])


def centroid_error(video: np.ndarray, clip: Clip) -> float:
    """Mean distance (pixels) between the generated subject's and the control's centroids; a frame
    without a subject counts as half the frame's side."""
    from standin.training.synthetic import BACKGROUNDS

    got = foreground_centroids(video, BACKGROUNDS[clip.background])
    dist = np.linalg.norm(got - mask_centroids(clip.mask), axis=1)
    return float(np.where(np.isnan(dist), video.shape[1] / 2, dist).mean())


def identity_colour_score(video: np.ndarray, clip: Clip) -> float:
    """Colour-histogram intersection of the generated foreground with the reference's (1 = same)."""
    from standin.training.quality import colour_histogram, reference_foreground, video_foreground
    from standin.training.synthetic import BACKGROUNDS

    fg = video_foreground(video, BACKGROUNDS[clip.background])
    if len(fg) == 0:
        return 0.0
    ref = colour_histogram(reference_foreground(clip.reference))
    return float(np.minimum(colour_histogram(fg), ref).sum())


@torch.no_grad()
def follow_videos(
    pipe: StandInPipeline, clips: list[Clip], control: bool, seed: int = 0, vace_scale: float = 1.0
) -> list[np.ndarray]:
    """One uint8 [F, H, W, 3] video per clip: its prompt and reference, with its silhouette as the
    control video (`control`) or without (the baseline)."""
    from standin.pipeline import GenerationParams
    from standin.vace_conditioning import control_from_arrays
    from standin.vace_pipeline import generate_with_control
    from standin.video import to_uint8_frames

    p = pipe.preset
    out = []
    for clip in clips:
        params = GenerationParams(
            clip.prompt, width=p.width, height=p.height, num_frames=p.num_frames,
            num_steps=p.num_steps, guidance_scale=3.0, seed=seed,
        )
        if control:
            ctrl = control_from_arrays(silhouette_frames(clip))
            video = generate_with_control(pipe, params, ctrl, clip.reference, vace_scale)
        else:
            video = pipe.generate(params, clip.reference)
        out.append(to_uint8_frames(video))
    return out


def control_strip(pipe: StandInPipeline, clips: list[Clip], scale: int = 4) -> np.ndarray:
    """README figure, one row per clip: reference | control frames | generated frames. uint8 RGB."""
    videos = follow_videos(pipe, clips, control=True)
    size = clips[0].video.shape[1]
    gap = np.full((size, 4, 3), 255, np.uint8)
    rows = []
    for clip, video in zip(clips, videos, strict=True):
        parts = [clip.reference, gap, *silhouette_frames(clip), gap, *video]
        rows.append(np.concatenate(parts, axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> None:
    """`python -m standin.training.vace_recipe [strip.png]`: centroid-following metrics of the
    shipped tiny VACE branch (and the README's control | output strip)."""
    import argparse
    import json

    from PIL import Image

    parser = argparse.ArgumentParser(prog="python -m standin.training.vace_recipe")
    parser.add_argument("strip", nargs="?", help="write the README strip PNG here")
    parser.add_argument("--identities", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = StandInPipeline.from_preset("tiny", device="cpu")
    clips = held_out_clips(args.identities)
    report = {}
    for name, control in (("control", True), ("baseline", False)):
        videos = follow_videos(pipe, clips, control)
        pairs = list(zip(videos, clips, strict=True))
        report[name] = {
            "centroid_error_px": float(np.mean([centroid_error(v, c) for v, c in pairs])),
            "identity_colour": float(np.mean([identity_colour_score(v, c) for v, c in pairs])),
        }
    print(json.dumps(report, indent=1))
    if args.strip:
        Image.fromarray(control_strip(pipe, clips[:4])).save(args.strip, optimize=True)
        print(f"wrote {args.strip}")


if __name__ == "__main__":
    main()
