"""VACE control in the serving stack (issue 15): `control_video` (+ `control_mask`, + `first_frame`)
uploads and `vace_scale`, their checks at submission, the Preprocessor's encoding and what
travels to the DiT.

- **Ingress**: the control video (and mask) are checked from their headers like a face swap's
  input video (`serve_app.face_swap.check_video_upload`: bytes, container, codec, size, frames,
  duration) and the first frame as an image → 400/413 before a job exists; the job's size and
  frame count are the control's (centre-cropped to multiples of 16, largest 4k + 1 frames).
- **Preprocessor**: decodes the control safely and VAE-encodes the 96-channel context
  (`standin.vace_conditioning`); a control that fails only here fails the job as ``invalid_video``.
- **DiT**: the `parallel.DenoiseRequest` carries the context and scale (every rank shards the
  context tokens like its video tokens); with a first frame the noise is one latent frame longer
  and that frame is dropped from the result before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from serve_app.api import APIError
from serve_app.face_swap import VideoUpload, check_generated_size, check_video_upload, video_limits
from serve_app.settings import ServeSettings
from standin.errors import InvalidImageError
from standin.image_io import decode_image
from standin.pipeline import GenerationParams
from standin.vace_conditioning import control_from_bytes, control_noise, encode_control
from standin.vae import WanVAE

__all__ = [
    "CONTROL_FIELDS",
    "ControlUpload",
    "control_params",
    "control_request_fields",
    "control_upload",
    "drop_reference_frame",
    "encode_control_request",
]

# The request's control uploads (multipart file parts, or data URLs in JSON).
CONTROL_FIELDS = ("control_video", "control_mask", "first_frame")


@dataclass(frozen=True)
class ControlUpload(VideoUpload):
    """A VACE request's uploads, checked at submission (video header known, image decodable):
    the control video and its mask (sized as a face swap's video), and the first-frame image."""

    first_frame: bytes | None = None


def control_upload(
    video: bytes | None, mask: bytes | None, first_frame: bytes | None, settings: ServeSettings
) -> ControlUpload | None:
    """Check a request's control uploads (blocking: run it off the event loop) → ControlUpload or
    None; APIError 400/413 naming the field."""
    if video is None:
        for name, value in (("control_mask", mask), ("first_frame", first_frame)):
            if value is not None:
                raise APIError(400, f"{name} applies to VACE control: send control_video too", param=name)
        return None
    header = check_video_upload(video, settings, "control_video")
    if mask is not None:
        check_video_upload(mask, settings, "control_mask")
    if first_frame is not None:
        if len(first_frame) > settings.max_upload_bytes:
            raise APIError(
                413, f"first_frame is larger than {settings.max_upload_bytes} bytes", param="first_frame"
            )
        try:
            decode_image(first_frame)
        except InvalidImageError as exc:
            raise APIError(400, f"first_frame: {exc}", param="first_frame", code="invalid_image") from None
    return ControlUpload(video, header, mask, first_frame)


def encode_control_request(
    vae: WanVAE, device: torch.device, control: dict[str, Any], settings: ServeSettings
) -> dict[str, Any]:
    """Decode and encode: the Preprocessor's half of a VACE request (CPU tensors out).

    control: {"video", "mask", "first_frame"} bytes (mask/first_frame may be None).
    Returns {"context": [1, 96, F' (+1), H/8, W/8], "first_frame": bool, "width", "height",
    "num_frames"}. Raises InvalidVideoError / InvalidImageError.
    """
    limits = video_limits(settings)
    ctrl = control_from_bytes(control["video"], control.get("mask"), control.get("first_frame"), limits)
    check_generated_size("the control video", ctrl, settings)
    return {
        "context": encode_control(vae, ctrl, device).float().cpu(),
        "first_frame": ctrl.first_frame is not None,
        "width": ctrl.width,
        "height": ctrl.height,
        "num_frames": ctrl.num_frames,
    }


def control_params(params: GenerationParams, vace: dict[str, Any]) -> GenerationParams:
    """The job's params with the size and frame count of the decoded control video."""
    return replace(params, width=vace["width"], height=vace["height"], num_frames=vace["num_frames"])


def control_request_fields(params: GenerationParams, vace: dict[str, Any], scale: float) -> dict[str, Any]:
    """The `parallel.DenoiseRequest` fields of a VACE request: the seeded noise (one latent frame
    longer with a first frame, rotated as the official pipeline), the context and the scale."""
    return {
        "latents": control_noise(params.seed, params.latent_shape, bool(vace["first_frame"])),
        "vace_context": vace["context"],
        "vace_scale": float(scale),
    }


def reference_frames(vace: dict[str, Any] | None) -> int:
    """Leading latent frames that are conditioning, not video: the first-frame reference's one."""
    return 1 if vace is not None and vace["first_frame"] else 0


def drop_reference_frame(latents: torch.Tensor, vace: dict[str, Any] | None) -> torch.Tensor:
    """[B, C, F' (+1), H, W] → [B, C, F', H, W]: the first-frame reference is not output."""
    return latents[:, :, reference_frames(vace) :]
