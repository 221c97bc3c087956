"""Decoder deployment: (latents → VAE decode →) H.264 MP4 (in memory) → result storage.

Where the VAE decode runs is the `decode_on` setting. `decoder`: here, in one process, for every
DiT replica (`decode`). `dit`: the DiT replica's ranks decode in parallel (parallel/vae_decode.py)
and send uint8 frames; this deployment then only encodes and stores them (`store`) and loads no
VAE. The arithmetic behind the choice: README, "Performance".

Both return the SHA-256 of the decoded uint8 frames: a fingerprint of what the model made,
independent of the H.264 encoder (whose output bytes can vary with its thread timing).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import numpy as np
import torch
from ray import serve

from serve_app.models import device_of, load_vae
from serve_app.results import ResultStore
from serve_app.settings import ServeSettings
from standin.video import encode_mp4, to_uint8_frames

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Decoder:
    def __init__(self, settings: ServeSettings) -> None:
        self.device = device_of(settings)
        self.vae = load_vae(settings) if settings.decode_on == "decoder" else None
        self.results = ResultStore(settings.results_location)
        self._lock = asyncio.Lock()

    async def decode(self, latents: torch.Tensor, fps: float, key: str) -> dict[str, int | str]:
        """latents [1, 16, F', H', W'] → stores `key`; returns {"key", "bytes", "frames_sha256"}."""
        if self.vae is None:
            raise RuntimeError("decode_on is 'dit': the DiT replica decodes, call store()")
        async with self._lock:
            frames = await asyncio.to_thread(self._decode, latents)
        return await self.store(frames, fps, key)

    async def store(self, frames: np.ndarray, fps: float, key: str) -> dict[str, int | str]:
        """uint8 frames [F, H, W, 3] → MP4 stored at `key`; returns {"key", "bytes", "frames_sha256"}."""
        data, digest = await asyncio.to_thread(_encode, frames, fps)
        await asyncio.to_thread(self.results.put, key, data)
        return {"key": key, "bytes": len(data), "frames_sha256": digest}

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        assert self.vae is not None
        return to_uint8_frames(self.vae.decode(latents.to(self.device)).float().cpu())


def _encode(frames: np.ndarray, fps: float) -> tuple[bytes, str]:
    frames = to_uint8_frames(frames)
    return encode_mp4(frames, fps=fps), hashlib.sha256(frames.tobytes()).hexdigest()
