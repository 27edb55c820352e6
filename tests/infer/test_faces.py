"""--faces detect: a real face (scikit-image's astronaut photo) moving through a synthetic video is
found, tracked and cropped where it is."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hicmae_dist.infer import faces as F
from hicmae_dist.infer.sources import TensorClip
from tests.support import require

SIZE = 260  # the photo's side once pasted (its face: ~50 px)
STEP = (3, 1.5)  # its motion per frame (x, y), pixels


@pytest.fixture(scope="module")
def detector():
    require("opencv-python-headless", importlib.util.find_spec("cv2") is not None, "pip install 'hicmae-dist[faces]'")
    return F.FaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    require("scikit-image", importlib.util.find_spec("skimage") is not None, "pip install scikit-image")
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BILINEAR))


def _moving_face_video(photo: np.ndarray, frames: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(T, 480, 640, 3): the photo pasted at a corner moving STEP per frame on a noisy grey
    background; and its corner in each frame."""
    rng = np.random.default_rng(0)
    out = np.clip(rng.normal(110, 12, (frames, 480, 640, 3)), 0, 255).astype(np.uint8)
    corners = [(int(20 + STEP[0] * t), int(30 + STEP[1] * t)) for t in range(frames)]
    for t, (x, y) in enumerate(corners):
        out[t, y : y + SIZE, x : x + SIZE] = photo
    return out, corners


def test_the_crop_follows_a_moving_face(detector, astronaut):
    still, (x, y) = (a[0] for a in _moving_face_video(astronaut, 1))
    face = detector(still)
    assert face is not None, "the astronaut's face is not found in the still photo"
    offset = (face[0] - x, face[1] - y)  # the face centre in the pasted photo
    frames, corners = _moving_face_video(astronaut, 64)
    clip = TensorClip(frames, np.zeros(64 * 640, np.float32))
    seen = list(range(0, 64, 4))  # the frames HiCMAE sees
    boxes, found = F.track_faces(clip, seen, 160, detector)
    assert len(found) >= 12  # Haar misses a frame now and then: the track bridges it
    for i in seen:
        left, top, right, bottom = boxes[i]
        track = (right - left) * 224 / 160  # the face track the 160 crop was cut from
        centre = ((left + right) / 2, top + F.TRACK_FACE_Y * track)
        truth = (corners[i][0] + offset[0], corners[i][1] + offset[1])
        assert abs(centre[0] - truth[0]) <= 3 and abs(centre[1] - truth[1]) <= 3, (i, centre, truth)
        assert right - left == pytest.approx(F.TRACK_SCALE * face[2] * 160 / 224, rel=0.1)  # steady size


def test_no_face_falls_back_to_the_centre_and_says_so(detector):
    clip = TensorClip(np.full((8, 240, 320, 3), 90, np.uint8), np.zeros(8 * 640, np.float32))
    boxes, found = F.track_faces(clip, [0, 4], 160, detector)
    assert found == set() and boxes[0] == (40.0, 0.0, 280.0, 240.0)


def test_smoothing_follows_steady_motion_and_fills_gaps():
    track = [(10.0 + 2 * i, 5.0, 50.0) if i != 3 else None for i in range(8)]
    smoothed = F.smooth(track)
    np.testing.assert_allclose([s[0] for s in smoothed], [10.0 + 2 * i for i in range(8)])
    assert F.smooth([None, None]) == [None, None]


def test_a_video_without_a_face_is_flagged_per_window(detector, tmp_path):
    """A whole video through prepare_clip with --faces detect: status and problem line 'no_face'."""
    from hicmae_dist.config import load_config
    from hicmae_dist.infer.run import prepare_clip
    from hicmae_dist.infer.sources import VideoInput
    from hicmae_dist.infer.windows import Recipe
    from tests.infer.conftest import ffmpeg

    path = tmp_path / "pattern.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=sample_rate=16000",
        "-t",
        "3",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
        str(path),
    )
    recipe = Recipe.of(load_config("finetune-tiny-cpu").model)
    prepared = prepare_clip(
        VideoInput("pattern", path), recipe, {"hop": None, "segments": None, "crops": 1}, detector, "pad"
    )
    assert prepared.result.status == "no_face" and prepared.result.window_status == ["no_face"]
    (problem,) = prepared.result.problems
    assert problem.kind == "no_face" and "0.00-2.56 s" in problem.message
    assert prepared.video.shape == (1, 1, 3, 16, 160, 160)
