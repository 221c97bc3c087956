"""Face swap requests (issue 14): an input video and a face in, the same video with that face out.

The data flow, at the seams the serving stack splits it at:

1. **prepare** (:func:`prepare_face_swap`, CPU, the Preprocessor): decode the upload safely
   (:func:`~standin.video_input.decode_video`), centre-crop to multiples of 16 and keep the
   largest 4k + 1 frames (:func:`~standin.video_input.shape_for_wan`); paste the reference face
   into every frame (:class:`~standin.face_swap.FacePaster`) and keep its mask, or take the
   user's mask video instead; the output fps is the input's.
2. **encode** (:func:`face_swap_latents`, the VAE): ``x_0 = VAE(pasted video)``, the request's
   seeded noise (:func:`~standin.pipeline.initial_noise`), the SDEdit schedule at
   ``denoising_strength`` and its start latents ``(1 − σ_0)·x_0 + σ_0·noise``; with background
   consistency also the hard latent mask. These tensors travel to the DiT like the identity
   latents do.
3. **denoise** (:func:`face_swap_denoise_inputs` → :meth:`StandInPipeline.denoise`, or the SP
   runner's ``DenoiseRequest`` with the same tensors): the usual loop (identity cache built once,
   CFG, Euler) from the start latents; with background consistency the input is re-imposed
   outside the face after every step (:class:`~standin.sdedit.BackgroundConsistency`).
4. **decode**: VAE → frames → MP4 at the input's fps.

The identity image is the usual whitened 512² reference (``ReferenceImage.image``); the image
pasted into the frames is the same crop *before* whitening, as the official release pastes it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

from standin.errors import InvalidRequestError, InvalidVideoError
from standin.face import REFERENCE_SIZE, FacePreprocessor, ReferenceImage
from standin.face_detectors import RetinaFaceDetector, ScrfdDetector
from standin.face_landmarks import LandmarkDetector, RetinaFaceLandmarkDetector, ScrfdLandmarkDetector
from standin.face_swap import FacePaster, swap_reference
from standin.image_io import pad_resize_square
from standin.pipeline import (
    CancelCheck,
    DenoiseInputs,
    GenerationParams,
    ProgressCallback,
    StandInPipeline,
    initial_noise,
)
from standin.sdedit import (
    DEFAULT_DENOISING_STRENGTH,
    BackgroundConsistency,
    hard_latent_mask,
    sdedit_schedule,
    sdedit_start_latents,
)
from standin.vae import WanVAE
from standin.video_input import FramesShape, VideoLimits, crop_to_multiple, decode_video, shape_for_wan

log = logging.getLogger(__name__)

__all__ = [
    "FaceSwapLatents",
    "FaceSwapOptions",
    "FaceSwapVideo",
    "decode_mask_video",
    "face_swap_denoise_inputs",
    "face_swap_latents",
    "face_swap_params",
    "generate_face_swap",
    "landmark_detector_for",
    "paste_into_mask",
    "prepare_face_swap",
    "video_to_tensor",
]

MaskSource = Literal["paste", "user", "none"]


@dataclass(frozen=True)
class FaceSwapOptions:
    """The sampling options of a face swap.

    Attributes:
        denoising_strength: in (0, 1]; where the SDEdit schedule starts (official default 0.85).
        background_consistency: re-impose the input video outside the hard face mask after every
            step (off by default, as the official script).
    """

    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    background_consistency: bool = False

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the bad option."""
        s = self.denoising_strength
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 0 < s <= 1:
            raise InvalidRequestError(f"denoising_strength must be a number in (0, 1], got {s!r}")
        if not isinstance(self.background_consistency, bool):
            raise InvalidRequestError(
                f"background_consistency must be true or false, got {self.background_consistency!r}"
            )


