"""The `standin` console script: the model-side commands of `standin.cli` plus the serving ones.

`standin serve` starts (or joins) a Ray cluster and deploys the HTTP API; `standin generate
--server URL` sends the same request through that API instead of running the model here.
Ray and the HTTP client are imported only by the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from standin import cli as model_cli
from standin.pipeline import WAN_NEGATIVE_PROMPT

if TYPE_CHECKING:
    from serve_app.client import VideoClient

log = logging.getLogger("standin")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = model_cli.build_parser()
    parser.description = __doc__
    gen = sub.choices["generate"]
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
    srv.add_argument(
        "--profile",
        choices=["cpu", "gpu", "gpu-wan2.2", "gpu-vace"],
        help="gpu: the packaged Wan2.1 14B, SP=8 profile; gpu-wan2.2: Wan2.2 A14B (two experts), SP=8; "
        "gpu-vace: Wan2.1-VACE 14B (control videos), SP=8",
    )
    srv.add_argument("--address", help="join this running Ray cluster instead of starting one")
    srv.add_argument("--host", help="HTTP host (default: the config's)")
    srv.add_argument("--port", type=int, help="HTTP port (default: the config's)")
    srv.add_argument("--num-cpus", type=float, help="CPUs of the local cluster (default: all)")
    srv.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the deployment")
    return parser


def generate_remote(args: argparse.Namespace) -> Path:
    """The same request, through the HTTP API: multipart upload, poll with a progress bar, download."""
    import httpx

    from serve_app.client import ServerError, VideoClient

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise

    size = None
    if args.width or args.height:
        if not (args.width and args.height):
            raise SystemExit("error: with --server give both --width and --height")
        size = f"{args.width}x{args.height}"
    swap = getattr(args, "video", None) is not None  # size, frames and fps come from the video
    cache = getattr(args, "cache", None)  # --cache KIND[:THRESHOLD], a StepCache
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
        "cache": None if cache is None else json.dumps({"kind": cache.kind, "threshold": cache.threshold}),
    }
    if swap:
        fields["fps"] = None
        fields["denoising_strength"] = args.denoising_strength
        fields["background_consistency"] = "true" if args.background_consistency else None
    if getattr(args, "control_video", None) is not None:  # VACE: size and frames come from the control
        fields["vace_scale"] = args.vace_scale
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
        videos = _video_files(args)
        video = client.create(args.prompt, image, videos, **fields)
        log.info("submitted %s to %s", video["id"], args.server)
        with tqdm(total=100, desc="generating", unit="%", file=sys.stderr) as bar:

            def show(v: dict) -> None:
                bar.update(v["progress"] - bar.n)
                bar.set_postfix_str(v["status"])

            client.wait(video["id"], show)
        return client.download(video["id"], args.output)


def _video_files(args: argparse.Namespace) -> dict[str, bytes]:
    """A face swap's uploads: --video (and --mask) as the input_video / input_mask file parts;
    VACE's --control-video (--control-mask, --first-frame) as control_video, … file parts."""
    files = {}
    vace = [(name, name) for name in ("control_video", "control_mask", "first_frame")]
    for option, field in (("video", "input_video"), ("mask", "input_mask"), *vace):
        path = getattr(args, option, None)
        if path is None:
            continue
        try:
            files[field] = path.read_bytes()
        except OSError as e:
            raise SystemExit(f"error: cannot read --{option.replace('_', '-')}: {e}") from None
    return files


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
    model_cli.configure_logging(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "generate" and args.server:
        print(f"wrote {generate_remote(args)}")
        return 0
    return model_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
