"""VACE conditioning: control video (+ mask, + first-frame reference) → the 96-channel context.

As the official Wan2.1-VACE pipeline (read for behaviour, see ../shared/APPLICATIONS.md §3):

- the control video decides size and frame count: decoded by the safe decoder face swap uses
  (`standin.video_input.decode_video`), centre-cropped to multiples of 16 and trimmed to the
  largest 4k+1 ≤ n frames (`shape_for_wan`);
- frames in [-1, 1], mask m in [0, 1] (channel 0 of the mask video; default all ones):
  inactive = video·(1−m), reactive = video·m, each VAE-encoded → 16 + 16 channels;
- the mask's 8×8 pixel blocks are folded into 64 channels (channel p·8 + q holds pixel
  (8·row + p, 8·column + q)) and its time axis resized to the latent length by nearest-exact;
- an optional first-frame reference image is scaled to fit the frame, centred on white,
  VAE-encoded with 16 zero channels and prepended in time (its mask frame is zero). The noise is
  then one latent frame longer, drawn and rotated last → first, and that frame is dropped before
  decoding.

context = cat(inactive, reactive, folded mask) = 16 + 16 + 64 = 96 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from standin.errors import InvalidImageError, InvalidRequestError, InvalidVideoError
from standin.image_io import WHITE, decode_image, resize_area, to_rgb
from standin.vae import WanVAE
from standin.video_input import FramesShape, VideoLimits, decode_video, shape_for_wan

__all__ = [
    "ControlVideo",
    "control_from_arrays",
    "control_from_bytes",
    "control_noise",
    "encode_control",
    "fit_on_white",
    "fold_mask",
]

MASK_BLOCK = 8  # pixels per latent pixel: the VAE's spatial factor


@dataclass(frozen=True)
class ControlVideo(FramesShape):
    """A request's control input, already shaped for Wan.

    frames: uint8 [F, H, W, 3] with F = 4k+1 and H, W multiples of 16;
    mask: float32 [F, H, W] in [0, 1] (1: generate here, 0: keep), or None (all ones);
    first_frame: uint8 [H, W, 3] reference image fitted on white, or None.
    """

    frames: np.ndarray
    mask: np.ndarray | None = None
    first_frame: np.ndarray | None = None

    @property
    def latent_frames(self) -> int:
        """Latent frames of the video (without the prepended reference frame)."""
        return (self.num_frames - 1) // 4 + 1


def fit_on_white(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] → [height, width, 3]: scaled to fit (aspect kept), centred on white."""
    img = Image.fromarray(np.ascontiguousarray(image))
    scale = min(width / img.width, height / img.height)
    new_w, new_h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(resize_area(img, (new_w, new_h)), ((width - new_w) // 2, (height - new_h) // 2))
    return np.array(canvas)


def control_from_arrays(
    frames: np.ndarray, mask: np.ndarray | None = None, first_frame: np.ndarray | None = None
) -> ControlVideo:
    """Shape decoded arrays for Wan.

    frames: uint8 [N, H, W, 3]; mask: uint8 [N', H, W, 3] or [N', H, W] (N' ≥ the kept frames;
    channel 0 / 255 is the mask) or float [N', H, W] in [0, 1]; first_frame: uint8 [h, w, 3].
    Raises `InvalidVideoError` (control or mask) or `InvalidImageError` (first frame).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidVideoError(
            f"control video frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    shaped = np.ascontiguousarray(shape_for_wan(frames))
    n, h, w = shaped.shape[:3]
    folded_mask = None
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 4:
            m = m[..., 0]
        if m.ndim != 3 or m.shape[1:] != frames.shape[1:3]:
            raise InvalidVideoError(
                f"the mask video is {list(m.shape[1:3]) if m.ndim >= 3 else list(m.shape)} pixels, "
                f"the control video {list(frames.shape[1:3])}: they must be the same size"
            )
        if m.shape[0] < n:
            raise InvalidVideoError(f"the mask video has {m.shape[0]} frames, the control video uses {n}")
        m = np.asarray(shape_for_wan(m[:n]))
        m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
        if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
            raise InvalidVideoError("mask values must be in [0, 1]")
        folded_mask = np.ascontiguousarray(m)
    ref = None
    if first_frame is not None:
        img = np.asarray(first_frame)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
            raise InvalidImageError(f"first frame must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        ref = fit_on_white(img, h, w)
    return ControlVideo(shaped, folded_mask, ref)


def control_from_bytes(
    video: bytes,
    mask: bytes | None = None,
    first_frame: bytes | None = None,
    limits: VideoLimits | None = None,
) -> ControlVideo:
    """Uploaded control video (+ mask video, + first-frame image) → `ControlVideo`.

    Both videos go through the safe decoder (`decode_video`, `limits`); the image through
    `decode_image`. Errors are `InvalidVideoError` / `InvalidImageError` (clean 4xx upstream).
    """
    frames = decode_video(video, limits).frames
    mask_frames = None
    if mask is not None:
        try:
            mask_frames = decode_video(mask, limits).frames
        except InvalidVideoError as e:
            raise InvalidVideoError(f"control mask: {e}") from None
    image = None
    if first_frame is not None:
        image = np.asarray(to_rgb(decode_image(first_frame)))
    return control_from_arrays(frames, mask_frames, image)


def fold_mask(mask: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """mask [B, T, H, W] → [B, 64, latent_frames, H/8, W/8]: 8×8 pixel blocks folded into
    channels (channel p·8 + q ← pixel (8·row + p, 8·column + q)), time nearest-exact."""
    b, t, h, w = mask.shape
    if h % MASK_BLOCK or w % MASK_BLOCK:
        raise InvalidRequestError(f"mask size {h}x{w} is not a multiple of {MASK_BLOCK}")
    k = MASK_BLOCK
    m = mask.reshape(b, t, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4)
    m = m.reshape(b, k * k, t, h // k, w // k)
    return torch.nn.functional.interpolate(m, size=(latent_frames, h // k, w // k), mode="nearest-exact")


def _to_video(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [F, H, W, 3] → [1, 3, F, H, W] float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(3, 0, 1, 2).float()
    return (t / 127.5 - 1.0)[None]


@torch.no_grad()
def encode_control(vae: WanVAE, control: ControlVideo, device: torch.device | str = "cpu") -> torch.Tensor:
    """`ControlVideo` → VACE context [1, 96, F' (+1 with a first frame), H/8, W/8] float32."""
    device = torch.device(device)
    video = _to_video(control.frames, device)  # [1, 3, F, H, W]
    if control.mask is None:
        mask = torch.ones(1, control.num_frames, control.height, control.width, device=device)
    else:
        mask = torch.from_numpy(control.mask).to(device)[None]
    m = mask[:, None]  # [1, 1, F, H, W], broadcast over RGB
    inactive = vae.encode(video * (1 - m))
    reactive = vae.encode(video * m)
    latents = torch.cat([inactive, reactive], dim=1)  # [1, 32, F', h, w]
    mask_latents = fold_mask(mask, latents.shape[2])  # [1, 64, F', h, w]
    if control.first_frame is not None:
        ref = vae.encode(_to_video(control.first_frame[None], device))  # [1, 16, 1, h, w]
        ref = torch.cat([ref, torch.zeros_like(ref)], dim=1)
        latents = torch.cat([ref, latents], dim=2)
        mask_latents = torch.cat([torch.zeros_like(mask_latents[:, :, :1]), mask_latents], dim=2)
    return torch.cat([latents, mask_latents], dim=1).float()


def control_noise(
    seed: int, latent_shape: tuple[int, int, int, int, int], with_first_frame: bool
) -> torch.Tensor:
    """Seeded float32 CPU noise [B, C, F' (+1), H', W'] for the video latents `latent_shape`.

    With a first frame the noise is one latent frame longer, drawn in one piece and rotated
    last → first (the official handling), so its frames 1… are the draw's frames 0…F'-1.
    """
    b, c, f, h, w = latent_shape
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((b, c, f + int(with_first_frame), h, w), generator=generator, dtype=torch.float32)
    if with_first_frame:
        noise = torch.cat([noise[:, :, -1:], noise[:, :, :-1]], dim=2)
    return noise

