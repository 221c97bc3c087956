"""A small synchronous client for the /v1/videos API (used by `standin generate --server`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from serve_app.jobs import TERMINAL

log = logging.getLogger(__name__)


class ServerError(Exception):
    """The server answered with an error (OpenAI error shape) or a job failed."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}" + (f" ({code})" if code else ""))
        self.status = status
        self.code = code


class VideoClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> VideoClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            err = response.json()["error"]
            raise ServerError(response.status_code, err.get("message", ""), err.get("code"))
        except (ValueError, KeyError, TypeError):
            raise ServerError(response.status_code, response.text[:500]) from None

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Poll GET /healthz until the whole application is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.http.base_url} not ready after {timeout_s:g}s")
            time.sleep(1.0)

    def create(
        self,
        prompt: str,
        image: Path | bytes | None = None,
        videos: dict[str, bytes] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """POST /v1/videos: multipart with the image file, JSON without one (None fields left out).
        `videos`: a face swap's {"input_video": bytes, "input_mask": bytes} file parts."""
        data = {"prompt": prompt, **{k: str(v) for k, v in fields.items() if v is not None}}
        if image is None and not videos:
            return self._check(self.http.post("/v1/videos", json=_typed(data))).json()
        octets = "application/octet-stream"
        files = {name: (name, content, octets) for name, content in (videos or {}).items()}
        if image is not None:
            content = image.read_bytes() if isinstance(image, Path) else image
            name = image.name if isinstance(image, Path) else "reference"
            files["input_reference"] = (name, content, octets)
        return self._check(self.http.post("/v1/videos", data=data, files=files)).json()

    def get(self, video_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/videos/{video_id}")).json()

    def wait(
        self,
        video_id: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the job ends; raise ServerError if it did not complete."""
        deadline = time.monotonic() + timeout_s
        while True:
            video = self.get(video_id)
            if progress is not None:
                progress(video)
            if video["status"] in TERMINAL:
                if video["status"] != "completed":
                    err = video.get("error") or {}
                    raise ServerError(
                        200, f"video {video_id} {video['status']}: {err.get('message')}", err.get("code")
                    )
                return video
            if time.monotonic() > deadline:
                raise TimeoutError(f"{video_id} still {video['status']} after {timeout_s:g}s")
            time.sleep(poll_s)

    def download(self, video_id: str, path: Path) -> Path:
        response = self._check(self.http.get(f"/v1/videos/{video_id}/content"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path

    def delete(self, video_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/videos/{video_id}")).json()


def _typed(fields: dict[str, str]) -> dict[str, Any]:
    """Form strings → JSON values for the text-only request."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if k in ("seed", "num_frames", "num_inference_steps"):
            out[k] = int(v)
        elif k in ("guidance_scale", "fps", "shift", "seconds"):
            out[k] = float(v)
        else:
            out[k] = v
    return out
