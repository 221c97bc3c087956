"""`standin generate --control-video CTRL.mp4 …`: identity videos that follow a control video.

The options are added to the `generate` subcommand of :mod:`standin.cli`. The control video
(pose, depth, or any VACE control, already rendered as RGB frames) decides the output's size
(centre-cropped to multiples of 16) and frame count (largest 4k + 1); ``--image`` is the face
(Stand-In's identity), ``--first-frame`` an optional VACE reference image. A bad control input
raises `InvalidVideoError` / `InvalidImageError`, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from standin.errors import InvalidRequestError
from standin.generate_args import (
    face_preprocessor,
    generation_params,
    load_pipeline,
    progress_bar,
    read_input,
    write_video,
)
from standin.presets import PRESETS, get_preset
from standin.vace import DEFAULT_VACE_SCALE, check_vace_scale
from standin.vace_conditioning import control_from_bytes
from standin.vace_pipeline import generate_with_control
from standin.video_input import VideoLimits

log = logging.getLogger(__name__)

__all__ = ["add_control_arguments", "run_controlled"]


def add_control_arguments(gen: argparse.ArgumentParser) -> None:
    """Add ``--control-video``, ``--control-mask``, ``--first-frame``, ``--vace-scale``."""
    group = gen.add_argument_group("VACE control (Wan2.1-VACE presets and tiny)")
    group.add_argument(
        "--control-video", type=Path, help="control video (pose/depth/… frames): the output follows it"
    )
    group.add_argument(
        "--control-mask",
        type=Path,
        help="mask video for --control-video (white = generate, black = keep; same size, ≥ its frames)",
    )
    group.add_argument("--first-frame", type=Path, help="VACE reference image (fitted on white, prepended)")
    group.add_argument(
        "--vace-scale",
        type=float,
        default=DEFAULT_VACE_SCALE,
        help=f"strength of the control hints (default {DEFAULT_VACE_SCALE}; 0.5 keeps more identity)",
    )


def run_controlled(args: argparse.Namespace) -> Path:
    """The `generate` command with ``--control-video``: writes the MP4 and returns its path."""
    given = [f"--{n}" for n in ("width", "height", "frames") if getattr(args, n, None) is not None]
    if given:
        names = ", ".join(given)
        raise InvalidRequestError(f"{names}: with --control-video the size and frame count come from it")
    if getattr(args, "video", None) is not None:
        raise InvalidRequestError("--control-video and --video (face swap) cannot be combined")
    check_vace_scale(args.vace_scale)
    preset = get_preset(args.preset)
    if preset.vace is None:
        vace_presets = sorted(name for name, p in PRESETS.items() if p.vace is not None)
        raise InvalidRequestError(f"preset {preset.name} has no VACE branch; use one of {vace_presets}")
    params = generation_params(args)  # size and frames: the preset's, until the control replaces them
    params.validate()  # fail before decoding or loading anything
    mask = read_input(args.control_mask, "--control-mask") if args.control_mask is not None else None
    first = read_input(args.first_frame, "--first-frame") if args.first_frame is not None else None
    control = control_from_bytes(
        read_input(args.control_video, "--control-video"), mask, first, VideoLimits()
    )
    reference = None
    if args.image is not None:
        reference = face_preprocessor(args).process_bytes(read_input(args.image, "--image")).to_array()
    pipe = load_pipeline(args)
    with progress_bar(params.num_steps) as progress:
        video = generate_with_control(pipe, params, control, reference, args.vace_scale, progress=progress)
    return write_video(args.output, video, args.fps)
