"""`standin generate --video IN.mp4 --image FACE.jpg --prompt …`: face swap from the command line.

The options are added to the `generate` subcommand of :mod:`standin.cli`; with ``--video`` the
image is the face to put into the video, and the output has the input's size (centre-cropped to
multiples of 16), its largest 4k + 1 frames and its frame rate. A bad video or mask raises
`InvalidVideoError`, which the CLI prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from standin.config import DTYPES
from standin.errors import InvalidRequestError
from standin.face import FaceConfig, FacePreprocessor
from standin.face_swap_request import (
    FaceSwapOptions,
    face_swap_params,
    generate_face_swap,
    prepare_face_swap,
)
from standin.image_io import decode_image
from standin.pipeline import GenerationParams, StandInPipeline
from standin.presets import get_preset
from standin.sdedit import DEFAULT_DENOISING_STRENGTH
from standin.video import DEFAULT_FPS, encode_mp4
from standin.video_input import VideoLimits

log = logging.getLogger(__name__)

__all__ = ["add_face_swap_arguments", "run_face_swap"]


def add_face_swap_arguments(gen: argparse.ArgumentParser) -> None:
    """Add ``--video``, ``--mask``, ``--denoising-strength``, ``--background-consistency``."""
    group = gen.add_argument_group("face swap (with --video; --image is the face to put in)")
    group.add_argument(
        "--video", type=Path, help="input video (MP4/MOV/MKV/WebM): swap its face for --image's"
    )
    group.add_argument(
        "--mask",
        type=Path,
        help="mask video (white = face, same size and frames), used instead of the detected one",
    )
    group.add_argument(
        "--denoising-strength",
        type=float,
        default=DEFAULT_DENOISING_STRENGTH,
        help="SDEdit strength in (0, 1]: how much of the input is re-generated (default 0.85)",
    )
    group.add_argument(
        "--background-consistency",
        action="store_true",
        help="keep the input outside the face mask exactly (re-imposed after every step)",
    )


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read {option}: {e}") from None


def run_face_swap(args: argparse.Namespace) -> Path:
    """The `generate` command with ``--video``: writes the MP4 and returns its path."""
    if args.image is None:
        raise InvalidRequestError("--video needs --image: the face to put into the video")
    given = [f"--{n}" for n in ("width", "height", "frames") if getattr(args, n, None) is not None]
    if given:
        names = ", ".join(given)
        raise InvalidRequestError(f"{names}: with --video the size and frame count come from the video")
    if args.mask is None and args.subject == "object":
        log.warning("--subject object without --mask: nothing is pasted, the video is only re-noised")
    if args.fps != DEFAULT_FPS:
        log.warning("--fps is ignored with --video: the output keeps the input's frame rate")
    options = FaceSwapOptions(args.denoising_strength, args.background_consistency)
    options.validate()
    preset = get_preset(args.preset)
    base = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=preset.width,
        height=preset.height,
        num_frames=preset.num_frames,
        num_steps=args.steps or preset.num_steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        seed=args.seed,
        cfg_mode=args.cfg_mode,
    )
    base.validate()  # fail before decoding or loading anything
    face = FacePreprocessor(
        FaceConfig(
            backend=args.face_backend,
            model_dir=args.face_model_dir,
            parser_weights=args.parser_weights,
            subject=args.subject,
        )
    )
    image = decode_image(_read(args.image, "--image"), face.config.limits)
    mask = _read(args.mask, "--mask") if args.mask is not None else None
    video, reference = prepare_face_swap(_read(args.video, "--video"), image, face, mask, VideoLimits())
    params = face_swap_params(base, video)
    params.validate()
    started = time.perf_counter()
    pipe = StandInPipeline.from_preset(
        args.preset,
        args.checkpoint_dir,
        standin_checkpoint=args.standin_checkpoint,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    log.info("loaded %s in %.1fs on %s", args.preset, time.perf_counter() - started, pipe.device)
    with tqdm(total=params.num_steps, desc="face swap", unit="step", file=sys.stderr) as bar:
        out = generate_face_swap(
            pipe, params, video, reference.to_array(), options, progress=lambda done, total: bar.update(1)
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(encode_mp4(out, fps=video.fps))
    return args.output
