"""Safe decoding of untrusted uploads: every accepted format, every refused input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from standin.errors import InvalidImageError
from standin.image_io import ImageLimits, decode_image, pad_resize_square, supported_formats

RED = (220, 20, 30)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB or lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 128, np.float32)],
        axis=2,
    )
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "AVIF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    src = gradient()
    out = decode_image(encode(src, fmt, quality=95) if fmt != "PNG" else encode(src, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)
    err = np.abs(np.asarray(out, np.int16) - np.asarray(src, np.int16)).mean()
    assert err < 6, f"{fmt} decoded far from the source (mean abs error {err:.1f})"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt: str) -> None:
    assert fmt not in supported_formats()
    with pytest.raises(InvalidImageError, match="not a supported image"):
        decode_image(encode(gradient(), fmt))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x00" * 100, "not a supported image"),
        (b"GIF89a this is not really anything", "not a supported image"),
        (b"<html>hello</html>", "not a supported image"),
    ],
)
def test_empty_and_garbage_bytes_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        decode_image(data)


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="must be bytes"):
        decode_image("/etc/passwd")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_image_is_refused(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(InvalidImageError, match="truncated or corrupt|header"):
        decode_image(data[: len(data) // 2])


def test_truncated_upload_leaves_pillow_settings_alone() -> None:
    data = encode(gradient(), "PNG")
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(InvalidImageError):
        decode_image(data[:-30])
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(InvalidImageError, match="bytes, more than the limit"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert decode_image(data, ImageLimits(max_bytes=len(data))).size == (64, 48)


def test_too_many_pixels_is_refused() -> None:
    data = encode(gradient(64, 48), "PNG")
    with pytest.raises(InvalidImageError, match="pixels, more than the limit"):
        decode_image(data, ImageLimits(max_pixels=64 * 48 - 1))


def test_decompression_bomb_header_is_refused_without_decoding() -> None:
    # A 40000×40000 greyscale PNG header over a few bytes of data: a classic bomb.
    bomb = raw_png(40_000, 40_000, 8, 0, b"\x00" * 100)
    assert len(bomb) < 200
    with pytest.raises(InvalidImageError, match="pixels"):
        decode_image(bomb, ImageLimits(max_pixels=10**12, max_side=10**6))
    with pytest.raises(InvalidImageError, match="pixels"):
        decode_image(bomb)


@pytest.mark.parametrize(("size", "reason"), [((8, 400), "at least"), ((13_000, 20), "at most")])
def test_extreme_sides_are_refused(size: tuple[int, int], reason: str) -> None:
    data = encode(Image.new("RGB", size, RED), "PNG")
    with pytest.raises(InvalidImageError, match=reason):
        decode_image(data)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste(RED, (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = np.asarray(decode_image(encode(img, "JPEG", exif=exif, quality=95)))
    assert out.shape == (40, 20, 3)
    # After a clockwise turn the stored top-left corner is displayed top-right.
    assert out[2:8, 12:18, 0].mean() > 180 and out[2:8, 12:18, 1].mean() < 60
    assert out[2:8, 2:8].min() > 200


def test_rgba_is_composited_on_white() -> None:
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[:, :16] = (*RED, 255)  # opaque red
    arr[:, 16:24] = (0, 0, 0, 0)  # fully transparent (black underneath)
    arr[:, 24:] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert tuple(out[5, 5]) == RED
    assert tuple(out[5, 20]) == (255, 255, 255)
    assert np.abs(out[5, 28].astype(int) - 127).max() <= 2


def test_grey_with_alpha_is_composited_on_white() -> None:
    arr = np.zeros((20, 20, 2), np.uint8)  # black, fully transparent
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "LA"), "PNG")))
    assert out.min() == 255


def test_palette_images_keep_colours_and_transparency() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, *RED, 10, 200, 30] + [0] * (253 * 3))
    img.paste(1, (0, 0, 10, 20))
    img.paste(2, (10, 0, 20, 10))
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[5, 5]) == RED and tuple(out[5, 15]) == (10, 200, 30)
    assert tuple(out[15, 15]) == (0, 0, 0)
    transparent = np.asarray(decode_image(encode(img, "PNG", transparency=0)))
    assert tuple(transparent[15, 15]) == (255, 255, 255)
    assert tuple(transparent[5, 5]) == RED


def test_16bit_grey_png_is_rescaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16).repeat(16, 0).repeat(16, 1)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert out.shape == (16, 64, 3)
    assert [int(out[0, 16 * i, 0]) for i in range(4)] == [0, 128, 255, 4]


def test_16bit_rgb_png_keeps_its_colours() -> None:
    w, h = 16, 16
    pixel = struct.pack(">HHH", 65535, 32896, 0)  # (255, 128, 0) in 8 bits
    rows = b"".join(b"\x00" + pixel * w for _ in range(h))
    out = np.asarray(decode_image(raw_png(w, h, 16, 2, rows)))
    assert out.shape == (h, w, 3)
    assert tuple(out[3, 3]) == (255, 128, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(encode(img, "JPEG", quality=95)))
    r, g, b = out[16, 16].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_pad_resize_square_centres_a_wide_image_on_white() -> None:
    img = Image.new("RGB", (200, 100), RED)
    out = np.asarray(pad_resize_square(img, 64))
    assert out.shape == (64, 64, 3)
    assert (out[:16] == 255).all() and (out[48:] == 255).all()
    assert (out[16:48] == RED).all()


def test_pad_resize_square_of_a_region_uses_only_that_region() -> None:
    img = Image.new("RGB", (300, 300), (0, 0, 255))
    img.paste(RED, (100, 50, 200, 250))
    out = np.asarray(pad_resize_square(img, 100, box=(100, 50, 200, 250)))
    assert (out[:, 25:75] == RED).all()
    assert (out[:, :25] == 255).all() and (out[:, 75:] == 255).all()
