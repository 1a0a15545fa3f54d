"""Face detectors and cropping for the visual stage.

A detector is any object with a ``name`` and ``__call__(rgb [H, W, 3] uint8) -> (x, y, w, h) |
None`` giving the main face's box; ``--detector module:Class`` loads one (built with no
arguments). The default is OpenCV's frontal-face Haar cascade: it ships inside
``opencv-python-headless`` (no download, no GPU, a few ms per frame in a DataLoader worker), which
is enough for the frontal webcam faces of EMI clips; a stronger detector plugs in the same way.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import cv2
import numpy as np

from emimimic.errors import UserError

Box = tuple[int, int, int, int]


class FaceDetector(Protocol):
    """Finds the main face of an RGB frame."""

    name: str

    def __call__(self, rgb: np.ndarray) -> Box | None:
        """Returns the face's (x, y, width, height) in pixels, or None when there is none."""


class HaarFaceDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml``; the largest detection is the face.

    Frames are searched at most ``max_side`` pixels wide (faster; boxes are mapped back), for
    faces at least ``min_fraction`` of the frame's shorter side (talking-head clips).
    The cascade is built on first use in each process (OpenCV objects do not pickle).
    """

    name = "opencv-haar-frontalface-default"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_fraction: float = 0.15, max_side: int = 360) -> None:
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_fraction = min_fraction
        self.max_side = max_side
        self._cascade: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cascade": None}

    def __call__(self, rgb: np.ndarray) -> Box | None:
        """Returns the largest frontal face's box, or None."""
        if self._cascade is None:
            self._cascade = cv2.CascadeClassifier(
                cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)),
                              interpolation=cv2.INTER_AREA)
        side = max(16, round(self.min_fraction * min(gray.shape)))
        found = self._cascade.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                               minNeighbors=self.min_neighbors,
                                               minSize=(side, side))
        if len(found) == 0:
            return None
        x, y, bw, bh = max((tuple(int(v) for v in box) for box in found),
                           key=lambda b: b[2] * b[3])
        return (round(x / scale), round(y / scale), round(bw / scale), round(bh / scale))


class WholeFrame:
    """No detection: the whole frame is the crop (for clips already cropped to the face)."""

    name = "whole-frame"

    def __call__(self, rgb: np.ndarray) -> Box | None:
        """Returns the box of the whole frame."""
        return (0, 0, rgb.shape[1], rgb.shape[0])


def load_detector(spec: str) -> FaceDetector:
    """Returns the detector named by ``spec``: ``haar``, ``none`` or ``package.module:Class``.

    Raises:
        UserError: the module or class cannot be found.
    """
    if spec == "haar":
        return HaarFaceDetector()
    if spec == "none":
        return WholeFrame()
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UserError(f"--detector {spec!r}: expected 'haar', 'none' or 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--detector {spec!r}: cannot load it ({err})") from None
    detector = cls()
    if not callable(detector):
        raise UserError(f"--detector {spec!r}: {class_name}() is not callable on a frame")
    return detector


def crop_face(rgb: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """Returns a square crop around ``box``, ``margin`` times its size larger, inside the frame."""
    h, w = rgb.shape[:2]
    x, y, bw, bh = box
    side = min(max(1, round(max(bw, bh) * (1.0 + margin))), h, w)
    cx, cy = x + bw / 2.0, y + bh / 2.0
    left = int(min(max(0, round(cx - side / 2.0)), w - side))
    top = int(min(max(0, round(cy - side / 2.0)), h - side))
    return np.ascontiguousarray(rgb[top:top + side, left:left + side])


def detector_name(detector: FaceDetector) -> str:
    """Returns the name recorded in the provenance (``name`` or the class's import path)."""
    name = getattr(detector, "name", None)
    return str(name) if name else f"{type(detector).__module__}:{type(detector).__qualname__}"
