"""What the Serve tests share: waiting for a job through the HTTP API."""

from __future__ import annotations

import time
from typing import Any

import httpx

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
