"""Specification of MP4 encoding of decoded videos (in memory, PyAV)."""

import numpy as np
import pytest
import torch

from standin.errors import InvalidRequestError
from standin.video import Mp4Info, decode_mp4, encode_mp4, read_mp4_info, to_uint8_frames


def smooth_video(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving colour pattern in [-1, 1], shaped [3, F, H, W] like the VAE's output."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    red = torch.sin(3 * x + 2 * t) + 0 * y
    green = 0.8 * torch.cos(2 * y + t) + 0 * x
    blue = 0.9 * x * y + 0 * t
    return torch.stack([red, green, blue], dim=0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_round_trip_keeps_frame_count_size_fps_and_pixels():
    video = smooth_video(9, 64, 96)
    data = encode_mp4(video, fps=16)
    assert isinstance(data, bytes)
    assert read_mp4_info(data) == Mp4Info(num_frames=9, width=96, height=64, fps=16.0)
    decoded = decode_mp4(data)
    assert decoded.shape == (9, 64, 96, 3) and decoded.dtype == np.uint8
    assert psnr(decoded, to_uint8_frames(video)) > 30.0


def test_default_fps_is_wans_native_16():
    assert read_mp4_info(encode_mp4(smooth_video(3, 16, 16))).fps == 16.0


@pytest.mark.parametrize("fps", [25, 8.0, 29.97])
def test_requested_fps_is_written(fps):
    info = read_mp4_info(encode_mp4(smooth_video(4, 16, 16), fps=fps))
    assert info.fps == pytest.approx(fps, abs=1e-3)


def test_batched_tensor_with_batch_one_is_accepted():
    video = smooth_video(5, 32, 48)
    single = decode_mp4(encode_mp4(video, crf=10))
    batched = decode_mp4(encode_mp4(video[None], crf=10))
    np.testing.assert_array_equal(single, batched)


def test_uint8_frames_are_accepted():
    frames = to_uint8_frames(smooth_video(6, 32, 32))
    decoded = decode_mp4(encode_mp4(frames))
    assert decoded.shape == frames.shape
    assert psnr(decoded, frames) > 30.0


def test_flat_colours_survive_with_their_colour_matrix():
    # Flat blocks lose nothing to chroma subsampling, so any error beyond rounding would mean
    # the colour matrix written and the one read back disagree (BT.601 vs BT.709 is ~20 levels).
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[:, :16, :16] = [200, 30, 40]
    frames[:, :16, 16:] = [20, 180, 60]
    frames[:, 16:, :16] = [30, 60, 220]
    frames[:, 16:, 16:] = [128, 128, 128]
    decoded = decode_mp4(encode_mp4(frames, crf=0))
    for rows, cols in [
        (slice(4, 12), slice(4, 12)),
        (slice(4, 12), slice(20, 28)),
        (slice(20, 28), slice(4, 12)),
        (slice(20, 28), slice(20, 28)),
    ]:
        diff = decoded[:, rows, cols].astype(int) - frames[:, rows, cols].astype(int)
        assert np.abs(diff).max() <= 3


def test_float_values_are_rounded_and_clipped():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(3, 1, 1, 5)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 1, 5, 3)
    # (0 + 1) * 127.5 = 127.5 rounds half to even -> 128
    np.testing.assert_array_equal(frames[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_odd_sizes_are_padded_to_even_by_one_pixel():
    video = smooth_video(3, 33, 47)
    data = encode_mp4(video)
    info = read_mp4_info(data)
    assert (info.width, info.height) == (48, 34)
    decoded = decode_mp4(data)
    assert decoded.shape == (3, 34, 48, 3)
    reference = to_uint8_frames(video)
    assert psnr(decoded[:, :33, :47], reference) > 30.0
    # the added column repeats the last one
    assert psnr(decoded[:, :33, 47], reference[:, :, 46]) > 30.0


def test_single_frame_video():
    data = encode_mp4(smooth_video(1, 16, 24))
    assert read_mp4_info(data).num_frames == 1
    assert decode_mp4(data).shape == (1, 16, 24, 3)


def test_lower_crf_gives_higher_fidelity():
    video = smooth_video(4, 64, 64)
    reference = to_uint8_frames(video)
    good = psnr(decode_mp4(encode_mp4(video, crf=5)), reference)
    poor = psnr(decode_mp4(encode_mp4(video, crf=45)), reference)
    assert good > poor


@pytest.mark.parametrize(
    "video",
    [
        torch.zeros(3, 4, 16),  # missing a dimension
        torch.zeros(4, 2, 16, 16),  # 4 channels
        torch.zeros(2, 3, 2, 16, 16),  # batch of two
        torch.zeros(3, 0, 16, 16),  # no frames
        torch.zeros(3, 2, 16, 16, dtype=torch.uint8),  # integer tensor
        np.zeros((2, 16, 16, 3), np.float32),  # float numpy
        np.zeros((2, 16, 16), np.uint8),  # no channel axis
        np.zeros((0, 16, 16, 3), np.uint8),  # no frames
        [[0, 1, 2]],  # not an array
    ],
)
def test_malformed_video_raises_invalid_request(video):
    with pytest.raises(InvalidRequestError):
        encode_mp4(video)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"fps": -16},
        {"fps": float("nan")},
        {"fps": 1000},
        {"crf": -1},
        {"crf": 52},
        {"preset": "warp"},
    ],
)
def test_bad_encoding_options_raise_invalid_request(kwargs):
    with pytest.raises(InvalidRequestError):
        encode_mp4(smooth_video(2, 16, 16), **kwargs)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10])
def test_unreadable_bytes_raise_invalid_request(data):
    with pytest.raises(InvalidRequestError):
        read_mp4_info(data)
    with pytest.raises(InvalidRequestError):
        decode_mp4(data)


def test_same_frames_give_the_same_bytes_whatever_cpus_the_encoder_sees() -> None:
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, torch; from standin.video import encode_mp4; torch.manual_seed(0); "
        "print(hashlib.sha256(encode_mp4(torch.rand(3, 9, 64, 96) * 2 - 1)).hexdigest())"
    )
    digests = set()
    for cpus in ({0}, set(range(os.cpu_count() or 1))):
        pre = f"import os; os.sched_setaffinity(0, {sorted(cpus)}); "
        out = subprocess.run([sys.executable, "-c", pre + script], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1
