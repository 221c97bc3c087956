"""What every `generate` command line shares (text-to-video, face swap, VACE control): the request
from the flags, reading input files, the face preprocessor, the pipeline, writing the MP4."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from standin.attention import configure_attention
from standin.config import DTYPES
from standin.experts import SAMPLING_OPTIONS
from standin.face import FaceConfig, FacePreprocessor
from standin.forward_plan import ForwardPlan, compiled_blocks
from standin.pipeline import GenerationParams, ProgressCallback, StandInPipeline
from standin.presets import PRESETS, get_preset
from standin.video import encode_mp4

log = logging.getLogger("standin")

__all__ = [
    "face_preprocessor",
    "generation_params",
    "load_pipeline",
    "progress_bar",
    "read_input",
    "write_video",
]


def generation_params(args: argparse.Namespace) -> GenerationParams:
    """The request of a `generate` command line: the preset's defaults, a two-expert preset's
    named sampling option (`--sampling`), then the flags the user gave."""
    preset = get_preset(args.preset)
    option = SAMPLING_OPTIONS[args.sampling] if getattr(args, "sampling", None) else None
    guidance_low = getattr(args, "guidance_low", None)
    if preset.experts is None and (
        option is not None or guidance_low is not None or getattr(args, "lora_low", [])
    ):
        raise SystemExit(
            "error: --sampling, --guidance-low and --lora-low apply to two-expert presets "
            f"({', '.join(n for n in sorted(PRESETS) if PRESETS[n].experts)}), not {preset.name}"
        )
    explicit = getattr(args, "explicit", set())
    guidance, shift, steps = args.guidance, args.shift, args.steps
    if option is not None:
        guidance = guidance if "guidance" in explicit else option.guidance_high
        shift = shift if "shift" in explicit else option.shift
        steps = steps or option.num_steps
        if guidance_low is None and "guidance" not in explicit:
            guidance_low = option.guidance_low
    if preset.experts is not None and guidance_low is None:
        guidance_low = guidance
    return GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width or preset.width,
        height=args.height or preset.height,
        num_frames=args.frames or preset.num_frames,
        num_steps=steps or preset.num_steps,
        guidance_scale=guidance,
        shift=shift,
        seed=args.seed,
        cfg_mode=args.cfg_mode,
        guidance_scale_low=guidance_low,
        cache=getattr(args, "cache", None),
    )


def read_input(path: Path, option: str) -> bytes:
    """The bytes of an input file named by `option`; an unreadable file ends the command."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read {option}: {e}") from None


def face_preprocessor(args: argparse.Namespace) -> FacePreprocessor:
    """The reference preprocessor the face flags ask for."""
    return FacePreprocessor(
        FaceConfig(
            backend=args.face_backend,
            model_dir=args.face_model_dir,
            parser_weights=args.parser_weights,
            subject=args.subject,
        )
    )


def load_pipeline(args: argparse.Namespace) -> StandInPipeline:
    """The preset's pipeline on the requested device and dtype (load time logged)."""
    started = time.perf_counter()
    pipe = StandInPipeline.from_preset(
        args.preset,
        args.checkpoint_dir,
        standin_checkpoint=args.standin_checkpoint,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        standin_low_checkpoint=args.standin_low_checkpoint,
        expert_residency=args.expert_residency,
    )
    log.info("loaded %s in %.1fs on %s", args.preset, time.perf_counter() - started, pipe.device)
    configure_attention(args.attention)  # None: $STANDIN_ATTENTION, else auto
    if args.compile:
        pipe.plan = ForwardPlan(run_block=compiled_blocks())
    return pipe


@contextmanager
def progress_bar(steps: int, desc: str = "denoising") -> Iterator[ProgressCallback]:
    """A terminal progress bar over the denoising steps, as the pipeline's progress callback."""
    with tqdm(total=steps, desc=desc, unit="step", file=sys.stderr) as bar:
        yield lambda done, total: bar.update(1)


def write_video(output: Path, video: torch.Tensor, fps: float) -> Path:
    """Encode video [1, 3, F, H, W] in [-1, 1] as an MP4 at `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encode_mp4(video, fps=fps))
    return output