@dataclass(frozen=True)
class FaceSwapVideo(FramesShape):
    """The input video, prepared for SDEdit.

    Attributes:
        frames: uint8 ``[F, H, W, 3]``, F = 4k + 1, H and W multiples of 16, the face pasted.
        masks: uint8 ``[F, H, W]``, 255 = face (the paste's, or the user's channel 0).
        fps: the input's frame rate (the output's).
        mask_source: ``"paste"`` (the paste's alpha), ``"user"`` (a supplied mask video) or
            ``"none"`` (nothing pasted: subject "object" without a mask; the mask is all zero).
        paths: per frame, how the face was pasted: ``"landmarks"``, ``"box"``, ``"mask"`` (subject
            "object" pasted into the user mask) or ``"none"``.
    """

    frames: np.ndarray
    masks: np.ndarray
    fps: float
    mask_source: MaskSource
    paths: tuple[str, ...]


def landmark_detector_for(preprocessor: FacePreprocessor) -> LandmarkDetector | None:
    """The five-landmark detector sharing the preprocessor's loaded model (None: no detector,
    subject "object")."""
    det = preprocessor.detector
    if det is None:
        return None
    if isinstance(det, ScrfdDetector):
        return ScrfdLandmarkDetector(det)
    if isinstance(det, RetinaFaceDetector):
        return RetinaFaceLandmarkDetector(det)
    if hasattr(det, "detect_landmarks"):
        return det  # type: ignore[return-value]  # already a LandmarkDetector
    raise InvalidRequestError(f"face swap needs a detector with landmarks, not {type(det).__name__}")


def decode_mask_video(
    data: bytes, frames_shape: tuple[int, ...], limits: VideoLimits | None = None
) -> np.ndarray:
    """A user-supplied mask video → uint8 ``[F, H, W]`` matching the shaped input frames.

    The mask is decoded with the same limits, centre-cropped like the video, its channel 0 used
    (255 = face; the hard mask counts pixels >= 192). It must have the input video's size and at
    least as many frames as the input keeps (extra frames are dropped).

    Args:
        data: the mask file's bytes.
        frames_shape: the shaped input frames' shape ``[F, H, W, 3]``.

    Raises:
        InvalidVideoError: undecodable, or a different size / too few frames.
    """
    try:
        mask = decode_video(data, limits)
    except InvalidVideoError as e:
        raise InvalidVideoError(f"mask video: {e}") from None
    f, h, w = (int(n) for n in frames_shape[:3])
    shaped = crop_to_multiple(mask.frames)
    if shaped.shape[1:3] != (h, w) or shaped.shape[0] < f:
        raise InvalidVideoError(
            f"the mask video must match the video: {f} frames of {w}x{h} after cropping to multiples "
            f"of 16, got {shaped.shape[0]} frames of {shaped.shape[2]}x{shaped.shape[1]}"
        )
    return np.ascontiguousarray(shaped[:f, :, :, 0])


