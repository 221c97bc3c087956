"""Decoder deployment: latents → VAE decode → H.264 MP4 (in memory) → result storage.

It also returns the SHA-256 of the decoded uint8 frames: a fingerprint of what the model made,
independent of the H.264 encoder (whose output bytes can vary with its thread timing).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

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
        self.vae = load_vae(settings)
        self.results = ResultStore(settings.results_location)
        self._lock = asyncio.Lock()

    async def decode(self, latents: torch.Tensor, fps: float, key: str) -> dict[str, int | str]:
        """latents [1, 16, F', H', W'] → stores `key`; returns {"key", "bytes", "frames_sha256"}."""
        async with self._lock:
            data, digest = await asyncio.to_thread(self._encode, latents, fps)
        await asyncio.to_thread(self.results.put, key, data)
        return {"key": key, "bytes": len(data), "frames_sha256": digest}

    @torch.no_grad()
    def _encode(self, latents: torch.Tensor, fps: float) -> tuple[bytes, str]:
        video = self.vae.decode(latents.to(self.device)).float().cpu()
        frames = to_uint8_frames(video)
        return encode_mp4(frames, fps=fps), hashlib.sha256(frames.tobytes()).hexdigest()
