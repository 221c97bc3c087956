"""`standin generate --video IN.mp4 --image FACE.jpg --prompt …`: face swap from the command line.

The options are added to the `generate` subcommand of :mod:`standin.cli`; with ``--video`` the
image is the face to put into the video, and the output has the input's size (centre-cropped to
multiples of 16), its largest 4k + 1 frames and its frame rate. A bad video or mask raises
`InvalidVideoError`, which the CLI prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from standin.errors import InvalidRequestError
from standin.face_swap_request import (
    FaceSwapOptions,
    face_swap_params,
    generate_face_swap,
    prepare_face_swap,
)
from standin.generate_args import (
    face_preprocessor,
    generation_params,
    load_pipeline,
    progress_bar,
    read_input,
    write_video,
)
from standin.image_io import decode_image
from standin.sdedit import DEFAULT_DENOISING_STRENGTH
from standin.video import DEFAULT_FPS
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
    base = generation_params(args)  # size and frames: the preset's, until the video replaces them
    base.validate()  # fail before decoding or loading anything
    face = face_preprocessor(args)
    image = decode_image(read_input(args.image, "--image"), face.config.limits)
    mask = read_input(args.mask, "--mask") if args.mask is not None else None
    video, reference = prepare_face_swap(read_input(args.video, "--video"), image, face, mask, VideoLimits())
    params = face_swap_params(base, video)
    params.validate()
    pipe = load_pipeline(args)
    with progress_bar(params.num_steps, "face swap") as progress:
        out = generate_face_swap(pipe, params, video, reference.to_array(), options, progress=progress)
    return write_video(args.output, out, video.fps)
