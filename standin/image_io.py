"""Safe decoding of untrusted uploaded images into plain 8-bit RGB.

Every upload is treated as hostile: it is size-checked in bytes before Pillow sees it, its
pixel count and side lengths are checked from the header before any pixel is decoded, and
only a short list of formats is accepted. Anything that cannot be decoded completely is an
`InvalidImageError` whose message says why, never a half-decoded image.

Pillow's process-wide settings (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`)
are read, never changed: other code in the same process may rely on them.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from standin.errors import InvalidImageError

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)


def supported_formats() -> tuple[str, ...]:
    """The Pillow format names accepted for uploads (AVIF only when this Pillow has it)."""
    formats = ["JPEG", "PNG", "WEBP"]
    if features.check("avif"):
        formats.append("AVIF")
    return tuple(formats)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an upload must respect before its pixels are decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    min_side: int = 16


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode uploaded bytes into an RGB image of shape [H, W, 3] uint8 (as a PIL image).

    EXIF orientation is applied; transparency is composited on white; 16-bit, palette,
    greyscale and CMYK images are converted to 8-bit RGB. Raises `InvalidImageError`.
    """
    limits = limits or ImageLimits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"the image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    with warnings.catch_warnings():
        # Pillow only warns between 1× and 2× its bomb limit; refuse those too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=supported_formats())
        except UnidentifiedImageError as e:
            raise InvalidImageError(
                f"not a supported image (accepted: {', '.join(supported_formats())})"
            ) from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidImageError(f"the image has too many pixels: {e}") from e
        except Exception as e:  # Pillow plugins raise many types on corrupt headers
            raise InvalidImageError(f"cannot read the image header: {e}") from e
        _check_size(img.size, limits)
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidImageError(f"the image has too many pixels: {e}") from e
        except Exception as e:
            raise InvalidImageError(f"the image data is truncated or corrupt: {e}") from e
    img = _apply_orientation(img)
    return to_rgb(img)


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise InvalidImageError(
            f"the image is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_pixels}"
        )
    if max(w, h) > limits.max_side:
        raise InvalidImageError(f"the image is {w}x{h}; its sides must be at most {limits.max_side}")
    if min(w, h) < limits.min_side:
        raise InvalidImageError(f"the image is {w}x{h}; its sides must be at least {limits.min_side}")


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:
        # A broken EXIF block should not cost the user the upload; the pixels are fine.
        log.warning("ignoring unreadable EXIF orientation: %s", e)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB; transparency becomes white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255 (an all-white image); rescale.
        arr = np.asarray(img).astype(np.float32)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def pad_resize_square(
    img: Image.Image, size: int, box: tuple[int, int, int, int] | None = None
) -> Image.Image:
    """Pad `img` (or its region `box` = (left, top, right, bottom)) to a centred white
    square and resize that square to [size, size] RGB.

    Equivalent to padding first and then resizing with area interpolation, but the padding
    is never materialised at full resolution: the region is resized on its own and pasted
    on a white canvas (the two differ by at most half an output pixel at the content edge).
    """
    region = img if box is None else img.crop(box)
    w, h = region.size
    side = max(w, h)
    scale = size / side
    # The official recipe puts the odd padding pixel on the right / bottom.
    pad_left, pad_top = (side - w) // 2, (side - h) // 2
    x0, y0 = round(pad_left * scale), round(pad_top * scale)
    new_w = max(1, min(size - x0, round(w * scale)))
    new_h = max(1, min(size - y0, round(h * scale)))
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(resize_area(region, (new_w, new_h)), (x0, y0))
    return canvas


def resize_area(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to `size` = (width, height): pixel-area averaging when shrinking (what
    OpenCV's INTER_AREA does), bilinear when enlarging."""
    if img.size == size:
        return img
    shrinking = size[0] <= img.size[0] and size[1] <= img.size[1]
    return img.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
