"""`standin` command line: generate a video from a face photo and a prompt, on this machine or
through a Stand-In Serve server (`--server`), run that server (`standin serve`), and train
(`standin train`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from standin.errors import StandInError
from standin.face import FaceConfig, FacePreprocessor
from standin.pipeline import WAN_NEGATIVE_PROMPT, GenerationParams, StandInPipeline
from standin.presets import PRESETS, get_preset
from standin.video import DEFAULT_FPS, encode_mp4

if TYPE_CHECKING:
    from serve_app.client import VideoClient

log = logging.getLogger("standin")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
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
        "--standin-checkpoint", type=Path, help="Stand-In LoRA file (default: in --checkpoint-dir)"
    )
    gen.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    gen.add_argument("--width", type=int, help="video width, multiple of 16 (preset default)")
    gen.add_argument("--height", type=int, help="video height, multiple of 16 (preset default)")
    gen.add_argument("--frames", type=int, help="number of frames, 4k+1 (preset default)")
    gen.add_argument("--steps", type=int, help="denoising steps (preset default)")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    gen.add_argument("--shift", type=float, default=5.0, help="flow-matching sigma shift")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg-mode", choices=["separate", "batched"], default="separate")
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
        "--server", help="generate through a Stand-In Serve server (e.g. http://127.0.0.1:8000) instead"
    )
    gen.add_argument("--api-key", help="Bearer key for --server (default: $STANDIN_API_KEY)")
    gen.add_argument("--model", help="model id for --server (default: the server's)")
    gen.add_argument(
        "--wait-ready", type=float, default=300.0, help="seconds to wait for --server to become ready"
    )

    srv = sub.add_parser("serve", help="start a local Ray cluster and serve the HTTP API")
    srv.add_argument(
        "--config", type=Path, default=Path("serve_config.yaml"), help="Ray Serve config (CPU profile)"
    )
    srv.add_argument("--profile", choices=["cpu", "gpu"], help="gpu: the packaged 14B, SP=8 profile")
    srv.add_argument("--address", help="join this running Ray cluster instead of starting one")
    srv.add_argument("--host", help="HTTP host (default: the config's)")
    srv.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    srv.add_argument("--num-cpus", type=float, help="CPUs of the local cluster (default: all)")
    srv.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the deployment")

    from standin.training.command import add_train_parser

    add_train_parser(sub)
    return parser


def generate(args: argparse.Namespace) -> Path:
    preset = get_preset(args.preset)
    params = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width or preset.width,
        height=args.height or preset.height,
        num_frames=args.frames or preset.num_frames,
        num_steps=args.steps or preset.num_steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        seed=args.seed,
        cfg_mode=args.cfg_mode,
    )
    params.validate()  # fail before loading any model
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
        try:
            data = args.image.read_bytes()
        except OSError as e:
            raise SystemExit(f"error: cannot read --image: {e}") from None
        reference = face.process_bytes(data).to_array()
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
        video = pipe.generate(params, reference, progress=lambda done, total: bar.update(1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(encode_mp4(video, fps=args.fps))
    return args.output


def generate_remote(args: argparse.Namespace) -> Path:
    """The same request, through the HTTP API: multipart upload, poll with a progress bar, download."""
    import os

    import httpx

    # Imported lazily: the local path needs no HTTP client.
    from serve_app.client import ServerError, VideoClient

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise

    size = None
    if args.width or args.height:
        if not (args.width and args.height):
            raise SystemExit("error: with --server give both --width and --height")
        size = f"{args.width}x{args.height}"
    fields = {
        "model": args.model,
        "size": size,
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "shift": args.shift,
        "seed": args.seed,
        "fps": args.fps,
        "subject": args.subject if args.image is not None else None,
        "negative_prompt": None if args.negative_prompt == WAN_NEGATIVE_PROMPT else args.negative_prompt,
    }
    api_key = args.api_key or os.environ.get("STANDIN_API_KEY")
    try:
        return _run_remote(VideoClient(args.server, api_key=api_key), args, fields)
    except (ServerError, TimeoutError, httpx.HTTPError) as e:
        raise SystemExit(f"error: {e}") from None


def _run_remote(client: VideoClient, args: argparse.Namespace, fields: dict) -> Path:
    with client:
        client.wait_ready(args.wait_ready)
        try:
            image = args.image.read_bytes() if args.image is not None else None
        except OSError as e:
            raise SystemExit(f"error: cannot read --image: {e}") from None
        video = client.create(args.prompt, image, **fields)
        log.info("submitted %s to %s", video["id"], args.server)
        with tqdm(total=100, desc="generating", unit="%", file=sys.stderr) as bar:

            def show(v: dict) -> None:
                bar.update(v["progress"] - bar.n)
                bar.set_postfix_str(v["status"])

            client.wait(video["id"], show)
        return client.download(video["id"], args.output)


def serve(args: argparse.Namespace) -> int:
    from serve_app.launcher import PROFILES, serve_main  # imports Ray; only this command needs it

    config = PROFILES.get(args.profile, args.config)
    if not config.is_file():
        raise SystemExit(f"error: no Serve config at {config} (pass --config)")
    return serve_main(
        config,
        address=args.address,
        host=args.host,
        port=args.port,
        num_cpus=args.num_cpus,
        ready_timeout_s=args.ready_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "generate":
            out = generate_remote(args) if args.server else generate(args)
            print(f"wrote {out}")
        elif args.command == "serve":
            return serve(args)
        elif args.command == "train":
            from standin.training.command import run_train

            print(f"wrote {run_train(args)}")
    except StandInError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    return 0


if __name__ == "__main__":
    sys.exit(main())
