"""Where finished videos live: a local directory by default, or any fsspec URL (s3://…, gs://…).

Keys are `<job id>.mp4`; the job row remembers the key. Writes go to a temporary name first and
are renamed into place, so a reader never sees half a video.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


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
        tmp = f"{path}.tmp-{os.getpid()}"
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
