"""Safe decoding of untrusted uploaded videos into RGB frames, and shaping them for Wan.

Used by face swap (issue 14) and VACE control videos (issue 15). Every upload is treated as
hostile, in the manner of :mod:`standin.image_io`:

- its size in bytes is checked before FFmpeg sees it;
- its container is recognised from its first bytes and only an allow-list is opened
  (:data:`CONTAINERS`: ISO-BMFF ``.mp4``/``.mov`` and Matroska/WebM), with that demuxer named
  explicitly, so FFmpeg never probes its way into a playlist (HLS ``.m3u8``), a ``concat`` list,
  an image sequence or any other demuxer that opens further files or URLs;
- the data is read from an in-memory buffer, FFmpeg's hook for opening any *other* resource
  refuses every request, and MP4 external data references (``dref``) are disabled, so nothing
  inside the container can reach the network or the file system;
- only the video codecs in :data:`CODECS` are decoded;
- frame size, frame count and duration are checked from the header before decoding, and
  again on every decoded frame (headers can lie); the decoder itself is told the per-frame
  pixel limit (FFmpeg's ``max_pixels``), so a forged bitstream cannot make it allocate a huge
  frame;
- anything that cannot be decoded completely is an :class:`InvalidVideoError` with a one-line
  reason, never a half-decoded video.

Frame timing: the frames are kept as decoded (none dropped or duplicated), in presentation
order. ``fps`` is the average rate over the decoded timestamps, ``(n - 1) / (t_last - t_first)``,
which equals the nominal rate of a constant-rate video exactly; a variable-rate video is
reported as such (``variable_frame_rate``) with its average rate.

Rotation: a display matrix (phones store portrait videos as rotated landscape frames) that is
a multiple of 90°, optionally mirrored, is applied, so the frames are returned as they are meant
to be shown. Any other angle is refused.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from standin.errors import InvalidVideoError

log = logging.getLogger(__name__)

__all__ = [
    "CODECS",
    "CONTAINERS",
    "DecodedVideo",
    "VideoHeader",
    "VideoLimits",
    "crop_to_multiple",
    "decode_video",
    "largest_4k_plus_1",
    "probe_video",
    "shape_for_wan",
]

# FFmpeg demuxer opened for each recognised container family.
CONTAINERS = {"mp4/mov": "mov", "matroska/webm": "matroska"}
# FFmpeg decoder names accepted (AV1 through whichever decoder this FFmpeg build prefers).
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4")
# ISO-BMFF top-level box types a file may start with (ftyp for MP4; QuickTime files may
# start with a free/wide/skip box or go straight to moov/mdat).
ISO_BMFF_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
MAX_FPS = 240.0
# Relative spread of frame intervals above which a video is reported as variable-rate
# (mp4 time bases make a constant 30 fps alternate between 533 and 534 ticks of 1/16000 s).
VFR_TOLERANCE = 0.05


@dataclass(frozen=True)
class VideoLimits:
    """Bounds an uploaded video must respect; checked from the header and while decoding.

    Face swap and VACE generate as many frames as the input has (the largest 4k + 1), at its
    size, so the defaults stay near what Wan2.1 generates: frames up to 720p (1280×720 either
    way up, its largest trained size), up to 241 frames (15 s at 16 fps) and 30 s, and at most
    121 frames' worth of 720p pixels in all (241 frames at 832×480 fit). Decoding holds the
    frames twice at its peak (3 bytes per pixel each: ~670 MB at the default total). The
    server exposes every field as a setting.
    """

    max_bytes: int = 100 * 1024 * 1024
    max_duration_s: float = 30.0
    max_frames: int = 241
    max_pixels_per_frame: int = 1280 * 720
    max_total_pixels: int = 1280 * 720 * 121
    min_side: int = 16


class FramesShape:
    """`num_frames`, `height` and `width` of a `frames` array shaped [F, H, W, ...]."""

    frames: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


@dataclass(frozen=True)
class DecodedVideo(FramesShape):
    """A decoded upload.

    Attributes:
        frames: uint8 ``[N, H, W, 3]`` RGB, rotation applied, in presentation order.
        fps: average frame rate over the decoded timestamps (the nominal rate when constant).
        variable_frame_rate: True when the frame intervals differ by more than 5%.
        rotation: degrees (counter-clockwise) that were applied to display the frames.
        mirrored: True when the display matrix also mirrored the frames (applied).
        container: ``"mp4/mov"`` or ``"matroska/webm"``.
        codec: the FFmpeg decoder name, e.g. ``"h264"``.
    """

    frames: np.ndarray
    fps: float
    variable_frame_rate: bool
    rotation: int
    mirrored: bool
    container: str
    codec: str

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def _open_upload(data: bytes, limits: VideoLimits) -> tuple[str, av.container.InputContainer]:
    """Check an upload's type and size, recognise its container, open it (allow-listed, no nested
    opens) → (container family, the open container)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidVideoError(f"video must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise InvalidVideoError("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidVideoError(f"the video is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    family = sniff_container(data)
    return family, _open(data, family, limits)


def decode_video(data: bytes, limits: VideoLimits | None = None) -> DecodedVideo:
    """Decode an uploaded video's first video stream (cover pictures skipped) into RGB frames.

    Args:
        data: the file's bytes, as uploaded.
        limits: bounds to enforce (defaults: :class:`VideoLimits`).

    Returns:
        A :class:`DecodedVideo` with ``frames`` uint8 ``[N, H, W, 3]`` and ``fps``.

    Raises:
        InvalidVideoError: the bytes are not an accepted, complete video within the limits.
    """
    limits = limits or VideoLimits()
    family, container = _open_upload(data, limits)
    try:
        stream = _first_video_stream(container)
        codec = _check_header(container, stream, limits)
        decoded, times, matrix = _decode_frames(container, stream, limits)
        expected = stream.frames
        header_rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    finally:
        container.close()
    if expected > 0 and len(decoded) < expected:
        raise InvalidVideoError(
            f"the video is truncated or corrupt: its header lists {expected} frames, {len(decoded)} decoded"
        )
    fps, variable = _frame_rate(times, header_rate)
    rotation, mirrored = _orientation(matrix)
    frames = _orient(np.stack(decoded), rotation, mirrored)
    log.debug(
        "decoded %s/%s video: %d frames %dx%d at %.3f fps%s%s",
        family,
        codec,
        frames.shape[0],
        frames.shape[2],
        frames.shape[1],
        fps,
        " (variable rate)" if variable else "",
        f", rotated {rotation}°" if rotation else "",
    )
    return DecodedVideo(frames, fps, variable, rotation, mirrored, family, codec)


@dataclass(frozen=True)
class VideoHeader:
    """What an upload's header says, checked against the limits without decoding any frame.

    Attributes:
        container: ``"mp4/mov"`` or ``"matroska/webm"``.
        codec: the FFmpeg decoder name.
        width, height: coded frame size (before any rotation; 0 when the header lacks it).
        frames: the header's frame count (0 when the container does not store one).
        duration_s: the header's duration, or None.
        fps: the header's average frame rate, or None.
    """

    container: str
    codec: str
    width: int
    height: int
    frames: int
    duration_s: float | None
    fps: float | None = None


def probe_video(data: bytes, limits: VideoLimits | None = None) -> VideoHeader:
    """Check an upload cheaply, as a server does when the request arrives: byte size, container,
    codec, and the header's frame size, count and duration against `limits`. No frame is decoded,
    so a file that passes may still fail :func:`decode_video` (truncated data, lying headers).

    Raises:
        InvalidVideoError: the bytes are not an accepted video within the limits.
    """
    limits = limits or VideoLimits()
    family, container = _open_upload(data, limits)
    try:
        stream = _first_video_stream(container)
        codec = _check_header(container, stream, limits)
        ctx = stream.codec_context
        header = VideoHeader(
            family,
            codec,
            int(ctx.width or 0),
            int(ctx.height or 0),
            int(stream.frames or 0),
            _header_duration(container, stream),
            float(rate) if (rate := stream.average_rate or stream.guessed_rate) else None,
        )
    finally:
        container.close()
    return header


def sniff_container(data: bytes) -> str:
    """The container family of ``data`` from its first bytes, or :class:`InvalidVideoError`.

    Only ISO-BMFF (MP4, MOV) and Matroska (MKV, WebM) are recognised; everything else (HLS and
    other playlists, FFmpeg concat lists, AVI, MPEG-TS, image files, text) is refused here,
    before any demuxer sees the bytes.
    """
    if len(data) >= 8 and data[4:8] in ISO_BMFF_FIRST_BOXES:
        return "mp4/mov"
    if data[:4] == EBML_MAGIC:
        return "matroska/webm"
    head = data[:16].lstrip()
    if head.startswith(b"#EXTM3U") or head.startswith(b"ffconcat") or head.startswith(b"file "):
        raise InvalidVideoError("playlists and concat lists are not accepted; upload the video file itself")
    raise InvalidVideoError(f"not a supported video container (accepted: {', '.join(CONTAINERS)})")


def _refuse_nested_open(url: str, flags: int, options: dict) -> None:
    """FFmpeg asks this hook to open any resource other than the upload itself: refuse all."""
    raise PermissionError("a video upload may not reference other files or URLs")


def _open(data: bytes, family: str, limits: VideoLimits) -> av.container.InputContainer:
    codec_options = {"max_pixels": str(limits.max_pixels_per_frame)}
    try:
        container = av.open(
            io.BytesIO(data),
            mode="r",
            format=CONTAINERS[family],
            container_options={"enable_drefs": "0"} if family == "mp4/mov" else {},
            stream_options=[codec_options],
            io_open=_refuse_nested_open,
        )
    except ValueError as e:
        # PyAV refuses per-stream options when the demuxer found no stream in the header.
        if "stream_options" in str(e):
            raise InvalidVideoError("the file has no video stream") from e
        raise InvalidVideoError(
            f"cannot read the {family} container: truncated or corrupt ({_reason(e)})"
        ) from e
    except (av.error.FFmpegError, PermissionError, OSError) as e:
        raise InvalidVideoError(
            f"cannot read the {family} container: truncated or corrupt ({_reason(e)})"
        ) from e
    if _first_video_stream(container) is None:
        container.close()
        raise InvalidVideoError("the file has no video stream")
    _first_video_stream(container).codec_context.options = codec_options
    return container


def _first_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first video stream that is not a cover picture (MP4/MKV may carry one)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _check_header(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, limits: VideoLimits
) -> str:
    """Codec, size, frame count and duration from the header, before decoding; → decoder name."""
    ctx = stream.codec_context
    name = ctx.name
    if name not in CODECS:
        raise InvalidVideoError(
            f"video codec {name!r} is not accepted (accepted: h264, hevc, vp8, vp9, av1, mpeg4)"
        )
    width, height = ctx.width, ctx.height
    if width and height:
        _check_size(width, height, limits)
    if stream.frames > limits.max_frames:
        raise InvalidVideoError(
            f"the video has {stream.frames} frames, more than the limit of {limits.max_frames}"
        )
    duration = _header_duration(container, stream)
    if duration is not None and duration > limits.max_duration_s:
        raise InvalidVideoError(
            f"the video lasts {duration:.1f} s, more than the limit of {limits.max_duration_s:g} s"
        )
    return name


def _header_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_size(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_pixels_per_frame:
        raise InvalidVideoError(
            f"the video is {width}x{height} = {width * height} pixels per frame, "
            f"more than the limit of {limits.max_pixels_per_frame}"
        )
    if min(width, height) < limits.min_side:
        raise InvalidVideoError(
            f"the video is {width}x{height}; its sides must be at least {limits.min_side}"
        )


def _decode_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, limits: VideoLimits
) -> tuple[list[np.ndarray], list[float], np.ndarray | None]:
    frames: list[np.ndarray] = []
    times: list[float] = []
    matrix: np.ndarray | None = None
    total = 0
    size: tuple[int, int] | None = None
    try:
        for frame in container.decode(stream):
            if size is None:
                size = (frame.width, frame.height)
                _check_size(frame.width, frame.height, limits)
                matrix = _display_matrix(frame)
            elif (frame.width, frame.height) != size:
                raise InvalidVideoError(
                    f"the frame size changes from {size[0]}x{size[1]} to {frame.width}x{frame.height}"
                )
            if len(frames) + 1 > limits.max_frames:
                raise InvalidVideoError(f"the video has more than the limit of {limits.max_frames} frames")
            total += frame.width * frame.height
            if total > limits.max_total_pixels:
                raise InvalidVideoError(
                    f"the video decodes to more than the limit of {limits.max_total_pixels} pixels in all"
                )
            if frame.time is not None:
                times.append(float(frame.time))
                if times[-1] - times[0] > limits.max_duration_s:
                    raise InvalidVideoError(
                        f"the video lasts more than the limit of {limits.max_duration_s:g} s"
                    )
            frames.append(frame.to_ndarray(format="rgb24", dst_color_range="JPEG"))
    except InvalidVideoError:
        raise
    except (av.error.FFmpegError, PermissionError, OSError, ValueError, MemoryError) as e:
        raise InvalidVideoError(f"the video data is truncated or corrupt ({_reason(e)})") from e
    if not frames:
        raise InvalidVideoError("the video contains no decodable frames")
    if len(times) != len(frames):
        times = []  # some frames without timestamps: fall back to the header's rate
    return frames, times, matrix


def _frame_rate(times: list[float], header_rate: Fraction | None) -> tuple[float, bool]:
    """(average fps, variable?) from the decoded timestamps; the header's rate as a fallback."""
    if len(times) >= 2:
        ordered = np.sort(np.asarray(times, dtype=np.float64))
        span = ordered[-1] - ordered[0]
        if span > 0:
            fps = (len(ordered) - 1) / span
            intervals = np.diff(ordered)
            variable = bool(np.abs(intervals - intervals.mean()).max() > VFR_TOLERANCE * intervals.mean())
            if math.isfinite(fps) and 0 < fps <= MAX_FPS:
                return float(fps), variable
    fps = float(header_rate) if header_rate else 0.0
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise InvalidVideoError("the video's frame rate cannot be determined (missing or broken timestamps)")
    return fps, False


def _display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's 3×3 display matrix side data as int32 ``[9]`` (16.16 fixed point), or None."""
    for side in frame.side_data:
        if side.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            raw = bytes(side)
            if len(raw) == 36:
                return np.frombuffer(raw, dtype="<i4").copy()
    return None


# (a, b, c, d) of a display matrix, by sign, for the eight axis-aligned orientations, as PyAV's
# ``VideoStream.set_display_rotation(degrees, hflip)`` writes them: rotate counter-clockwise
# by `degrees`, then mirror left-right when `hflip`.
_ORIENTATIONS = {
    (1, 0, 0, 1): (0, False),
    (0, -1, 1, 0): (90, False),
    (-1, 0, 0, -1): (180, False),
    (0, 1, -1, 0): (270, False),
    (-1, 0, 0, 1): (0, True),
    (0, -1, -1, 0): (90, True),
    (1, 0, 0, -1): (180, True),
    (0, 1, 1, 0): (270, True),
}


def _orientation(matrix: np.ndarray | None) -> tuple[int, bool]:
    """(degrees counter-clockwise, mirrored) to display the frames; refuse odd angles."""
    if matrix is None:
        return 0, False
    key = tuple(_snap_unit(int(v)) for v in matrix[[0, 1, 3, 4]])
    if key not in _ORIENTATIONS:
        raise InvalidVideoError(
            "the video's display matrix is not a multiple of 90° (rotated by an odd angle or "
            "skewed); re-encode it upright"
        )
    return _ORIENTATIONS[key]


def _snap_unit(value: int) -> int:
    """A 16.16 fixed-point matrix entry as 0, 1 or −1 (within 1/64), else 99 (not axis-aligned)."""
    unit = 1 << 16
    if abs(value) < unit // 64:
        return 0
    if abs(abs(value) - unit) < unit // 64:
        return 1 if value > 0 else -1
    return 99


def _orient(frames: np.ndarray, rotation: int, mirrored: bool) -> np.ndarray:
    """``[N, H, W, 3]`` → the frames as displayed: rotate counter-clockwise, then mirror."""
    if rotation:
        frames = np.rot90(frames, k=rotation // 90, axes=(1, 2))
    if mirrored:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


def _reason(error: BaseException) -> str:
    """A one-line, path-free description of a decoder error."""
    if isinstance(error, av.error.FFmpegError):
        text = error.strerror or type(error).__name__
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())[:200]


# ---------------------------------------------------------------- shaping for Wan


def largest_4k_plus_1(num_frames: int) -> int:
    """The largest ``4k + 1 <= num_frames`` (Wan's VAE maps 4k + 1 frames to k + 1 latents).

    The official face-swap and VACE scripts keep ``(n // 4) * 4 + 1`` frames, which is n + 1
    when n is a multiple of 4 (only n frames exist, so 4k frames are kept and the latent
    shapes disagree); this returns ``((n - 1) // 4) * 4 + 1`` instead.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise InvalidVideoError(f"the video needs at least 1 frame, got {num_frames!r}")
    return ((int(num_frames) - 1) // 4) * 4 + 1


def crop_to_multiple(frames: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Centre-crop ``[N, H, W, ...]`` to ``[N, H', W', ...]`` with H', W' multiples of `multiple`.

    Offsets as the official scripts: ``(H - H') // 2`` rows on top, ``(W - W') // 2`` columns
    on the left. Works on numpy arrays and torch tensors (a view, no copy).
    """
    if frames.ndim < 3:
        raise InvalidVideoError(f"frames must be shaped [N, H, W, ...], got {list(frames.shape)}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    new_h, new_w = (height // multiple) * multiple, (width // multiple) * multiple
    if new_h == 0 or new_w == 0:
        raise InvalidVideoError(
            f"the video is {width}x{height}; both sides must be at least {multiple} pixels"
        )
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return frames[:, top : top + new_h, left : left + new_w]


def shape_for_wan(frames: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Centre-crop to multiples of 16 and keep the first :func:`largest_4k_plus_1` frames.

    Args:
        frames: ``[N, H, W, ...]`` (RGB frames ``[N, H, W, 3]`` or masks ``[N, H, W]``),
            numpy or torch.

    Returns:
        ``[4k + 1, 16·⌊H/16⌋, 16·⌊W/16⌋, ...]``, a view of the input.

    Raises:
        InvalidVideoError: no frame, or a side shorter than 16 pixels.
    """
    if frames.ndim < 3:
        raise InvalidVideoError(f"frames must be shaped [N, H, W, ...], got {list(frames.shape)}")
    keep = largest_4k_plus_1(int(frames.shape[0]))
    return crop_to_multiple(frames, multiple)[:keep]
