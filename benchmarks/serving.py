"""Serving overhead: one request through HTTP + Ray Serve vs the same work as a direct call.

    python -m benchmarks.serving                 # starts a private Ray cluster + the app (SP=1)
    python -m benchmarks.serving --url URL       # against a running server (its SP degree!)

Both paths do the same work for the same request (tiny preset, same size, frames, steps, seed,
reference photo): the direct path runs face preprocessing → `StandInPipeline.generate` → MP4
encoding in this process; the served path is `POST /v1/videos` → Server-Sent Events until
`completed` → `GET /content`. The app is deployed with one DiT rank so that the denoising work
is identical, and the difference is what serving adds: HTTP, the job store, the hops between
deployments, and the Preprocessor / DiT / Decoder split. Runs alternate (direct, served, …)
after one warm-up of each, and the headline is the median of per-pair ratios (load on a shared
machine drifts; pairing cancels most of it). Results: benchmarks/results/<name>.json + .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    pyplot,
    result_header,
    result_path,
    save_figure,
    summarize,
    timestamp,
    write_result,
)
from benchmarks.load import TERMINAL, VideoClient
from parallel.rendezvous import free_port

log = logging.getLogger(__name__)

FACE = Path(__file__).resolve().parent.parent / "tests" / "data" / "faces" / "astronaut.jpg"


def wait_for_events(base_url: str, video_id: str, timeout: float) -> dict[str, Any]:
    """Follow `GET /v1/videos/{id}/events` until a terminal event; → the final video object."""
    url = f"{base_url.rstrip('/')}/v1/videos/{video_id}/events"
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=timeout) as stream:
        event = None
        for raw in stream:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in TERMINAL:
                return json.loads(line.split(":", 1)[1])
            if time.monotonic() > deadline:
                break
    raise TimeoutError(f"no terminal event for {video_id} within {timeout:g}s")


def variant(fields: dict[str, str], image: bytes, run: int) -> tuple[dict[str, str], bytes]:
    """The request of run `run`: a distinct prompt and distinct image bytes (same pixels)."""
    return {**fields, "prompt": f"{fields['prompt']} (run {run})"}, image + f"run {run}".encode()


def served_once(base_url: str, fields: dict[str, str], image: bytes, timeout: float) -> float:
    """Seconds from POST to the last byte of the MP4."""
    client = VideoClient(base_url)
    start = time.perf_counter()
    video = client.create(fields, ("face.jpg", image), timeout)
    final = wait_for_events(base_url, video["id"], timeout)
    if final.get("status") != "completed":
        raise RuntimeError(f"served request ended {final.get('status')}: {final.get('error')}")
    if not client.content(video["id"], timeout):
        raise RuntimeError("empty MP4 from the server")
    return time.perf_counter() - start


class DirectPath:
    """The same request as in-process calls: preprocess → generate → encode."""

    def __init__(self, width: int, height: int, frames: int, steps: int, seed: int) -> None:
        from standin.face import FaceConfig, FacePreprocessor
        from standin.pipeline import StandInPipeline

        self.face = FacePreprocessor(FaceConfig())
        self.pipeline = StandInPipeline.from_preset("tiny", device="cpu")
        self.settings = {
            "width": width,
            "height": height,
            "num_frames": frames,
            "num_steps": steps,
            "seed": seed,
        }

    def __call__(self, fields: dict[str, str], image: bytes) -> float:
        from standin.pipeline import GenerationParams
        from standin.video import encode_mp4

        start = time.perf_counter()
        reference = self.face.process_bytes(image).to_array()
        video = self.pipeline.generate(GenerationParams(fields["prompt"], **self.settings), reference)
        if not encode_mp4(video):
            raise RuntimeError("empty MP4")
        return time.perf_counter() - start



@contextmanager
def private_server(state_dir: Path) -> Iterator[str]:
    """A private Ray cluster serving the app with one DiT rank; torn down afterwards (only it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    try:
        port = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"sp_degree": 1, "state_dir": str(state_dir)}), name="overhead", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def measure(
    url: str, direct: DirectPath, fields: dict[str, str], image: bytes, pairs: int, timeout: float
) -> dict:
    """Warm both paths once, then `pairs` alternating (direct, served) runs."""
    direct(*variant(fields, image, -1))
    served_once(url, *variant(fields, image, -2), timeout)
    direct_s, served_s = [], []
    for run in range(pairs):
        request = variant(fields, image, run)
        direct_s.append(direct(*request))
        served_s.append(served_once(url, *request, timeout))
    ratios = [s / d for s, d in zip(served_s, direct_s, strict=True)]
    return {
        "direct_s": summarize(direct_s),
        "served_s": summarize(served_s),
        "overhead_ratio_paired_median": statistics.median(ratios),
        "overhead_ratio_of_medians": statistics.median(served_s) / statistics.median(direct_s),
        "added_seconds_median": statistics.median(s - d for s, d in zip(served_s, direct_s, strict=True)),
        "raw": {"direct_s": direct_s, "served_s": served_s},
    }


def plot(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["direct call", "HTTP + Serve"]
    medians = [report["result"]["direct_s"]["p50"], report["result"]["served_s"]["p50"]]
    ax.bar(labels, medians, color=["#4c72b0", "#dd8452"])
    ax.set_ylabel("seconds per request (median)")
    ax.set_title(f"serving overhead ×{report['result']['overhead_ratio_paired_median']:.2f} (paired)")
    return save_figure(fig, path, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start a private one with SP=1)")
    p.add_argument("--size", default="64x64", help="WxH")
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the direct path")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--name", default="serving_overhead_tiny_cpu")
    p.add_argument("--out-dir", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = timestamp()
    width, height = (int(v) for v in args.size.lower().split("x"))
    fields = {
        "prompt": "a person smiles",
        "size": args.size,
        "num_frames": str(args.num_frames),
        "num_inference_steps": str(args.steps),
        "seed": str(args.seed),
    }
    image = FACE.read_bytes()
    import torch

    torch.set_num_threads(args.threads)
    direct = DirectPath(width, height, args.num_frames, args.steps, args.seed)
    settings = {**vars(args), "out_dir": str(args.out_dir) if args.out_dir else None}
    if args.url:
        result = measure(args.url, direct, fields, image, args.pairs, args.timeout)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as state, private_server(Path(state)) as url:
            result = measure(url, direct, fields, image, args.pairs, args.timeout)
    report = {
        **result_header("serving_overhead", started, "python -m benchmarks.serving " + " ".join(argv)),
        "settings": settings,
        "result": result,
    }
    path = write_result(result_path(args.name, args.out_dir), report)
    plot(report, path.with_suffix(".png"))
    r = result
    print(
        f"direct {r['direct_s']['p50']:.2f}s  served {r['served_s']['p50']:.2f}s  "
        f"overhead ×{r['overhead_ratio_paired_median']:.2f} (paired median), "
        f"+{r['added_seconds_median']:.2f}s per request → {path}"
    )
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
