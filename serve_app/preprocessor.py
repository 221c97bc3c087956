"""Preprocessor deployment: face photo → identity latents; prompts → umT5 contexts; a face
swap's input video → its SDEdit start latents (decoded, pasted, VAE-encoded; not cached).

Both are cached by content hash (bounded LRU): a client that sends the same face or prompt
again skips detection, parsing and encoding. Cached tensors are never mutated downstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import torch
from ray import serve

from serve_app.face_swap import encode_face_swap
from serve_app.models import device_of, load_encoders
from serve_app.settings import ServeSettings
from serve_app.vace import encode_control_request
from standin.face import FaceConfig, FacePreprocessor
from standin.face_swap_request import FaceSwapOptions
from standin.image_io import ImageLimits
from standin.pipeline import reference_video
from standin.presets import get_preset

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A small bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Preprocessor:
    """Holds the text encoder, the VAE encoder and the face models."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.device = device_of(settings)
        self.text_encoder, self.vae = load_encoders(settings)
        self.reference_size = get_preset(settings.preset).reference_size
        limits = ImageLimits(max_bytes=settings.max_upload_bytes)
        self.faces = {
            subject: FacePreprocessor(
                FaceConfig(
                    backend=settings.face_backend,  # type: ignore[arg-type]
                    model_dir=settings.face_model_dir,
                    parser_weights=settings.parser_weights,
                    subject=subject,  # type: ignore[arg-type]
                    device=self.device.type,
                    limits=limits,
                )
            )
            for subject in ("face", "object")
        }
        self.prompts: LRUCache[str, torch.Tensor] = LRUCache(settings.prompt_cache_size)
        self.identities: LRUCache[str, torch.Tensor] = LRUCache(settings.identity_cache_size)
        # One request at a time through the models: their buffers are not shared safely.
        self._lock = asyncio.Lock()

    async def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        image: bytes | None,
        subject: str = "face",
        face_swap: dict[str, Any] | None = None,
        vace: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """→ {"context": [1, L, D], "negative_context": [1, L, D] | None,
        "identity_latents": [1, 16, 1, 64, 64] | None}. Raises InvalidImageError for a bad photo.

        `face_swap` ({"params", "video", "mask", "denoising_strength", "background_consistency"})
        adds "face_swap": the decoded, pasted and encoded input video
        (`serve_app.face_swap.encode_face_swap`); InvalidVideoError for a bad video.
        `vace` ({"video", "mask", "first_frame", "scale"}) adds "vace": the control's VACE context
        and shape (`serve_app.vace.encode_control_request`) and the scale."""
        async with self._lock:
            return await asyncio.to_thread(
                self._encode, prompt, negative_prompt, image, subject, face_swap, vace
            )

    def _encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        image: bytes | None,
        subject: str,
        face_swap: dict[str, Any] | None = None,
        vace: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "context": self._prompt(prompt),
            "negative_context": None if negative_prompt is None else self._prompt(negative_prompt),
            "identity_latents": None,
        }
        if image is not None:
            out["identity_latents"] = self._identity(image, subject)
        if face_swap is not None and image is not None:
            options = FaceSwapOptions(face_swap["denoising_strength"], face_swap["background_consistency"])
            out["face_swap"] = encode_face_swap(
                self.faces[subject],
                self.vae,
                self.device,
                face_swap["params"],
                options,
                face_swap["video"],
                image,
                face_swap["mask"],
                self.settings,
            )
        if vace is not None:
            encoded = encode_control_request(self.vae, self.device, vace, self.settings)
            out["vace"] = {**encoded, "scale": float(vace["scale"])}
        return out

    @torch.no_grad()
    def _prompt(self, text: str) -> torch.Tensor:
        key = _digest(text)
        cached = self.prompts.get(key)
        if cached is None:
            cached = self.text_encoder.encode_prompts([text]).cpu()
            self.prompts.put(key, cached)
        return cached

    @torch.no_grad()
    def _identity(self, image: bytes, subject: str) -> torch.Tensor:
        key = _digest(subject, image)
        cached = self.identities.get(key)
        if cached is None:
            reference = self.faces[subject].process_bytes(image).to_array()
            # The identity branch expects the reference size its preset was trained on.
            video = reference_video(reference, self.reference_size).to(self.device)
            cached = self.vae.encode(video).float().cpu()
            self.identities.put(key, cached)
        return cached

    def stats(self) -> dict[str, Any]:
        return {
            "prompt_cache": {
                "size": len(self.prompts),
                "hits": self.prompts.hits,
                "misses": self.prompts.misses,
            },
            "identity_cache": {
                "size": len(self.identities),
                "hits": self.identities.hits,
                "misses": self.identities.misses,
            },
        }
