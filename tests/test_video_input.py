"""Safe decoding of uploaded videos: accepted containers and codecs, limits, hostile files,
frame rate and rotation; and the shaping of frames for Wan (multiples of 16, 4k + 1 frames)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from standin.errors import InvalidVideoError
from standin.video_input import (
    DecodedVideo,
    VideoLimits,
    crop_to_multiple,
    decode_video,
    largest_4k_plus_1,
    shape_for_wan,
    sniff_container,
)

MP4 = "mp4"
WEBM = "webm"
MKV = "matroska"


def frame_pattern(index: int, height: int, width: int) -> np.ndarray:
    """A smooth RGB frame with a white 8×8 marker in the stored top-left corner."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    t = index / 10
    rgb = np.stack(
        [
            128 + 90 * np.sin(3 * x + t) + 0 * y,
            128 + 90 * np.cos(2 * y + t) + 0 * x,
            128 + 60 * (x - y),
        ],
        axis=-1,
    )
    frame = np.clip(rgb, 0, 255).astype(np.uint8)
    frame[:8, :8] = 255
    return frame


def encode(
    num_frames: int = 6,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    fmt: str = MP4,
    fps: int = 16,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    hflip: bool = False,
    pix_fmt: str = "yuv420p",
) -> bytes:
    """A real small video made with PyAV in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            if time_base is not None:
                frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def assert_clean_refusal(data: bytes, match: str, limits: VideoLimits | None = None) -> str:
    """The decoder refuses with one line, no file paths and no Python internals."""
    with pytest.raises(InvalidVideoError, match=match) as info:
        decode_video(data, limits)
    message = str(info.value)
    assert "\n" not in message and not re.search(r"/\w+/|\.py\b|Traceback|<", message)
    return message


# ---------------------------------------------------------------- accepted videos


@pytest.mark.parametrize(
    ("codec", "fmt", "width", "height"),
    [
        ("libx264", MP4, 64, 48),
        ("libx264", MP4, 96, 160),
        ("libx264", MKV, 80, 64),
        ("mpeg4", MP4, 64, 48),
        ("mpeg4", MP4, 112, 64),
        ("libvpx", WEBM, 64, 48),
        ("libvpx-vp9", WEBM, 48, 80),
    ],
)
def test_accepted_codecs_and_containers_decode_every_frame(codec, fmt, width, height) -> None:
    video = decode_video(encode(7, width, height, codec=codec, fmt=fmt))
    assert isinstance(video, DecodedVideo)
    assert video.frames.shape == (7, height, width, 3) and video.frames.dtype == np.uint8
    assert video.frames.flags.c_contiguous
    assert video.fps == pytest.approx(16.0, abs=1e-6)
    assert not video.variable_frame_rate
    assert video.rotation == 0 and not video.mirrored
    reference = np.stack([frame_pattern(i, height, width) for i in range(7)])
    assert psnr(video.frames, reference) > 28


@pytest.mark.parametrize("fps", [25, 30, 8])
def test_constant_frame_rate_is_kept(fps: int) -> None:
    video = decode_video(encode(9, fps=fps))
    assert video.fps == pytest.approx(fps, rel=1e-3)
    assert not video.variable_frame_rate
    assert video.duration_s == pytest.approx(9 / fps, rel=1e-3)


def test_ntsc_rate_is_kept() -> None:
    buffer_rate = Fraction(30000, 1001)
    video = decode_video(encode(7, fps=buffer_rate))  # type: ignore[arg-type]
    assert video.fps == pytest.approx(29.97, abs=0.01)
    assert not video.variable_frame_rate


def test_variable_frame_rate_keeps_every_frame_and_reports_the_average() -> None:
    pts_ms = [0, 40, 80, 200, 240, 400]  # irregular: 40, 40, 120, 40, 160 ms
    video = decode_video(encode(6, pts=pts_ms, time_base=Fraction(1, 1000)))
    assert video.num_frames == 6
    assert video.variable_frame_rate
    assert video.fps == pytest.approx(5 / 0.4, rel=1e-6)  # (n - 1) / (t_last - t_first)


def test_single_frame_video_takes_the_header_rate() -> None:
    video = decode_video(encode(1, fps=25))
    assert video.num_frames == 1
    assert video.fps == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("rotation", "hflip"),
    [(90, False), (180, False), (270, False), (0, True), (90, True)],
)
def test_display_rotation_is_applied(rotation: int, hflip: bool) -> None:
    stored = decode_video(encode(3, 64, 32))
    video = decode_video(encode(3, 64, 32, rotation=rotation, hflip=hflip))
    expected = np.rot90(stored.frames, k=rotation // 90, axes=(1, 2))
    if hflip:
        expected = expected[:, :, ::-1]
    assert video.rotation == rotation and video.mirrored == hflip
    np.testing.assert_array_equal(video.frames, expected)
    assert video.frames.flags.c_contiguous


def test_ninety_degrees_puts_the_stored_top_left_marker_bottom_left() -> None:
    # Counter-clockwise by 90°: the stored top-left corner is shown bottom-left, and a
    # landscape 64×32 frame is shown as a portrait 32×64 one.
    video = decode_video(encode(2, 64, 32, rotation=90))
    assert video.frames.shape == (2, 64, 32, 3)
    assert video.frames[0, -6:, :6].min() > 200
    assert video.frames[0, :6, :6].max() < 250


def test_display_matrix_rounding_noise_is_tolerated() -> None:
    from standin.video_input import _orientation

    noisy = np.array([3, -65535, 0, 65534, -2, 0, 0, 0, 1 << 30], dtype=np.int32)
    assert _orientation(noisy) == (90, False)
    assert _orientation(None) == (0, False)


def test_odd_rotation_angle_is_refused() -> None:
    assert_clean_refusal(encode(2, 64, 32, rotation=45), "multiple of 90")


# ---------------------------------------------------------------- hostile or broken input


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x00" * 100, "not a supported video container"),
        (b"this is not a video at all" * 20, "not a supported video container"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a supported video container"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4, "truncated or corrupt"),
        (b"\x1a\x45\xdf\xa3" + b"\xff" * 300, "truncated or corrupt"),
    ],
)
def test_garbage_is_refused(data: bytes, match: str) -> None:
    assert_clean_refusal(data, match)


def test_non_bytes_are_refused() -> None:
    with pytest.raises(InvalidVideoError, match="must be bytes"):
        decode_video("/etc/passwd")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "playlist",
    [
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://example.com/a.ts\n#EXT-X-ENDLIST\n",
        b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n",
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        b"file 'a.mp4'\nfile 'b.mp4'\n",
    ],
)
def test_playlists_and_concat_lists_are_refused_before_any_demuxer(playlist: bytes) -> None:
    assert_clean_refusal(playlist, "playlists and concat lists are not accepted")


def test_mp4_box_naming_a_playlist_is_not_followed() -> None:
    # An ISO-BMFF lookalike whose payload is an HLS playlist: opened with the MP4 demuxer only
    # (never the HLS one), so it is just corrupt.
    data = b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00" + b"#EXTM3U\n#EXTINF:1,\nhttp://example.com/x.ts\n"
    assert_clean_refusal(data, "truncated or corrupt|no video")


def test_even_a_playlist_demuxer_could_not_open_the_files_it_names(tmp_path, monkeypatch) -> None:
    # Belt and braces behind the allow-list: were an HLS playlist ever handed to FFmpeg's HLS
    # demuxer, the hook through which FFmpeg opens every nested resource refuses it.
    import standin.video_input as video_input

    segment = tmp_path / "segment.ts"
    segment.write_bytes(encode(5, fmt="mpegts"))
    playlist = (
        f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile://{segment}\n#EXT-X-ENDLIST\n"
    ).encode()
    # The threat is real: without the hook, FFmpeg reads the local file the playlist names.
    with av.open(io.BytesIO(playlist), format="hls", options={"protocol_whitelist": "file"}) as container:
        assert len(list(container.decode(video=0))) == 5
    monkeypatch.setitem(video_input.CONTAINERS, "mp4/mov", "hls")
    with pytest.raises(InvalidVideoError, match="may not reference other files or URLs") as info:
        video_input._open(playlist, "mp4/mov", VideoLimits())
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("fmt", [MP4, MKV])
@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_files_are_refused(fmt: str, keep: float) -> None:
    data = encode(12, 64, 48, fmt=fmt)
    assert_clean_refusal(data[: int(len(data) * keep)], "truncated or corrupt|no decodable")


def test_truncated_matroska_keeping_its_header_is_refused_or_shorter() -> None:
    # Matroska has no frame index in front; a cut in the middle of the clusters either
    # fails to decode or yields fewer frames, never garbage frames of another shape.
    data = encode(20, 64, 48, fmt=MKV)
    try:
        video = decode_video(data[: int(len(data) * 0.7)])
    except InvalidVideoError:
        return
    assert 0 < video.num_frames < 20 and video.frames.shape[1:] == (48, 64, 3)


def test_corrupt_mp4_payload_is_refused_or_decodes_to_the_right_shape() -> None:
    data = bytearray(encode(8, 64, 48))
    middle = len(data) // 3
    data[middle : middle + 200] = bytes(200)
    try:
        video = decode_video(bytes(data))
    except InvalidVideoError:
        return
    assert video.frames.shape == (8, 48, 64, 3)


@pytest.mark.parametrize("fmt", [MP4, MKV])
def test_zero_frame_file_is_refused(fmt: str) -> None:
    # A container with a video track declared and no frame in it.
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    assert len(buffer.getvalue()) > 0
    assert_clean_refusal(buffer.getvalue(), "no decodable frames|no video stream|truncated or corrupt")


def test_audio_only_file_is_refused() -> None:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=MKV) as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert_clean_refusal(buffer.getvalue(), "no video stream")


def test_cover_picture_stream_is_skipped() -> None:
    # An MP4 whose first video stream is a cover picture (MJPEG, attached_pic), then the video.
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=MP4) as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        picture.pts = 0
        container.mux(cover.encode(picture))
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    video = decode_video(buffer.getvalue())
    assert video.codec == "h264" and video.frames.shape == (5, 48, 64, 3)


def test_codec_outside_the_list_is_refused() -> None:
    assert_clean_refusal(
        encode(3, 64, 48, codec="mjpeg", fmt=MKV, pix_fmt="yuvj420p"), "codec 'mjpeg' is not accepted"
    )


def test_forged_keyframe_claiming_a_huge_frame_is_refused_without_decoding_it() -> None:
    # A VP8 keyframe stores its size right after the start code 9d 01 2a; claim 8000×8000
    # (64 Mpixel) behind a container header that says 64×48. The decoder is told the limit.
    data = bytearray(encode(3, 64, 48, codec="libvpx", fmt=WEBM))
    start = data.find(b"\x9d\x01\x2a")
    assert start > 0
    data[start + 3 : start + 7] = (8000).to_bytes(2, "little") + (8000).to_bytes(2, "little")
    assert_clean_refusal(bytes(data), "truncated or corrupt|pixels")


def test_forged_keyframe_does_not_make_the_decoder_allocate_the_frame() -> None:
    # The same forgery, in a fresh process whose peak memory we can read: without the decoder's
    # pixel limit FFmpeg allocates the 96 MB 8000×8000 frame before it finds the data corrupt.
    script = f"""
