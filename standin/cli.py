"""The model-side commands: generate a video from a face photo and a prompt on this machine
(`generate`), train (`train`), and convert a checkpoint to bf16 once (`convert`). Importable and
runnable without Ray or an HTTP client (`python -m standin.cli`); the installed `standin`
console script (the serving package's cli.py) adds `serve` and `generate --server` on top of
this parser."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from standin import convert
from standin.attention import CHOICES as ATTENTION_CHOICES
from standin.config import DTYPES
from standin.errors import StandInError
from standin.experts import EXPERT_RESIDENCIES, SAMPLING_OPTIONS, expert_adapters
from standin.face_swap_command import add_face_swap_arguments, run_face_swap
from standin.generate_args import (
    face_preprocessor,
    generation_params,
    load_pipeline,
    progress_bar,
    read_input,
    write_video,
)
from standin.pipeline import WAN_NEGATIVE_PROMPT
from standin.presets import PRESETS, get_preset
from standin.step_cache import StepCache, parse_step_cache
from standin.styles import load_lora_args
from standin.vace_command import add_control_arguments, run_controlled
from standin.video import DEFAULT_FPS

log = logging.getLogger("standin")


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of the model-side commands, and its subcommands (for the serving CLI to extend)."""
    parser = argparse.ArgumentParser(prog="standin", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one video locally")
    gen.add_argument("--prompt", required=True, help="what happens in the video")
    gen.add_argument("--image", type=Path, help="reference photo of the subject (omit: plain text-to-video)")
    gen.add_argument("-o", "--output", type=Path, default=Path("output.mp4"), help="MP4 file to write")
    gen.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    gen.add_argument("--checkpoint-dir", type=Path, help="Wan2.1 checkpoint directory (real presets)")
    gen.add_argument(
        "--standin-checkpoint",
        type=Path,
        help="Stand-In LoRA file (default: in --checkpoint-dir); two-expert presets: the high-noise expert's",
    )
    add_expert_arguments(gen)
    gen.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    gen.add_argument("--width", type=int, help="video width, multiple of 16 (preset default)")
    gen.add_argument("--height", type=int, help="video height, multiple of 16 (preset default)")
    gen.add_argument("--frames", type=int, help="number of frames, 4k+1 (preset default)")
    gen.add_argument("--steps", type=int, help="denoising steps (preset default)")
    gen.add_argument(
        "--guidance", type=float, default=5.0, action=_Explicit, help="classifier-free guidance scale"
    )
    gen.add_argument("--shift", type=float, default=5.0, action=_Explicit, help="flow-matching sigma shift")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg-mode", choices=["separate", "batched"], default="separate")
    gen.add_argument(
        "--cache",
        type=_step_cache,
        metavar="KIND[:THRESHOLD]",
        help="opt-in step caching, e.g. first_block:0.05 (skips most blocks of a step whose first "
        "block changed less than THRESHOLD, relative L1; faster, approximate; default off)",
    )
    gen.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frames per second of the MP4")
    gen.add_argument(
        "--subject", choices=["face", "object"], default="face", help="object: skip face detection"
    )
    gen.add_argument("--face-backend", choices=["offline", "insightface"], default="offline")
    gen.add_argument("--face-model-dir", type=Path, help="antelopev2 directory (insightface backend)")
    gen.add_argument("--parser-weights", type=Path, help="parsing_bisenet.pth (whitens the background)")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="DiT/text dtype (default: bf16 on GPU)")
    gen.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help="attention kernel (default: $STANDIN_ATTENTION, else auto: FlashAttention-3, -2 or "
        "PyTorch's flash kernel, the first installed that fits)",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks (the first step pays the compilation, ≈ 20–60 s)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a style LoRA (.safetensors; kohya, A/B, PEFT or diffusers naming) at strength SCALE "
        "(default 1, times the file's alpha/rank); repeat to stack styles",
    )
    add_face_swap_arguments(gen)
    add_control_arguments(gen)

    conv = sub.add_parser("convert", help="rewrite a checkpoint directory's DiT in bf16 once (halves reads)")
    convert.add_arguments(conv)

    from standin.training.command import add_train_parser

    add_train_parser(sub)
    return parser, sub


def _step_cache(text: str) -> StepCache:
    """`--cache first_block:0.05` → a validated `StepCache` (argparse reports a bad value)."""
    try:
        return parse_step_cache(text)
    except StandInError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Explicit(argparse.Action):
    """Stores the value and remembers that the user gave it (a named sampling option yields)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        setattr(namespace, self.dest, values)
        namespace.explicit = getattr(namespace, "explicit", set()) | {self.dest}


def add_expert_arguments(gen: argparse.ArgumentParser) -> None:
    """Options of the two-expert presets (Wan2.2 A14B, tiny-a14b)."""
    gen.add_argument(
        "--standin-low-checkpoint",
        type=Path,
        help="two-expert presets: the low-noise expert's Stand-In file (default: in --checkpoint-dir)",
    )
    gen.add_argument(
        "--sampling",
        choices=sorted(SAMPLING_OPTIONS),
        help="two-expert presets: named defaults; standin: 20 steps, shift 5, guidance 5/5; "
        "wan2.2: 40 steps, shift 12, guidance 4 (high) / 3 (low). Explicit flags win",
    )
    gen.add_argument(
        "--guidance-low",
        type=float,
        help="two-expert presets: the low-noise expert's guidance (default: --guidance)",
    )
    gen.add_argument(
        "--expert-residency",
        choices=EXPERT_RESIDENCIES,
        default="resident",
        help="two-expert presets: both DiTs on the device, or the idle one in (pinned) host memory",
    )
    gen.add_argument(
        "--lora-low",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="two-expert presets: a style as a high/low pair: --lora for the high-noise expert, "
        "--lora-low for the low-noise one (without --lora-low, --lora applies to both)",
    )


def generate(args: argparse.Namespace) -> Path:
    if getattr(args, "control_video", None) is not None:
        return run_controlled(args)
    if getattr(args, "video", None) is not None:
        return run_face_swap(args)
    params = generation_params(args)
    params.validate()  # fail before loading any model
    styles = load_lora_args(args.lora, get_preset(args.preset).dit)  # checked before loading too
    styles_low = load_lora_args(args.lora_low, get_preset(args.preset).dit) if args.lora_low else None
    reference = None
    if args.image is not None:
        reference = face_preprocessor(args).process_bytes(read_input(args.image, "--image")).to_array()
    pipe = load_pipeline(args)
    styles = styles.to(pipe.device, pipe.dit.patch_embedding.weight.dtype) if styles else None
    if styles_low is not None:  # a high/low style pair: each expert gets its own adapters
        low = styles_low.to(pipe.device, pipe.dit.patch_embedding.weight.dtype)
        styles = expert_adapters(styles, low)  # type: ignore[assignment]
    with progress_bar(params.num_steps) as progress:
        video = pipe.generate(params, reference, progress=progress, styles=styles)
    return write_video(args.output, video, args.fps)


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    """Run a model-side command; a `StandInError` is printed as one line (exit status 2)."""
    try:
        if args.command == "generate":
            print(f"wrote {generate(args)}")
        elif args.command == "convert":
            return convert.main(args)
        elif args.command == "train":
            from standin.training.command import run_train

            print(f"wrote {run_train(args)}")
    except StandInError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser()[0].parse_args(argv)
    configure_logging(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
