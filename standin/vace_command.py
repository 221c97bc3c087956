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
import sys
import time
from pathlib import Path

from tqdm import tqdm

from standin.config import DTYPES
from standin.errors import InvalidRequestError
from standin.face import FaceConfig, FacePreprocessor
from standin.pipeline import GenerationParams, StandInPipeline
from standin.presets import PRESETS, get_preset
from standin.vace import DEFAULT_VACE_SCALE, check_vace_scale
from standin.vace_conditioning import control_from_bytes
from standin.vace_pipeline import generate_with_control
from standin.video import encode_mp4
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


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read {option}: {e}") from None


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
    params = GenerationParams(
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
    params.validate()  # fail before decoding or loading anything
    mask = _read(args.control_mask, "--control-mask") if args.control_mask is not None else None
    first = _read(args.first_frame, "--first-frame") if args.first_frame is not None else None
    control = control_from_bytes(_read(args.control_video, "--control-video"), mask, first, VideoLimits())
    reference = None
    if args.image is not None:
        face = FacePreprocessor(
            FaceConfig(
                backend=args.face_backend,
                model_dir=args.face_model_dir,
                parser_weights=args.parser_weights,
                subject=args.subject,
            )
        )
        reference = face.process_bytes(_read(args.image, "--image")).to_array()
    started = time.perf_counter()
    pipe = StandInPipeline.from_preset(
        args.preset,
        args.checkpoint_dir,
        standin_checkpoint=args.standin_checkpoint,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    log.info("loaded %s in %.1fs on %s", args.preset, time.perf_counter() - started, pipe.device)
    with tqdm(total=params.num_steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        video = generate_with_control(
            pipe, params, control, reference, args.vace_scale, progress=lambda done, total: bar.update(1)
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(encode_mp4(video, fps=args.fps))
    return args.output
