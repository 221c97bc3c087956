"""Face swap in the serving stack (issue 14): `input_video` (+ optional `input_mask`) uploads,
their checks at submission, the Preprocessor's encoding, and what travels to the DiT.

- **Ingress**: each video upload is checked from its header (`standin.video_input.probe_video`:
  bytes, container, codec, frame size, count, duration against the video limits of the settings)
  → 400/413 before a job exists; the job's size, frame count and fps are the video's as its
  header states them (centre-cropped to multiples of 16, largest 4k + 1 frames).
- **Preprocessor**: decodes the video safely, pastes the face (or takes the mask video), VAE-
  encodes it and makes the SDEdit start (`standin.face_swap_request`); what it returns travels
  to the DiT beside the identity latents. A video that fails only here (truncated data, a header
  that lied) fails the job with the code ``invalid_video``.
- **DiT**: the `parallel.DenoiseRequest` carries the start latents, the strength and, with
  background consistency, the input latents, noise and hard mask.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from serve_app.api import APIError
from serve_app.settings import ServeSettings
from standin.errors import InvalidVideoError
from standin.face import FacePreprocessor
from standin.face_swap_request import (
    FaceSwapLatents,
    FaceSwapOptions,
    face_swap_latents,
    face_swap_params,
    prepare_face_swap,
)
from standin.image_io import decode_image
from standin.pipeline import GenerationParams
from standin.vae import WanVAE
from standin.video_input import FramesShape, VideoHeader, VideoLimits, largest_4k_plus_1, probe_video

__all__ = [
    "VIDEO_FIELDS",
    "VideoUpload",
    "check_video_upload",
    "decode_video_data_url",
    "denoise_request_fields",
    "encode_face_swap",
    "swapped_params",
    "video_limits",
    "video_upload",
]


# The request's video uploads (multipart file parts, or data URLs in JSON).
VIDEO_FIELDS = ("input_video", "input_mask")


def video_limits(settings: ServeSettings) -> VideoLimits:
    """The settings' bounds on uploaded videos."""
    return VideoLimits(
        max_bytes=settings.max_video_bytes,
        max_duration_s=settings.max_video_seconds,
        max_frames=settings.max_video_frames,
        max_pixels_per_frame=settings.max_video_pixels_per_frame,
        max_total_pixels=settings.max_video_total_pixels,
    )


def check_generated_size(what: str, video: FramesShape, settings: ServeSettings) -> None:
    """An uploaded video decides the output's size and frames: they must be ones this server
    generates (max_frames, max_width, max_height). Raises InvalidVideoError naming `what`."""
    if video.num_frames > settings.max_frames:
        raise InvalidVideoError(
            f"{what} gives {video.num_frames} frames; this server generates at most {settings.max_frames}"
        )
    if video.width > settings.max_width or video.height > settings.max_height:
        raise InvalidVideoError(
            f"{what} is {video.width}x{video.height} after cropping; this server generates at "
            f"most {settings.max_width}x{settings.max_height}"
        )


