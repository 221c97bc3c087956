"""A free TCP port for a process group's rendezvous (and for test servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port that was free on `host` ("" = every interface) a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
