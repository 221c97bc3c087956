"""What the Serve tests share: deploying an app on the session's cluster, upload files, and
waiting for a job through the HTTP API."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
from PIL import Image

from standin.video import encode_mp4

TERMINAL = ("completed", "failed", "cancelled")


def wait_done(
    client: httpx.Client, video_id: str, timeout: float = 180.0, prefix: str = ""
) -> dict[str, Any]:
    """Poll GET /v1/videos/{id} until the job ends → its video object (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    v: dict[str, Any] = {}
    while time.monotonic() < deadline:
        v = client.get(f"{prefix}/v1/videos/{video_id}").json()
        if v["status"] in TERMINAL:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{video_id} did not finish in {timeout}s: {v}")


@contextlib.contextmanager
def deployed_app(
    name: str, prefix: str, args: dict[str, Any], deployments: list[dict[str, Any]] | None = None
) -> Iterator[None]:
    """`build_app(args)` running under `prefix` on the session's cluster (the `ray_serve` fixture),
    deleted afterwards: every Serve test module shares that cluster."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(args, deployments=deployments), name=name, route_prefix=prefix)
    try:
        yield
    finally:
        serve.delete(name)


def mp4_bytes(frames: np.ndarray, fps: float = 12.0) -> bytes:
    """uint8 [F, H, W, 3] → a lossless MP4 upload."""
    return encode_mp4(np.ascontiguousarray(frames), fps=fps, crf=0, preset="ultrafast")


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
