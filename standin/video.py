"""Decoded video frames <-> H.264 MP4 bytes, in memory, with PyAV.

The VAE decodes a video as a float tensor in [-1, 1]; :func:`encode_mp4` turns it into an MP4
(H.264, yuv420p, BT.709 limited range) without touching the disk. :func:`read_mp4_info` and
:func:`decode_mp4` read such bytes back, for tests and clients.

Two choices differ from the official release (imageio, truncation to uint8): float values are
rounded to the nearest uint8, and an odd width or height is padded by repeating the last
column/row, because yuv420p needs even sizes. Stand-In's sizes (832x480 etc.) are all even.
"""

from __future__ import annotations

import io
import logging
import math
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
import torch

from standin.errors import InvalidRequestError

__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_FPS",
    "DEFAULT_PRESET",
    "Mp4Info",
    "decode_mp4",
    "encode_mp4",
    "read_mp4_info",
    "to_uint8_frames",
]

logger = logging.getLogger(__name__)

DEFAULT_FPS = 16.0  # Wan2.1's native frame rate
DEFAULT_CRF = 18  # visually lossless for x264; the caller can trade size for quality
DEFAULT_PRESET = "medium"
MAX_FPS = 240.0
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


class Mp4Info(NamedTuple):
    """What :func:`read_mp4_info` reports about the first video stream."""

    num_frames: int
    width: int
    height: int
    fps: float


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert a decoded video to RGB uint8 frames.

    Args:
        video: either a float tensor in [-1, 1] shaped ``[3, F, H, W]`` or ``[1, 3, F, H, W]``
            (the VAE's output; values outside [-1, 1] are clipped), or a uint8 numpy array
            ``[F, H, W, 3]`` (returned as is, made contiguous).

    Returns:
        ``[F, H, W, 3]`` uint8, C-contiguous.
    """
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8:
            raise InvalidRequestError(f"a numpy video must be uint8 [F, H, W, 3], got dtype {video.dtype}")
        if video.ndim != 4 or video.shape[-1] != 3:
            raise InvalidRequestError(f"a numpy video must be shaped [F, H, W, 3], got {list(video.shape)}")
        frames = video
    elif isinstance(video, torch.Tensor):
        if video.ndim == 5:
            if video.shape[0] != 1:
                raise InvalidRequestError(
                    f"a batched video tensor must have batch size 1, got {list(video.shape)}"
                )
            video = video[0]
        if video.ndim != 4 or video.shape[0] != 3:
            raise InvalidRequestError(
                f"a video tensor must be shaped [3, F, H, W] or [1, 3, F, H, W], got {list(video.shape)}"
            )
        if not video.is_floating_point():
            raise InvalidRequestError(f"a video tensor must be floating point in [-1, 1], got {video.dtype}")
        # Scale in float32 on the tensor's device (bf16 would round 0..255 coarsely).
        scaled = (video.detach().float().clamp(-1, 1) + 1) * 127.5
        frames = scaled.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    else:
        raise InvalidRequestError(
            f"video must be a torch.Tensor or a numpy array, got {type(video).__name__}"
        )
    if any(n == 0 for n in frames.shape):
        raise InvalidRequestError(f"video is empty: shape {list(frames.shape)}")
    return np.ascontiguousarray(frames)


X264_THREADS = 4


def encode_mp4(
    video: torch.Tensor | np.ndarray,
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> bytes:
    """Encode frames as an H.264 (yuv420p) MP4, entirely in memory.

    Args:
        video: ``[3, F, H, W]`` / ``[1, 3, F, H, W]`` float in [-1, 1], or ``[F, H, W, 3]`` uint8.
        fps: frames per second, 0 < fps <= 240; fractional rates (e.g. 29.97) are allowed.
        crf: x264 constant rate factor, 0 (lossless luma) .. 51; lower is better and larger.
        preset: x264 speed/size preset, ``ultrafast`` .. ``veryslow``.

    Returns:
        The MP4 file's bytes. An odd width or height is padded by one pixel (edge repeated).
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, float)):
        raise InvalidRequestError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise InvalidRequestError(f"fps must be in (0, {MAX_FPS:g}], got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise InvalidRequestError(f"crf must be an integer in [0, 51], got {crf!r}")
    if preset not in X264_PRESETS:
        raise InvalidRequestError(f"preset must be one of {', '.join(X264_PRESETS)}, got {preset!r}")

    frames = _pad_to_even(to_uint8_frames(video))
    num_frames, height, width, _ = frames.shape

    buffer = io.BytesIO()
    # No "+faststart": FFmpeg implements it by reopening the output by name, which an in-memory
    # buffer does not have; the index (moov) therefore follows the media data.
    with av.open(buffer, mode="w", format="mp4") as container:
        # 1001 covers NTSC rates such as 30000/1001 exactly.
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        # x264's output depends on its thread count, which it would otherwise derive from the
        # CPUs it sees: fixing it makes the same frames give the same bytes on every machine.
        stream.codec_context.thread_count = X264_THREADS
        # Tag the colour space we convert with, so players do not guess BT.601 for SD sizes.
        ctx = stream.codec_context
        ctx.colorspace = av.video.reformatter.Colorspace.ITU709
        ctx.color_range = av.video.reformatter.ColorRange.MPEG
        ctx.color_primaries = av.video.reformatter.ColorPrimaries.BT709
        ctx.color_trc = av.video.reformatter.ColorTrc.BT709
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame = frame.reformat(
                format="yuv420p",
                src_colorspace="ITU709",
                dst_colorspace="ITU709",
                src_color_range="JPEG",
                dst_color_range="MPEG",
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed frames
    data = buffer.getvalue()
    logger.debug(
        "encoded %d frames %dx%d at %g fps (crf %d, %s): %d bytes",
        num_frames,
        width,
        height,
        fps,
        crf,
        preset,
        len(data),
    )
    return data


def read_mp4_info(data: bytes) -> Mp4Info:
    """Frame count, size and frame rate of the first video stream of an MP4 in memory."""
    with _open_for_reading(data) as container:
        stream = container.streams.video[0]
        num_frames = stream.frames
        if num_frames <= 0:  # not in the header: count packets instead
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        return Mp4Info(int(num_frames), stream.codec_context.width, stream.codec_context.height, fps)


def decode_mp4(data: bytes) -> np.ndarray:
    """Decode every frame of the first video stream of an MP4 in memory.

    Returns:
        ``[F, H, W, 3]`` uint8 RGB.
    """
    with _open_for_reading(data) as container:
        frames = [
            frame.to_ndarray(format="rgb24", dst_color_range="JPEG") for frame in container.decode(video=0)
        ]
    if not frames:
        raise InvalidRequestError("the MP4 contains no decodable video frames")
    return np.stack(frames)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` -> ``[F, H', W', 3]`` with H', W' even (last row/column repeated)."""
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    logger.debug("padding %dx%d frames to %dx%d for yuv420p", width, height, width + pad_w, height + pad_h)
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _open_for_reading(data: bytes) -> av.container.InputContainer:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(f"MP4 data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidRequestError("MP4 data is empty")
    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r")
    except av.error.FFmpegError as exc:
        raise InvalidRequestError(f"cannot read the data as a video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise InvalidRequestError("the data has no video stream")
    return container
