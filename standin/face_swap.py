"""Face swap preprocessing: paste the reference's face into every frame of a video, and its mask.

What the official ``VideoMaskGenerator`` does (Stand-In's ``preprocessor/videomask_generator.py``),
in plain numpy/torch (no OpenCV):

Per frame, the largest detected face with five landmarks (score > 0.5):

- **landmark path** (the reference has landmarks): a 4-DOF similarity (scale, rotation,
  translation) from the reference's five landmarks to the frame's, fitted robustly by
  least-median-of-squares (:func:`fit_similarity_lmeds`); the reference RGB and its alpha are
  warped into the frame (bilinear, zero outside), pasted as ``frame = (1 − a)·frame + a·warped``,
  and the mask is the warped alpha (no dilation, no feathering);
- **box path** (the reference has no landmarks, or the fit fails): a square of 1.5× the face
  box's longer side around its centre, clipped to the frame; the whole reference resized into it
  (Lanczos) and pasted with a soft mask;
- **no face**: the frame is left untouched and its mask is all zero.

Alpha and masks:

- with a face parser (``parsing_bisenet.pth``, supplied by the user): the reference's alpha is
  255 on the parser's non-background classes (:func:`swap_reference`), and the box path's mask
  is the frame crop's face classes 1–13, dilated (ellipse 10×10), blurred (Gaussian 21×21) as
  the official;
- without one (no wheel ships parser weights): a **landmark soft mask**
  (:func:`landmark_soft_mask`): an ellipse aligned with the face, centred between the eyes'
  and the mouth's midpoints, semi-axes 1.5× the eye-to-mouth distance (along the face) and 1.15×
  the eye distance (across), full inside 80% of its radius and falling smoothly to 0 at its edge;
  the box path uses the ellipse inscribed in the detected face box with the same edge.

Differences from the official code, on purpose: no random horizontal flip (a training
leftover); values are rounded to uint8, not truncated; the LMedS fit enumerates every pair of
landmarks instead of sampling them at random, so the result is deterministic.

Everything here is a pure function of its inputs except :class:`FacePaster`, which only holds
the loaded detector and parser (no per-request state).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from standin.errors import InvalidRequestError
from standin.face import face_square
from standin.face_detectors import FaceBox
from standin.face_landmarks import FaceLandmarks, LandmarkDetector, largest_face_landmarks
from standin.image_io import resize_area

log = logging.getLogger(__name__)

__all__ = [
    "FacePaster",
    "Similarity",
    "SwapReference",
    "SwappedVideo",
    "box_soft_mask",
    "fit_similarity",
    "fit_similarity_lmeds",
    "landmark_soft_mask",
    "paste",
    "swap_reference",
    "warp_affine",
]

# Face-parser classes pasted by the box path (CelebAMask-HQ: skin, brows, eyes, glasses, ears,
# earring, nose, mouth, lips), and its clean-up, as the official mask generator.
FACE_CLASSES = tuple(range(1, 14))
DILATION_SIZE = 10
BLUR_SIZE = 21
PARSER_SIZE = 512
# The official mask generator normalises frame crops with ImageNet statistics (its reference
# preprocessor uses 0.5 / 0.5); we follow each where it applies.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Landmark soft mask: semi-axes in units of the eye-to-mouth / eye-to-eye distances, and the
# fraction of the radius over which it fades out.
MASK_ALONG = 1.5
MASK_ACROSS = 1.15
MASK_FEATHER = 0.2
# LMedS inlier threshold, as usual for LMedS: 2.5 robust standard deviations estimated from
# the best median, with a small-sample correction; never below MIN_INLIER_PX.
MIN_INLIER_PX = 1e-3

PastePath = Literal["landmarks", "box", "none"]


# ---------------------------------------------------------------- similarity transforms


@dataclass(frozen=True)
class Similarity:
    """``x' = s·R(θ)·x + t``, stored as the 2×3 matrix ``[[a, −b, tx], [b, a, ty]]``.

    Attributes:
        matrix: float64 ``[2, 3]`` mapping (x, y, 1) in the source to (x', y') in the target.
    """

    matrix: np.ndarray

    @classmethod
    def from_params(cls, scale: float, angle_deg: float, tx: float, ty: float) -> Similarity:
        """Scale, counter-clockwise angle in degrees (as displayed, y down), translation."""
        theta = math.radians(angle_deg)
        # y points down in images, so a visually counter-clockwise turn is −θ in (x, y).
        a, b = scale * math.cos(-theta), scale * math.sin(-theta)
        return cls(np.array([[a, -b, tx], [b, a, ty]], dtype=np.float64))

    @property
    def scale(self) -> float:
        return float(math.hypot(self.matrix[0, 0], self.matrix[1, 0]))

    @property
    def angle_deg(self) -> float:
        """Counter-clockwise rotation as displayed (y down)."""
        return float(-math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0])))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``[N, 2]`` → ``[N, 2]``."""
        pts = np.asarray(points, dtype=np.float64)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def then(self, other: Similarity) -> Similarity:
        """This transform followed by ``other``."""
        lin = other.matrix[:, :2] @ self.matrix[:, :2]
        shift = other.matrix[:, :2] @ self.matrix[:, 2] + other.matrix[:, 2]
        return Similarity(np.concatenate([lin, shift[:, None]], axis=1))