import resource, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from test_video_input import encode
from standin.errors import InvalidVideoError
from standin.video_input import decode_video
data = bytearray(encode(3, 64, 48, codec="libvpx", fmt="webm"))
decode_video(bytes(data))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = data.find(b"\\x9d\\x01\\x2a")
data[start + 3 : start + 7] = (8000).to_bytes(2, "little") * 2
try:
    decode_video(bytes(data))
except InvalidVideoError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 48, f"peak memory grew by {out.stdout.strip()} MB"


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = encode(3)
    assert_clean_refusal(data, "bytes, more than the limit", VideoLimits(max_bytes=len(data) - 1))
    assert decode_video(data, VideoLimits(max_bytes=len(data))).num_frames == 3


def test_too_many_pixels_per_frame_is_refused_from_the_header() -> None:
    data = encode(3, 64, 48)
    assert_clean_refusal(data, "pixels per frame", VideoLimits(max_pixels_per_frame=64 * 48 - 1))
    assert decode_video(data, VideoLimits(max_pixels_per_frame=64 * 48)).num_frames == 3


def test_too_many_frames_is_refused() -> None:
    mp4, mkv = encode(9), encode(9, fmt=MKV)  # MP4 lists its frames in the header, Matroska not
    assert_clean_refusal(mp4, "9 frames, more than the limit of 8", VideoLimits(max_frames=8))
    assert_clean_refusal(mkv, "more than the limit of 8 frames", VideoLimits(max_frames=8))
    assert decode_video(mkv, VideoLimits(max_frames=9)).num_frames == 9


