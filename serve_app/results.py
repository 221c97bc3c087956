"""Where finished videos and a job's large inputs live: a local directory by default, or any
fsspec URL (s3://…, gs://…). The job store holds only their keys.

Keys: `<job id>.reference` (the upload, written before the job is accepted; a face swap's
`<job id>.video` and `<job id>.mask` too),
`<job id>.a<attempt>.conditioning` (the encoded prompt/face) and `<job id>.a<attempt>.mp4`. A run
writes only under its own attempt's keys and then publishes a key by a fenced write of the job
row, so a stale run can never overwrite what another attempt published. Writes go to a temporary
name first and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.jobs import Job

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def reference_key(job_id: str) -> str:
    return f"{job_id}.reference"


def input_video_key(job_id: str) -> str:
    """A face swap's uploaded video (and `input_mask_key`: its mask video)."""
    return f"{job_id}.video"


def input_mask_key(job_id: str) -> str:
    return f"{job_id}.mask"


def control_keys(job_id: str) -> dict[str, str]:
    """A VACE request's uploads: the control video, its mask and the first-frame image."""
    return {name: f"{job_id}.{name}" for name in ("control_video", "control_mask", "first_frame")}


def conditioning_key(job_id: str, attempt: int) -> str:
    return f"{job_id}.a{attempt}.conditioning"


def video_key(job_id: str, attempt: int) -> str:
    return f"{job_id}.a{attempt}.mp4"


def job_keys(job: Job) -> list[str]:
    """Every key a job has published: its upload, its conditioning, its video."""
    keys = [reference_key(job.id)] if job.request.get("has_reference") else []
    keys += [input_video_key(job.id)] if job.request.get("has_video") else []
    keys += [input_mask_key(job.id)] if job.request.get("has_mask") else []
    keys += [key for name, key in control_keys(job.id).items() if job.request.get(f"has_{name}")]
    return keys + [k for k in (job.conditioning_key, job.result_key) if k]


class ResultStore:
    """put/get/delete/size of result files under one location."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._fs = None
        if "://" in location and not location.startswith("file://"):
            import fsspec  # only clusters with object storage need it

            self._fs, self._root = fsspec.core.url_to_fs(location)
        else:
            self._root = location.removeprefix("file://")
            Path(self._root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"bad result key {key!r}")
        return f"{self._root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self._fs is not None:
            self._fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            if self._fs is not None:
                return self._fs.cat_file(path)
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if self._fs is not None:
                self._fs.rm_file(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._fs.exists(path) if self._fs is not None else os.path.exists(path)
