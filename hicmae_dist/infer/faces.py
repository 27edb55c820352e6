"""--faces detect: the largest face in each frame the model sees, tracked and smoothed over time,
cropped as `prepare` crops a VoxCeleb2 face track (docs/inference.md, 'Faces').

Detector: OpenCV's frontal-face Haar cascade, the model file shipped inside the
opencv-python-headless wheel (cv2.data.haarcascades): offline, CPU-only, no torch dependency.
The crop: a square face track of TRACK_SCALE x the face's side with the face centre at
(1/2, TRACK_FACE_Y) of it, standing in for VoxCeleb2's 224 px track; then the spec's face crop
of that track (rows 0:160, centred columns for a 160 px model; video.face_box), resized to the
model's image size.
"""

from __future__ import annotations

import logging

import numpy as np

from hicmae_dist.config import ConfigError
from hicmae_dist.data import video
from hicmae_dist.infer.sources import Clip

log = logging.getLogger(__name__)

CASCADE = "haarcascade_frontalface_alt2.xml"  # fewer false positives than _default on the tests
TRACK_SCALE = 2.0  # face track side / detected face side
TRACK_FACE_Y = 0.4  # the face centre's height in the track (faces sit above the centre in VoxCeleb2's)
DETECT_SIDE = 640  # frames are searched at most this long side (speed); boxes are scaled back
MIN_FACE_FRACTION = 12  # faces smaller than 1/12 of the short side are not searched (speed)
SMOOTH_RADIUS = 2  # centred moving average over 2r+1 seen frames (0.8 s at HiCMAE's stride)
Track = list[tuple[float, float, float] | None]  # per frame: face centre x, y and side, or None


def _cascade():
    try:
        import cv2
    except ImportError as exn:
        raise ConfigError(
            "--faces detect needs the `opencv-python-headless` package (pip install "
            "'hicmae-dist[faces]', or `make setup`)"
        ) from exn
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise ConfigError(
            f"--faces detect needs opencv-python-headless 4.x (its Haar cascades); OpenCV "
            f"{cv2.__version__} has none: pip install 'hicmae-dist[faces]'"
        )
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load {cv2.data.haarcascades + CASCADE}")
    return cv2, cascade


class FaceDetector:
    """The largest face of a (H, W, 3) uint8 RGB frame, as (centre x, centre y, side) in pixels."""

    def __init__(self):
        self.cv2, self.cascade = _cascade()
        log.info("face detector: OpenCV %s Haar cascade %s", self.cv2.__version__, CASCADE)

    def __call__(self, frame: np.ndarray) -> tuple[float, float, float] | None:
        cv2 = self.cv2
        scale = min(1.0, DETECT_SIDE / max(frame.shape[:2]))
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        smallest = max(24, min(gray.shape) // MIN_FACE_FRACTION)
        found = self.cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest)
        )
        if len(found) == 0:
            return None
        x, y, w, h = max(found, key=lambda b: b[2] * b[3])
        return (x + w / 2) / scale, (y + h / 2) / scale, max(w, h) / scale


def smooth(track: Track, radius: int = SMOOTH_RADIUS) -> Track:
    """Gaps filled by linear interpolation between detections (held at the ends), then a centred
    moving average whose radius shrinks at the ends (so steady motion is followed exactly).
    All None when nothing was found."""
    seen = [i for i, t in enumerate(track) if t is not None]
    if not seen:
        return list(track)
    values = np.array([track[i] for i in seen], dtype=np.float64)  # (K, 3)
    filled = np.stack([np.interp(np.arange(len(track)), seen, values[:, c]) for c in range(3)], axis=1)
    out = np.empty_like(filled)
    for i in range(len(track)):
        r = min(radius, i, len(track) - 1 - i)
        out[i] = filled[i - r : i + r + 1].mean(axis=0)
    return [tuple(map(float, row)) for row in out]


def crop_corners(
    face: tuple[float, float, float], width: int, height: int, size: int
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the face crop (module docstring), moved inside the frame
    (and shrunk to it when larger)."""
    cx, cy, side = face
    track = TRACK_SCALE * side
    scale = track / video.SOURCE_SIZE  # source pixels per pixel of a 224 track
    top_in, left_in, h_in, w_in = video.face_box(video.SOURCE_SIZE, min(size, video.SOURCE_SIZE))
    crop = min(h_in * scale, width, height)
    left = cx - track / 2 + left_in * scale
    top = cy - TRACK_FACE_Y * track + top_in * scale
    left, top = min(max(left, 0.0), width - crop), min(max(top, 0.0), height - crop)
    return left, top, left + crop, top + crop


def track_faces(
    clip: Clip, frames: list[int], size: int, detector: FaceDetector
) -> tuple[dict[int, tuple[float, float, float, float]], set[int]]:
    """({frame: crop corners}, frames with a face of their own) over `frames` (sorted). Without
    any face in the clip, the centre crop of the short side."""
    track: Track = []
    for start in range(0, len(frames), 32):  # decoded in chunks: a long video never sits in memory
        chunk = frames[start : start + 32]
        track += [detector(f) for f in clip.frames(chunk)]
    found = {i for i, t in zip(frames, track) if t is not None}
    if not found:
        side = min(clip.width, clip.height)
        left, top = (clip.width - side) / 2, (clip.height - side) / 2
        return dict.fromkeys(frames, (left, top, left + side, top + side)), found
    return {i: crop_corners(face, clip.width, clip.height, size) for i, face in zip(frames, smooth(track))}, found