def test_too_many_pixels_in_all_is_refused() -> None:
    limits = VideoLimits(max_total_pixels=64 * 48 * 5)
    assert_clean_refusal(encode(6, 64, 48), "pixels in all", limits)
    assert decode_video(encode(5, 64, 48), limits).num_frames == 5


def test_too_long_is_refused() -> None:
    data = encode(9, fps=4)  # 2.25 s
    assert_clean_refusal(data, "lasts", VideoLimits(max_duration_s=2.0))
    assert decode_video(data, VideoLimits(max_duration_s=2.5)).num_frames == 9


def test_too_small_sides_are_refused() -> None:
    assert_clean_refusal(encode(2, 64, 48), "at least 50", VideoLimits(min_side=50))


def test_sniffing_names_the_two_families() -> None:
    assert sniff_container(encode(1)) == "mp4/mov"
    assert sniff_container(encode(1, fmt=WEBM, codec="libvpx")) == "matroska/webm"


# ---------------------------------------------------------------- shaping for Wan


@pytest.mark.parametrize(
    ("n", "kept"), [(1, 1), (2, 1), (4, 1), (5, 5), (8, 5), (9, 9), (80, 77), (81, 81), (84, 81)]
)
def test_largest_4k_plus_1_never_exceeds_the_frames_there_are(n: int, kept: int) -> None:
    assert largest_4k_plus_1(n) == kept
    assert (kept - 1) % 4 == 0 and kept <= n
    official = (n // 4) * 4 + 1  # the official rule, wrong exactly when n % 4 == 0
    assert (official == kept) == (n % 4 != 0)


@pytest.mark.parametrize("n", [0, -3])
def test_no_frames_is_a_clear_error(n: int) -> None:
    with pytest.raises(InvalidVideoError, match="at least 1 frame"):
        largest_4k_plus_1(n)


def test_shape_for_wan_centre_crops_and_trims() -> None:
    frames = np.arange(10 * 50 * 37 * 3, dtype=np.int64).reshape(10, 50, 37, 3)
    out = shape_for_wan(frames)
    assert out.shape == (9, 48, 32, 3)
    # (50 - 48) // 2 = 1 row on top, (37 - 32) // 2 = 2 columns on the left, as the official
    np.testing.assert_array_equal(out, frames[:9, 1:49, 2:34])


def test_shape_for_wan_works_on_masks_and_tensors() -> None:
    masks = torch.zeros(8, 40, 70)
    assert tuple(shape_for_wan(masks).shape) == (5, 32, 64)
    assert crop_to_multiple(np.zeros((3, 33, 16)), 16).shape == (3, 32, 16)


@pytest.mark.parametrize("shape", [(4, 15, 64, 3), (4, 64, 8, 3)])
def test_frames_smaller_than_16_pixels_are_a_clear_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidVideoError, match="at least 16 pixels"):
        shape_for_wan(np.zeros(shape, np.uint8))


def test_empty_frames_are_a_clear_error() -> None:
    with pytest.raises(InvalidVideoError, match="at least 1 frame"):
        shape_for_wan(np.zeros((0, 32, 32, 3), np.uint8))


def test_decoded_upload_goes_straight_into_shaping() -> None:
    video = decode_video(encode(12, 72, 40))
    shaped = shape_for_wan(video.frames)
    assert shaped.shape == (9, 32, 64, 3)
