"""Identity metrics of a trained model on held-out synthetic identities.

- `subject_losses`: the flow-matching loss inside the subject region with the correct reference,
  with none, and with another identity's reference. A model that uses the reference ranks them
  correct < none < wrong.
- `retrieval`: sample a video per identity (the real sampler: cached identity K/V, CFG), take the
  colours of its foreground (pixels far from the prompt's background colour), and find the
  reference whose colours match best. Top-1 accuracy with the correct reference should be far
  above chance; with a swapped reference the true identity should rarely be found.
"""

from __future__ import annotations

import numpy as np
import torch

from standin.pipeline import DenoiseInputs, StandInPipeline
from standin.scheduler import FlowMatchSchedule
from standin.training.synthetic import BACKGROUNDS, Clip
from standin.training.tiny_recipe import SyntheticLatents
from standin.training.trainer import flow_matching_loss
from standin.video import to_uint8_frames

EVAL_SIGMAS = (0.35, 0.55, 0.75, 0.9)


@torch.no_grad()
def subject_losses(
    pipe: StandInPipeline, data: SyntheticLatents, shift_by: int, seed: int = 0
) -> dict[str, float]:
    """Mean subject-region loss {correct, none, wrong} over all clips of `data` at fixed noise.

    `shift_by`: the wrong reference of clip i is that of clip i + shift_by (another identity).
    """
    gen = torch.Generator().manual_seed(seed)
    batch = data.batch(torch.arange(len(data)))
    batch = batch._replace(weight=data.subject)
    wrong = batch._replace(identity=batch.identity.roll(shift_by, dims=0))
    out = {"correct": 0.0, "none": 0.0, "wrong": 0.0}
    for sigma in EVAL_SIGMAS:
        s = torch.full((len(data),), sigma)
        noise = torch.randn(batch.latents.shape, generator=gen)
        for name, b in (("correct", batch), ("none", batch._replace(identity=None)), ("wrong", wrong)):
            out[name] += float(flow_matching_loss(pipe.dit, b, s, noise).mean()) / len(EVAL_SIGMAS)
    return out


def colour_histogram(pixels: np.ndarray, bins: int = 4) -> np.ndarray:
    """uint8 [N, 3] → normalised [bins³] joint colour histogram."""
    q = (pixels.astype(np.int64) * bins) // 256
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(float)
    return hist / max(hist.sum(), 1.0)


def video_foreground(
    video: np.ndarray, background: tuple[int, int, int], threshold: float = 60
) -> np.ndarray:
    """[F, H, W, 3] uint8 → the pixels [N, 3] farther than `threshold` from the background colour."""
    px = video.reshape(-1, 3).astype(float)
    far = np.linalg.norm(px - np.asarray(background, float), axis=1) > threshold
    return video.reshape(-1, 3)[far]


def reference_foreground(reference: np.ndarray) -> np.ndarray:
    """The non-white pixels of a reference image [R, R, 3]."""
    return video_foreground(reference[None], (255, 255, 255))


