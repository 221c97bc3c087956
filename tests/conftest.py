"""Shared Ray fixtures: one local Ray cluster + Serve per test session, started only when a test
asks for it (cold start ≈ 15–25 s on 2 cores), shut down at the end — only this cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from parallel.rendezvous import free_port


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    """A private Ray cluster with Serve's HTTP proxy on a free port → the base URL."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the same mode for every process of this cluster
    import ray
    from ray import serve

    # Logical CPUs above the 2 physical ones: the recovery tests need room for a replacement DiT
    # group while the old one is torn down; every actor asks for a fraction of a CPU anyway.
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve", logging_level=logging.WARNING)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
