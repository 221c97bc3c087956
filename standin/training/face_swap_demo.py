"""The tiny face-swap demonstration: a held-out glyph's video, its subject swapped for another
held-out glyph with a supplied mask (subject "object": the reference is pasted into the mask,
then SDEdit with the reference as identity and background consistency).

`python -m standin.training.face_swap_demo docs/images/tiny_face_swap_strip.png` draws the README
strip: per row, input frames 0, 2, 4 | reference | output frames 0, 2, 4.
"""

from __future__ import annotations

import numpy as np
import torch

from standin.face_swap_request import FaceSwapOptions, FaceSwapVideo, generate_face_swap, paste_into_mask
from standin.pipeline import GenerationParams, StandInPipeline
from standin.training.synthetic import Clip, render_clip, render_reference
from standin.training.tiny_recipe import tiny_identities
from standin.video import to_uint8_frames

PROMPT = "moves right on navy"


def glyph_swap_case(pair: int, num_frames: int = 5, size: int = 32) -> tuple[FaceSwapVideo, np.ndarray, Clip]:
    """Held-out glyph 2·pair moving right on navy (the input), held-out glyph 2·pair + 1's
    reference (uint8 [32, 32, 3]) pasted into the subject mask → (prepared video, reference, clip)."""
    _, held = tiny_identities()
    clip = render_clip(
        held[2 * pair], 3, size=size, num_frames=num_frames, direction="right", background="navy"
    )
    reference = render_reference(held[2 * pair + 1], 32)
    masks = clip.mask.astype(np.uint8) * 255
    pasted = paste_into_mask(clip.video, reference, masks)
    return FaceSwapVideo(pasted, masks, 16.0, "user", ("mask",) * num_frames), reference, clip


def demo_params() -> GenerationParams:
    """8 steps, guidance 3, seed 1 (the tiny model's best guidance, see standin.training.quality)."""
    return GenerationParams(prompt=PROMPT, num_steps=8, guidance_scale=3.0, seed=1)


def swap_strip(pipe: StandInPipeline, pairs: range = range(4), scale: int = 4) -> np.ndarray:
    """The README strip, uint8 RGB: one row per pair, input | reference | output (frames 0, 2, 4)."""
    rows = []
    for pair in pairs:
        video, reference, clip = glyph_swap_case(pair)
        out = generate_face_swap(pipe, demo_params(), video, reference, FaceSwapOptions(0.85, True))
        frames = to_uint8_frames(out)
        size = clip.video.shape[1]
        gap = np.full((size, 4, 3), 255, np.uint8)
        parts = [*clip.video[::2], gap, reference, gap, *frames[::2]]
        rows.append(np.concatenate(parts, axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    strip = np.concatenate(rows[:-1], axis=0)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(prog="python -m standin.training.face_swap_demo")
    parser.add_argument("out", help="PNG to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = StandInPipeline.from_preset("tiny", device="cpu")
    Image.fromarray(swap_strip(pipe)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