def _check_points(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise InvalidRequestError(
            f"landmarks must be two [N, 2] arrays with N >= 2, got {list(src.shape)} and {list(dst.shape)}"
        )
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise InvalidRequestError("landmarks must be finite")
    return src, dst


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> Similarity | None:
    """Least-squares similarity mapping ``src`` ``[N, 2]`` onto ``dst`` ``[N, 2]`` (N >= 2).

    Minimises ``Σ |s·R·src_i + t − dst_i|²`` over (a = s·cos θ, b = s·sin θ, tx, ty), a linear
    problem. None when the source points coincide (no unique solution).
    """
    src, dst = _check_points(src, dst)
    if np.ptp(src, axis=0).max() <= 1e-9 * max(1.0, float(np.abs(src).max())):
        return None
    n = src.shape[0]
    x, y = src[:, 0], src[:, 1]
    design = np.zeros((2 * n, 4))
    design[0::2] = np.stack([x, -y, np.ones(n), np.zeros(n)], axis=1)
    design[1::2] = np.stack([y, x, np.zeros(n), np.ones(n)], axis=1)
    target = dst.reshape(-1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
    if not math.isfinite(a) or math.hypot(a, b) <= 1e-12:
        return None
    return Similarity(np.array([[a, -b, tx], [b, a, ty]], dtype=np.float64))


def _residuals(model: Similarity, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.sum((model.apply(src) - dst) ** 2, axis=1)


def fit_similarity_lmeds(src: np.ndarray, dst: np.ndarray) -> Similarity | None:
    """Robust similarity ``src`` → ``dst`` by least median of squares, then least squares on
    the inliers.

    Every pair of points defines a candidate (two points fix a similarity); the candidate with
    the smallest median squared residual wins (ties: the first pair in index order). Points
    within ``2.5 · 1.4826 · (1 + 5 / (N − 2)) · √median`` of it are inliers, and the result is
    the least-squares fit to them. Up to ⌈N/2⌉ − 1 points (2 of 5 landmarks) may be arbitrarily
    wrong. Deterministic. None when no pair of source points is distinct.

    Args:
        src: ``[N, 2]`` reference landmarks. dst: ``[N, 2]`` frame landmarks.
    """
    src, dst = _check_points(src, dst)
    n = src.shape[0]
    if n == 2:
        return fit_similarity(src, dst)
    best: Similarity | None = None
    best_median = math.inf
    for i, j in itertools.combinations(range(n), 2):
        candidate = fit_similarity(src[[i, j]], dst[[i, j]])
        if candidate is None:
            continue
        median = float(np.sort(_residuals(candidate, src, dst))[n // 2])
        if median < best_median:
            best, best_median = candidate, median
    if best is None:
        return None
    sigma = 2.5 * 1.4826 * (1 + 5.0 / (n - 2)) * math.sqrt(best_median)
    sigma = max(sigma, MIN_INLIER_PX)
    inliers = _residuals(best, src, dst) <= sigma**2
    if inliers.sum() < 2:
        return best
    return fit_similarity(src[inliers], dst[inliers]) or best


# ---------------------------------------------------------------- warping and pasting


def warp_affine(image: np.ndarray, transform: Similarity, size: tuple[int, int]) -> np.ndarray:
    """Warp ``image`` into a ``size`` = (height, width) canvas: ``out(p) = image(T⁻¹·p)``.

    Pixel centres sit at integer coordinates (OpenCV's ``warpAffine`` convention); samples are
    bilinear, and whatever falls outside the source counts as 0 (OpenCV's constant border 0).

    Args:
        image: ``[h, w, C]`` or ``[h, w]``, any real dtype, h and w >= 2.
        transform: maps source pixel coordinates to output pixel coordinates.
        size: (height, width) of the output.

    Returns:
        float32 ``[height, width, C]`` (or ``[height, width]``), not rounded.
    """
    arr = np.asarray(image)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[..., None]
    if arr.ndim != 3 or min(arr.shape[:2]) < 2:
        raise InvalidRequestError(f"image must be [h, w] or [h, w, C] with sides >= 2, got {list(arr.shape)}")
    height, width = size
    lin = transform.matrix[:, :2]
    if abs(np.linalg.det(lin)) < 1e-12:
        raise InvalidRequestError("the transform is degenerate (zero scale)")
    inv_lin = np.linalg.inv(lin)
    inv_shift = -inv_lin @ transform.matrix[:, 2]
    out = np.zeros((height, width, arr.shape[2]), np.float32)
    # Only output pixels whose source position lies in (−1, w) × (−1, h) can have a neighbour
    # inside the source: sample the bounding box of that rectangle's image, the rest is 0.
    src_h, src_w = arr.shape[:2]
    corners = transform.apply(np.array([[-1, -1], [src_w, -1], [-1, src_h], [src_w, src_h]], np.float64))
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, [width, height])
    if x1 <= x0 or y1 <= y0:
        return out[..., 0] if squeeze else out
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    sx = inv_lin[0, 0] * xs + inv_lin[0, 1] * ys + inv_shift[0]
    sy = inv_lin[1, 0] * xs + inv_lin[1, 1] * ys + inv_shift[1]
    out[y0:y1, x0:x1] = _bilinear(arr, sx, sy)
    return out[..., 0] if squeeze else out


def _bilinear(src: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample ``src`` ``[h, w, C]`` at float coordinates ``sx``, ``sy`` ``[H, W]`` (pixel centres at
    integers); neighbours outside the source count as 0. float32 ``[H, W, C]``."""
    src_h, src_w = src.shape[:2]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    # One zero row/column on every side stands for "outside": indices are clipped into it.
    padded = np.pad(src.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((*sx.shape, src.shape[2]), dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        rows = np.clip(y0 + dy + 1, 0, src_h + 1)
        for dx, wx in ((0, 1 - fx), (1, fx)):
            cols = np.clip(x0 + dx + 1, 0, src_w + 1)
            out += padded[rows, cols] * (wx * wy)
    return out.astype(np.float32)


def paste(frame: np.ndarray, face: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``(1 − a)·frame + a·face``, rounded to uint8.

    Args:
        frame: uint8 ``[H, W, 3]``.
        face: ``[H, W, 3]`` values in 0..255 (uint8 or float).
        alpha: ``[H, W]`` in 0..255 (uint8 or float).

    Returns:
        uint8 ``[H, W, 3]``.
    """
    a = np.clip(np.asarray(alpha, dtype=np.float32), 0, 255)[..., None] / 255.0
    out = (1.0 - a) * frame.astype(np.float32) + a * np.asarray(face, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- masks without a parser


def _ellipse_alpha(
    height: int, width: int, centre: np.ndarray, axis_u: np.ndarray, semi_u: float, semi_v: float
) -> np.ndarray:
    """uint8 ``[height, width]``: 255 inside (1 − feather) of the ellipse radius, smoothly 0 at 1."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    along = dx * axis_u[0] + dy * axis_u[1]
    across = -dx * axis_u[1] + dy * axis_u[0]
    radius = np.sqrt((along / semi_u) ** 2 + (across / semi_v) ** 2)
    t = np.clip((1.0 - radius) / MASK_FEATHER, 0.0, 1.0)
    smooth = t * t * (3 - 2 * t)
    return np.rint(255 * smooth).astype(np.uint8)


def landmark_soft_mask(height: int, width: int, points: np.ndarray) -> np.ndarray:
    """The documented face mask used when no face parser is supplied.

    An ellipse aligned with the face: its axis runs from the eyes' midpoint ``e`` to the mouth
    corners' midpoint ``m``; centre ``(e + m) / 2``; semi-axes ``1.5·|m − e|`` along and
    ``1.15·|right eye − left eye|`` across; 255 inside 80% of its radius, falling to 0 at the
    edge (smoothstep).

    Args:
        points: ``[5, 2]`` landmarks (left eye, right eye, nose, left and right mouth corner).

    Returns:
        uint8 ``[height, width]``; all zero for degenerate landmarks.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise InvalidRequestError(f"landmarks must be a finite [5, 2] array, got {list(pts.shape)}")
    eyes, mouth = (pts[0] + pts[1]) / 2, (pts[3] + pts[4]) / 2
    down = mouth - eyes
    eye_to_mouth, eye_distance = float(np.hypot(*down)), float(np.hypot(*(pts[1] - pts[0])))
    if eye_to_mouth < 1e-6 or eye_distance < 1e-6:
        log.warning("degenerate face landmarks: empty mask")
        return np.zeros((height, width), np.uint8)
    return _ellipse_alpha(
        height,
        width,
        (eyes + mouth) / 2,
        down / eye_to_mouth,
        MASK_ALONG * eye_to_mouth,
        MASK_ACROSS * eye_distance,
    )


def box_soft_mask(height: int, width: int, box: FaceBox) -> np.ndarray:
    """uint8 ``[height, width]``: the ellipse inscribed in a face box, with the soft edge of
    :func:`landmark_soft_mask` (the box path's mask without a parser)."""
    centre = np.array([(box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2])
    semi_y, semi_x = max((box.y2 - box.y1) / 2, 1e-6), max((box.x2 - box.x1) / 2, 1e-6)
    return _ellipse_alpha(height, width, centre, np.array([0.0, 1.0]), semi_y, semi_x)


# ---------------------------------------------------------------- masks with a parser


def _ellipse_kernel(size: int) -> np.ndarray:
    """A ``size``×``size`` elliptic structuring element, rows spanning ``round(c·√(1 − dy²/r²))``
    either side of the centre column (the shape OpenCV's MORPH_ELLIPSE produces)."""
    r = c = size // 2
    kernel = np.zeros((size, size), np.float32)
    for i in range(size):
        dy = i - r
        if abs(dy) <= r:
            dx = round(c * math.sqrt(max(r * r - dy * dy, 0) / (r * r)))
            kernel[i, max(c - dx, 0) : min(c + dx + 1, size)] = 1
    return kernel


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation of a 0/255 uint8 ``[H, W]`` mask by :func:`_ellipse_kernel` (anchor at its
    centre ``size // 2``)."""
    kernel = torch.from_numpy(_ellipse_kernel(size))[None, None]
    anchor = size // 2
    x = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    x = F.pad(x, (anchor, size - 1 - anchor, anchor, size - 1 - anchor))
    hit = F.conv2d(x, kernel)[0, 0] > 0
    return np.where(hit.numpy(), 255, 0).astype(np.uint8)


def _gaussian_blur(mask: np.ndarray, size: int) -> np.ndarray:
    """Separable Gaussian blur of uint8 ``[H, W]`` with OpenCV's default σ for ``size``
    (``0.3·((size − 1)/2 − 1) + 0.8``) and mirrored borders; rounded to uint8."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(torch.float32)
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    half = size // 2
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), taps.view(1, 1, -1, 1))
    return np.clip(np.rint(x[0, 0].numpy()), 0, 255).astype(np.uint8)


@torch.no_grad()
def parser_face_mask(parser: torch.nn.Module, crop: np.ndarray) -> np.ndarray:
    """The box path's mask of a frame crop with a face parser, as the official.

    The crop is resized to 512² (area), normalised with ImageNet statistics, parsed; classes
    1–13 are kept, dilated (ellipse 10×10), blurred (Gaussian 21×21), and resized back to the
    crop (bilinear).

    Args:
        parser: a BiSeNet-like module, ``[1, 3, 512, 512]`` → logits ``[1, classes, 512, 512]``.
        crop: uint8 ``[h, w, 3]``.

    Returns:
        uint8 ``[h, w]``.
    """
    h, w = crop.shape[:2]
    resized = np.asarray(resize_area(Image.fromarray(crop), (PARSER_SIZE, PARSER_SIZE)))
    param = next(parser.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    logits = parser(x.to(device))
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    labels = logits.argmax(dim=1)[0].cpu().numpy()
    mask = np.where(np.isin(labels, FACE_CLASSES), 255, 0).astype(np.uint8)
    mask = _gaussian_blur(_dilate(mask, DILATION_SIZE), BLUR_SIZE)
    back = F.interpolate(
        torch.from_numpy(mask.astype(np.float32))[None, None],
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )
    return np.clip(np.rint(back[0, 0].numpy()), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the box path


# ---------------------------------------------------------------- reference and video


@dataclass(frozen=True)
class SwapReference:
    """The face to paste.

    Attributes:
        rgb: uint8 ``[h, w, 3]``, the 512×512 reference crop (before whitening, see
            :func:`swap_reference`).
        alpha: uint8 ``[h, w]``: 255 = face (parser classes, or the landmark soft mask).
        landmarks: float64 ``[5, 2]``, or None when no face was found in the reference (then
            every frame takes the box path).
    """

    rgb: np.ndarray
    alpha: np.ndarray
    landmarks: np.ndarray | None


def swap_reference(
    rgb: np.ndarray, detector: LandmarkDetector, background: np.ndarray | None = None
) -> SwapReference:
    """Landmarks and alpha of a preprocessed reference.

    Args:
        rgb: uint8 ``[h, w, 3]``, the reference crop before whitening, as the official pastes
            it: ``pad_resize_square(image, 512, ref.crop)`` for a ``ReferenceImage`` ``ref``
            (without a parser, ``ref.to_array()`` is the same image). The whitened image works
            too, with a trace of white where the warped alpha is fractional.
        detector: finds its landmarks (the best-scoring face is used, as the official).
        background: bool ``[h, w]``, the parser's background (``ReferenceImage.background``);
            None without a parser: the alpha is then :func:`landmark_soft_mask`.

    Returns:
        A :class:`SwapReference`.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 2:
        raise InvalidRequestError(f"the reference must be uint8 [h, w, 3], got {arr.dtype} {list(arr.shape)}")
    h, w = arr.shape[:2]
    faces = detector.detect_landmarks(arr)
    landmarks = faces[0].points if faces else None
    if landmarks is None:
        log.warning("no face found in the reference: every frame takes the box path")
    if background is not None:
        if background.shape != (h, w):
            raise InvalidRequestError(f"background mask {list(background.shape)} != reference {[h, w]}")
        alpha = np.where(background, 0, 255).astype(np.uint8)
    elif landmarks is not None:
        alpha = landmark_soft_mask(h, w, landmarks)
    else:
        alpha = np.full((h, w), 255, np.uint8)
    return SwapReference(np.ascontiguousarray(arr), alpha, landmarks)


@dataclass(frozen=True)
class SwappedVideo:
    """The pasted video and its face mask.

    Attributes:
        frames: uint8 ``[N, H, W, 3]``.
        masks: uint8 ``[N, H, W]`` (255 = face); all zero where no face was found.
        paths: per frame, ``"landmarks"``, ``"box"`` or ``"none"``.
    """

    frames: np.ndarray
    masks: np.ndarray
    paths: tuple[PastePath, ...]


class FacePaster:
    """Pastes a reference face into video frames. Holds the loaded models only.

    Args:
        detector: faces with landmarks in frames (e.g. :class:`RetinaFaceLandmarkDetector`).
        parser: a loaded BiSeNet (``standin.bisenet.load_bisenet``), or None for the
            landmark-based soft masks.
        min_score: faces at or below this score are ignored (the official 0.5).
    """

    def __init__(
        self, detector: LandmarkDetector, parser: torch.nn.Module | None = None, min_score: float = 0.5
    ) -> None:
        self.detector = detector
        self.parser = parser
        self.min_score = min_score

    def paste_frame(
        self, frame: np.ndarray, reference: SwapReference
    ) -> tuple[np.ndarray, np.ndarray, PastePath]:
        """One frame uint8 ``[H, W, 3]`` → (pasted uint8 ``[H, W, 3]``, mask uint8 ``[H, W]``, path)."""
        height, width = frame.shape[:2]
        face = largest_face_landmarks(self.detector.detect_landmarks(frame))
        if face is None or face.box.score <= self.min_score:
            return frame.copy(), np.zeros((height, width), np.uint8), "none"
        if reference.landmarks is not None:
            transform = fit_similarity_lmeds(reference.landmarks, face.points)
            if transform is not None:
                rgba = np.concatenate([reference.rgb, reference.alpha[..., None]], axis=-1)
                warped_rgba = warp_affine(rgba, transform, (height, width))
                warped, alpha = warped_rgba[..., :3], warped_rgba[..., 3]
                mask = np.clip(np.rint(alpha), 0, 255).astype(np.uint8)
                return paste(frame, warped, alpha), mask, "landmarks"
            log.info("no similarity fits the landmarks: box path")
        return self._paste_box(frame, reference, face)

    def _paste_box(
        self, frame: np.ndarray, reference: SwapReference, face: FaceLandmarks
    ) -> tuple[np.ndarray, np.ndarray, PastePath]:
        height, width = frame.shape[:2]
        mask = np.zeros((height, width), np.uint8)
        box = face_square(face.box, width, height)  # the official fallback box
        if box is None:
            return frame.copy(), mask, "none"
        left, top, right, bottom = box
        box_w, box_h = right - left, bottom - top
        resized = np.asarray(
            Image.fromarray(reference.rgb).resize((box_w, box_h), Image.Resampling.LANCZOS), dtype=np.uint8
        )
        crop = frame[top:bottom, left:right]
        if self.parser is not None:
            crop_mask = parser_face_mask(self.parser, crop)
        else:
            shifted = FaceBox(
                face.box.x1 - left, face.box.y1 - top, face.box.x2 - left, face.box.y2 - top, face.box.score
            )
            crop_mask = box_soft_mask(box_h, box_w, shifted)
        out = frame.copy()
        out[top:bottom, left:right] = paste(crop, resized, crop_mask)
        mask[top:bottom, left:right] = crop_mask
        return out, mask, "box"

    def paste_video(self, frames: np.ndarray, reference: SwapReference) -> SwappedVideo:
        """Every frame of uint8 ``[N, H, W, 3]`` (already shaped for Wan) → :class:`SwappedVideo`."""
        arr = np.asarray(frames)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
            raise InvalidRequestError(f"frames must be uint8 [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
        out, masks, paths = [], [], []
        for frame in arr:
            pasted, mask, path = self.paste_frame(frame, reference)
            out.append(pasted)
            masks.append(mask)
            paths.append(path)
        counts = {p: paths.count(p) for p in ("landmarks", "box", "none")}
        log.info("face swap paste: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
        return SwappedVideo(np.stack(out), np.stack(masks), tuple(paths))