@dataclass(frozen=True)
class VideoUpload:
    """A face-swap request's uploads, checked at submission.

    Attributes:
        video: the input video's bytes; header: what its header says.
        mask: the mask video's bytes, or None (the detected face's mask is used).
    """

    video: bytes
    header: VideoHeader
    mask: bytes | None = None

    @property
    def width(self) -> int:
        return (self.header.width // 16) * 16

    @property
    def height(self) -> int:
        return (self.header.height // 16) * 16

    @property
    def num_frames(self) -> int:
        """The frames generated: the largest 4k + 1 the header's count (or duration × fps) allows."""
        n = self.header.frames
        if n <= 0 and self.header.duration_s and self.header.fps:
            n = int(self.header.duration_s * self.header.fps)
        return largest_4k_plus_1(max(n, 1))


def check_video_upload(data: bytes, settings: ServeSettings, param: str) -> VideoHeader:
    """A video upload's header against the limits → its header; APIError 413 (too many bytes) or
    400 (not an accepted video), naming `param` (``input_video`` or ``input_mask``)."""
    limit = settings.max_video_bytes
    if len(data) > limit:
        raise APIError(413, f"{param} is larger than {limit} bytes", param=param, code="video_too_large")
    try:
        header = probe_video(data, video_limits(settings))
    except InvalidVideoError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_video") from None
    if min(header.width, header.height) < 16:
        raise APIError(
            400, f"{param}: its sides must be at least 16 pixels", param=param, code="invalid_video"
        )
    return header


def encode_face_swap(
    faces: FacePreprocessor,
    vae: WanVAE,
    device: torch.device,
    params: GenerationParams,
    options: FaceSwapOptions,
    video: bytes,
    image: bytes,
    mask: bytes | None,
    settings: ServeSettings,
) -> dict[str, Any]:
    """Decode, paste, encode: the Preprocessor's half of a face swap (CPU tensors out).

    Returns:
        ``{"latents", "input_latents", "noise"`` (each ``[1, 16, F', H/8, W/8]``),
        ``"hard_mask"`` (``[1, 1, F', H/8, W/8]`` or None), ``"denoising_strength"``,
        ``"width"``, ``"height"``, ``"num_frames"``, ``"fps"``, ``"mask_source"}``.

    Raises:
        InvalidVideoError: undecodable, or larger than the server generates (max_width,
            max_height, max_frames); InvalidImageError for the face.
    """
    limits = video_limits(settings)
    photo = decode_image(image, faces.config.limits)
    prepared, _ = prepare_face_swap(video, photo, faces, mask, limits)
    check_generated_size("the video", prepared, settings)
    swap_params = face_swap_params(params, prepared)
    lat = face_swap_latents(vae, swap_params, options, prepared, device)
    return {
        "latents": lat.start.float().cpu(),
        "input_latents": lat.input_latents.float().cpu(),
        "noise": lat.noise.float().cpu(),
        "hard_mask": None if lat.hard_mask is None else lat.hard_mask.float().cpu(),
        "denoising_strength": lat.denoising_strength,
        "width": prepared.width,
        "height": prepared.height,
        "num_frames": prepared.num_frames,
        "fps": prepared.fps,
        "mask_source": prepared.mask_source,
    }


def swapped_params(params: GenerationParams, face_swap: dict[str, Any]) -> GenerationParams:
    """The job's params with the size and frame count of the decoded video."""
    return replace(
        params, width=face_swap["width"], height=face_swap["height"], num_frames=face_swap["num_frames"]
    )


def denoise_request_fields(face_swap: dict[str, Any]) -> dict[str, Any]:
    """The `parallel.DenoiseRequest` fields of a face swap (start latents, strength, background)."""
    lat = FaceSwapLatents(
        face_swap["latents"],
        face_swap["input_latents"],
        face_swap["noise"],
        face_swap["hard_mask"],
        float(face_swap["denoising_strength"]),
    )
    return lat.denoise_request_fields()


_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.DOTALL)


def decode_video_data_url(value: Any, max_bytes: int, param: str) -> bytes:
    """JSON's `{"video_url": "data:video/mp4;base64,…"}` (or the bare string) → the file's bytes.
    Remote URLs are never fetched (400); too large → 413."""
    url = value.get("video_url") if isinstance(value, dict) else value
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise APIError(
            400,
            f'{param} must be a file upload (multipart) or {{"video_url": "data:video/mp4;base64,..."}}',
            param=param,
        )
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise APIError(
            400,
            f"{param} must be a data: URL; remote URLs are never fetched "
            "(upload the file as multipart/form-data instead)",
            param=param,
            code="unsupported_url",
        )
    payload = m.group(4)
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"{param} is larger than {max_bytes} bytes", param=param, code="video_too_large")
    if not m.group(3):
        raise APIError(400, f"{param} data URL must be base64-encoded", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param) from None


def video_upload(video: bytes | None, mask: bytes | None, settings: ServeSettings) -> VideoUpload | None:
    """Check a request's video uploads (blocking: run it off the event loop) → VideoUpload or None."""
    if video is None:
        if mask is not None:
            raise APIError(400, "input_mask applies to face swap: send input_video too", param="input_mask")
        return None
    header = check_video_upload(video, settings, "input_video")
    if mask is not None:
        check_video_upload(mask, settings, "input_mask")
    return VideoUpload(video, header, mask)