@torch.no_grad()
def sample_videos(
    pipe: StandInPipeline,
    clips: list[Clip],
    references: list[np.ndarray] | None,
    seed: int = 0,
    guidance_scale: float = 3.0,
    reuse_identity_cache: bool = True,
) -> np.ndarray:
    """One video per clip (its prompt, the given reference or none) → uint8 [N, F, H, W, 3]."""
    p = pipe.preset
    gen = torch.Generator().manual_seed(seed)
    shape = (len(clips), 16, (p.num_frames - 1) // 4 + 1, p.height // 8, p.width // 8)
    prompts = [c.prompt for c in clips]
    ctx = pipe.text_encoder.encode_prompts(prompts).to(pipe.device)
    neg = pipe.text_encoder.encode_prompts([pipe_negative_prompt()] * len(clips)).to(pipe.device)
    identity = None
    if references is not None:
        identity = torch.cat([pipe.encode_identity(r) for r in references])
    inputs = DenoiseInputs(
        noise=torch.randn(shape, generator=gen),
        context=ctx,
        negative_context=neg,
        identity_latents=identity,
        schedule=FlowMatchSchedule(p.num_steps),
        guidance_scale=guidance_scale,
    )
    latents = pipe.denoise(inputs, reuse_identity_cache=reuse_identity_cache)
    video = pipe.decode(latents)
    return np.stack([to_uint8_frames(v[None]) for v in video])


def pipe_negative_prompt() -> str:
    from standin.pipeline import WAN_NEGATIVE_PROMPT

    return WAN_NEGATIVE_PROMPT


def retrieval_accuracy(
    videos: np.ndarray, clips: list[Clip], references: list[np.ndarray], truth: list[int]
) -> float:
    """Fraction of videos whose best-matching reference (colour histogram intersection) is `truth`."""
    ref_hists = np.stack([colour_histogram(reference_foreground(r)) for r in references])
    hits = 0
    for video, clip, t in zip(videos, clips, truth, strict=True):
        h = colour_histogram(video_foreground(video, BACKGROUNDS[clip.background]))
        scores = np.minimum(ref_hists, h[None]).sum(axis=1)
        hits += int(np.argmax(scores) == t)
    return hits / len(clips)


def sample_grid(pipe: StandInPipeline, clips: list[Clip], seed: int = 0, scale: int = 3) -> np.ndarray:
    """README figure, one row per clip: reference | generated | no reference | swapped reference
    (the next row's reference) and what it generates; frames 0, 2, 4 of each video. uint8 RGB."""
    refs = [c.reference for c in clips]
    swapped = refs[1:] + refs[:1]
    with_ref = sample_videos(pipe, clips, refs, seed)
    without = sample_videos(pipe, clips, None, seed)
    other = sample_videos(pipe, clips, swapped, seed)
    size = clips[0].video.shape[1]
    gap = np.full((size, 4, 3), 255, np.uint8)
    rows = []
    for i in range(len(clips)):
        parts = [refs[i], gap, *with_ref[i][::2], gap, *without[i][::2], gap, swapped[i], gap, *other[i][::2]]
        rows.append(np.concatenate(parts, axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> None:
    """`python -m standin.training.quality [grid.png]`: held-out metrics of the shipped tiny model
    (and the README's sample grid)."""
    import argparse
    import json

    from PIL import Image

    from standin.pipeline import WAN_NEGATIVE_PROMPT
    from standin.training.tiny_recipe import SyntheticLatents, synthetic_clips, tiny_identities

    parser = argparse.ArgumentParser(prog="python -m standin.training.quality")
    parser.add_argument("grid", nargs="?", help="write the sample grid PNG here")
    parser.add_argument("--identities", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = StandInPipeline.from_preset("tiny", device="cpu")
    _, held_out = tiny_identities()
    clips = synthetic_clips(held_out[: args.identities], 1, pipe.preset, seed=7)
    data = SyntheticLatents(clips, pipe.vae, pipe.text_encoder, pipe.preset, WAN_NEGATIVE_PROMPT)
    refs, truth = [c.reference for c in clips], list(range(len(clips)))
    report: dict = {"subject_loss": subject_losses(pipe, data, shift_by=1), "chance": 1 / len(clips)}
    for g in (1.0, 3.0, 5.0):
        right = retrieval_accuracy(sample_videos(pipe, clips, refs, 1, g), clips, refs, truth)
        wrong = retrieval_accuracy(sample_videos(pipe, clips, refs[1:] + refs[:1], 1, g), clips, refs, truth)
        report[f"top1_guidance_{g:g}"] = {"correct_reference": right, "swapped_reference": wrong}
    print(json.dumps(report, indent=1))
    if args.grid:
        Image.fromarray(sample_grid(pipe, clips[:6], seed=1)).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