def paste_into_mask(frames: np.ndarray, reference: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Subject "object" with a mask: the reference's subject stretched onto each frame's mask.

    The subject is the bounding box of the reference's non-white pixels (the reference is the
    subject on white); in each frame it is resized (Lanczos) onto the bounding box of the mask's
    pixels >= 128 and pasted with the mask as alpha. Frames with an empty mask are unchanged.

    Args:
        frames: uint8 ``[F, H, W, 3]``.
        reference: uint8 ``[h, w, 3]``, the subject on white.
        masks: uint8 ``[F, H, W]`` (255 = subject).

    Returns:
        uint8 ``[F, H, W, 3]``.
    """
    ref = np.asarray(reference)
    content = np.argwhere((ref < 250).any(axis=-1))
    if content.size:
        (top, left), (bottom, right) = content.min(0), content.max(0) + 1
        ref = ref[top:bottom, left:right]
    out = np.array(frames, copy=True)
    for f in range(out.shape[0]):
        where = np.argwhere(masks[f] >= 128)
        if where.size == 0:
            continue
        (top, left), (bottom, right) = where.min(0), where.max(0) + 1
        size = (int(right - left), int(bottom - top))
        resized = np.asarray(Image.fromarray(ref).resize(size, Image.Resampling.LANCZOS), np.float32)
        alpha = masks[f, top:bottom, left:right, None].astype(np.float32) / 255.0
        region = out[f, top:bottom, left:right].astype(np.float32)
        out[f, top:bottom, left:right] = np.clip(np.rint((1 - alpha) * region + alpha * resized), 0, 255)
    return out


def prepare_face_swap(
    video: bytes,
    image: Image.Image,
    preprocessor: FacePreprocessor,
    mask: bytes | None = None,
    limits: VideoLimits | None = None,
    reference: ReferenceImage | None = None,
) -> tuple[FaceSwapVideo, ReferenceImage]:
    """Decode, shape and paste: the CPU half of a face swap.

    Args:
        video: the uploaded video's bytes.
        image: the decoded reference photo (RGB, any size).
        preprocessor: the loaded face models (detector, optional parser).
        mask: optional mask video bytes, used instead of the paste's mask.
        limits: decode limits for both videos.
        reference: ``preprocessor.process(image)`` when the caller already has it.

    Returns:
        The prepared video, and the reference (``.image`` is the identity image).

    Raises:
        InvalidVideoError: a bad video or mask; InvalidImageError / FaceModelError from the face path.
    """
    try:
        decoded = decode_video(video, limits)
        frames = shape_for_wan(decoded.frames)
    except InvalidVideoError as e:
        raise InvalidVideoError(f"input video: {e}") from None
    if decoded.variable_frame_rate:
        log.info("variable-frame-rate input: output at its average rate %.3f fps", decoded.fps)
    reference = reference if reference is not None else preprocessor.process(image)
    detector = landmark_detector_for(preprocessor)
    user_mask = decode_mask_video(mask, frames.shape, limits) if mask is not None else None
    if detector is None:
        # Subject "object": no face to find; with a mask, the reference is pasted into it.
        pasted, masks, paths = np.ascontiguousarray(frames), None, ("none",) * frames.shape[0]
        if user_mask is not None:
            pasted = paste_into_mask(frames, reference.to_array(), user_mask)
            paths = tuple("mask" if m.max() >= 128 else "none" for m in user_mask)
    else:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        paste_rgb = np.asarray(pad_resize_square(rgb, REFERENCE_SIZE, reference.crop))
        swap_ref = swap_reference(paste_rgb, detector, reference.background)
        swapped = FacePaster(detector, preprocessor.parser).paste_video(frames, swap_ref)
        pasted, masks, paths = swapped.frames, swapped.masks, swapped.paths
    if user_mask is not None:
        masks, source = user_mask, "user"
    elif masks is not None:
        source = "paste"
    else:
        log.warning("face swap without a face detector or a mask: the video is only re-noised")
        masks, source = np.zeros(frames.shape[:3], np.uint8), "none"
    result = FaceSwapVideo(pasted, masks, float(decoded.fps), source, tuple(paths))
    log.info(
        "face swap input: %d frames %dx%d at %.3f fps, mask from %s",
        result.num_frames,
        result.width,
        result.height,
        result.fps,
        source,
    )
    return result, reference


def face_swap_params(params: GenerationParams, video: FaceSwapVideo) -> GenerationParams:
    """`params` with the size and frame count of the input video (they always come from it)."""
    return replace(params, width=video.width, height=video.height, num_frames=video.num_frames)


def video_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` → float32 ``[1, 3, F, H, W]`` in [-1, 1] (``x/127.5 − 1``)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidRequestError(f"frames must be uint8 [F, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return t[None]


@dataclass
class FaceSwapLatents:
    """What a face swap adds to a denoising request; tensors float32 on the CPU or the model's device.

    Attributes:
        start: ``[1, 16, F', H', W']`` the SDEdit start latents.
        input_latents: ``x_0``, the VAE latents of the pasted video, same shape.
        noise: the request's seeded noise the start was made with, same shape.
        hard_mask: ``[1, 1, F', H', W']`` 0/1 (1 = face) with background consistency, else None.
        denoising_strength: where the schedule starts.
    """

    start: torch.Tensor
    input_latents: torch.Tensor
    noise: torch.Tensor
    hard_mask: torch.Tensor | None
    denoising_strength: float

    def denoise_request_fields(self) -> dict[str, torch.Tensor | float | None]:
        """The fields of `parallel.runner.DenoiseRequest` that carry a face swap."""
        keep = self.hard_mask is not None
        return {
            "latents": self.start,
            "denoising_strength": self.denoising_strength,
            "background_latents": self.input_latents if keep else None,
            "background_noise": self.noise if keep else None,
            "background_mask": self.hard_mask,
        }


@torch.no_grad()
def face_swap_latents(
    vae: WanVAE,
    params: GenerationParams,
    options: FaceSwapOptions,
    video: FaceSwapVideo,
    device: torch.device | str | None = None,
) -> FaceSwapLatents:
    """VAE-encode the pasted video and make the SDEdit start (and the hard mask if asked).

    Args:
        vae: the pipeline's VAE.
        params: the request's params with the video's size (:func:`face_swap_params`).
        options: strength and background consistency.
        video: the prepared input.
        device: where to encode (default: the VAE's).

    Returns:
        :class:`FaceSwapLatents` with ``[1, 16, (F − 1)/4 + 1, H/8, W/8]`` tensors on `device`.
    """
    options.validate()
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    x0 = vae.encode(video_to_tensor(video.frames).to(device)).float()
    noise = initial_noise(params).to(device)
    if tuple(x0.shape) != tuple(noise.shape):
        raise InvalidRequestError(
            f"params {params.width}x{params.height}x{params.num_frames} do not match the video "
            f"{video.width}x{video.height}x{video.num_frames}"
        )
    schedule = sdedit_schedule(params.num_steps, options.denoising_strength, params.shift)
    start = sdedit_start_latents(schedule, x0, noise)
    mask = None
    if options.background_consistency:
        mask = hard_latent_mask(video.masks, tuple(x0.shape)).to(device)
    return FaceSwapLatents(start, x0, noise, mask, float(options.denoising_strength))


def face_swap_denoise_inputs(
    params: GenerationParams,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    identity_latents: torch.Tensor | None,
    latents: FaceSwapLatents,
) -> DenoiseInputs:
    """The denoising loop's inputs for a face swap: SDEdit schedule and start, and background
    consistency after every step when the latents carry a hard mask."""
    schedule = sdedit_schedule(params.num_steps, latents.denoising_strength, params.shift)
    keeper = None
    if latents.hard_mask is not None:
        keeper = BackgroundConsistency(schedule, latents.input_latents, latents.noise, latents.hard_mask)
    return DenoiseInputs(
        noise=latents.noise,
        context=context,
        negative_context=negative_context,
        identity_latents=identity_latents,
        schedule=schedule,
        guidance_scale=params.guidance_scale,
        cfg_mode=params.cfg_mode,
        start_latents=latents.start,
        after_step=keeper.apply if keeper is not None else None,
    )


def generate_face_swap(
    pipe: StandInPipeline,
    params: GenerationParams,
    video: FaceSwapVideo,
    identity_image: np.ndarray | None,
    options: FaceSwapOptions | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Prompt + prepared video (+ the 512² identity image) → video ``[1, 3, F, H, W]`` in [-1, 1].

    The size and frame count of `params` are replaced by the video's.
    """
    options = options or FaceSwapOptions()
    options.validate()
    params = face_swap_params(params, video)
    params.validate()
    use_cfg = params.guidance_scale != 1.0
    ctx, neg = pipe.encode_prompts(params.prompt, params.negative_prompt if use_cfg else None)
    identity = pipe.encode_identity(identity_image) if identity_image is not None else None
    latents = face_swap_latents(pipe.vae, params, options, video, pipe.device)
    inputs = face_swap_denoise_inputs(params, ctx, neg, identity, latents)
    return pipe.decode(pipe.denoise(inputs, progress, should_cancel))
