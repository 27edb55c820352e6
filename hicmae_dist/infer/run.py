"""Many videos through one model: decoded and cut into windows on worker threads, the windows of
several videos batched together, the outputs put back per video. A video that cannot be used
is a problem line and a status, never the end of the run."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from hicmae_dist.config import ConfigError
from hicmae_dist.data import video as V
from hicmae_dist.infer import faces as F
from hicmae_dist.infer.model import hop_frames
from hicmae_dist.infer.sources import SkipVideo, VideoFileClip, VideoInput
from hicmae_dist.infer.windows import plan_windows, window_inputs

log = logging.getLogger(__name__)
WHAT = ("embed", "predict")
FACES = ("none", "detect")
SHORT = ("pad", "skip")


@dataclass
class Problem:
    video_id: str
    path: str
    kind: str  # sources.SKIP_KINDS, "failed" (anything else), "padded", "no_face" or "audio_cut"
    message: str


@dataclass
class ClipResult:
    """One video: per window (start_s, end_s, status, outputs[name] rows) and pooled over them."""

    id: str
    path: str
    status: str  # "ok", the window statuses met ("padded", "no_face"), or why it was skipped
    start_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    end_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    window_status: list[str] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (W, D) per name
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # (D,): mean over windows
    problems: list[Problem] = field(default_factory=list)
    names: tuple[str, ...] = ()  # predict: class or dimension names of the output columns


@dataclass
class _Prepared:
    result: ClipResult
    video: torch.Tensor | None = None  # (W, V, ...), dropped once every window ran
    audio: torch.Tensor | None = None
    done: int = 0


def run_inputs(
    model,
    items: list[VideoInput],
    what: str,
    *,
    feature: str = "fusion",
    faces: str = "none",
    hop_s: float | None = None,
    segments: int | None = None,
    crops: int = 1,
    short: str = "pad",
    workers: int = 2,
    progress: bool = True,
) -> list[ClipResult]:
    """embed (features) or predict (outputs) every video of `items` with `model`
    (an InferenceModel); results in input order."""
    for name, value, allowed in (("what", what, WHAT), ("faces", faces, FACES), ("short", short, SHORT)):
        if value not in allowed:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    detector = F.FaceDetector() if faces == "detect" else None
    options = dict(hop=hop_frames(hop_s), segments=segments, crops=crops)

    def prepare(item: VideoInput) -> _Prepared:
        return prepare_clip(item, model.recipe, options, detector, short)

    results, pending = [], []  # pending: (prepared, window index) not yet run
    bar = tqdm(total=len(items), desc=what, unit="video", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for prepared in _bounded_map(pool, prepare, items, 2 * max(1, workers)):
            results.append(prepared)
            pending += [(prepared, w) for w in range(len(prepared.result.start_s))]
            while len(pending) >= model.batch_size:
                _run_batch(model, pending[: model.batch_size], what, feature)
                pending = pending[model.batch_size :]
            bar.update(1)
        if pending:
            _run_batch(model, pending, what, feature)
    bar.close()
    return [_finish(p, model, what) for p in results]


def _bounded_map(pool: ThreadPoolExecutor, fn, items, ahead: int):
    """pool.map in order with at most `ahead` items in flight (a prepared video holds its windows)."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) > ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def prepare_clip(item: VideoInput, recipe, options: dict, detector, short: str) -> _Prepared:
    """Decode one video and cut its windows; a SkipVideo becomes its status and problem line."""
    result = ClipResult(item.id, str(item.path), "ok")
    try:
        clip = VideoFileClip(item.path)
        windows = plan_windows(recipe, clip.num_frames, **options)
        padded = windows[0].padded
        if padded and short == "skip":
            raise SkipVideo(
                "too_short",
                f"{clip.num_frames / V.FPS:.2f} s, shorter than one "
                f"{recipe.span_frames / V.FPS:.2f} s window (--short skip)",
            )
        boxes, found = (
            F.track_faces(clip, sorted({i for w in windows for i in w.frames()}), recipe.image_size, detector)
            if detector
            else (None, None)
        )
        pairs = [window_inputs(clip, w, recipe, boxes) for w in windows]
    except Exception as exn:  # noqa: BLE001  one video's failure is its row, not the run's end
        kind = exn.kind if isinstance(exn, SkipVideo) else "failed"
        if kind == "failed":
            log.debug("%s failed", item.path, exc_info=True)  # -v shows the traceback
        result.status = kind
        result.problems.append(
            Problem(item.id, str(item.path), kind, str(exn) if kind != "failed" else f"{type(exn).__name__}: {exn}")
        )
        return _Prepared(result)
    result.start_s = np.array([w.start / V.FPS for w in windows])
    result.end_s = np.minimum(result.start_s + recipe.span_frames / V.FPS, clip.num_frames / V.FPS)
    result.window_status = [_window_status(w, found) for w in windows]
    _window_problems(result, clip.num_frames, recipe, found)
    if clip.audio_cut:
        result.problems.append(Problem(item.id, str(item.path), "audio_cut", clip.audio_cut))
        result.status = "audio_cut" if result.status == "ok" else f"{result.status},audio_cut"
    return _Prepared(result, torch.stack([v for v, _ in pairs]), torch.stack([a for _, a in pairs]))


def _window_status(window, found: set[int] | None) -> str:
    flags = (["padded"] if window.padded else []) + (
        ["no_face"] if found is not None and not found.intersection(window.frames()) else []
    )
    return ",".join(flags) or "ok"


def _window_problems(result: ClipResult, num_frames: int, recipe, found: set[int] | None) -> None:
    """One problem line per kind met in the windows, and the video's status."""
    kinds = [k for k in ("padded", "no_face") if any(k in s.split(",") for s in result.window_status)]
    for kind in kinds:
        if kind == "padded":
            message = (
                f"{num_frames / V.FPS:.2f} s, shorter than one {recipe.span_frames / V.FPS:.2f} s window: "
                f"last frame repeated, audio zero-padded"
            )
        else:
            hit = [
                f"{s:.2f}-{e:.2f} s"
                for s, e, st in zip(result.start_s, result.end_s, result.window_status)
                if "no_face" in st
            ]
            used = "the track's nearest boxes used" if found else "no face in the video: centre crop used"
            message = f"no face found in {len(hit)} window(s) ({', '.join(hit[:5])}): {used}"
        result.problems.append(Problem(result.id, result.path, kind, message))
    result.status = ",".join(kinds) or "ok"


def _run_batch(model, batch: list[tuple[_Prepared, int]], what: str, feature: str) -> None:
    video = torch.stack([p.video[w] for p, w in batch])
    audio = torch.stack([p.audio[w] for p, w in batch])
    out = model.features(video, audio, feature) if what == "embed" else {"output": model.outputs(video, audio)}
    for row, (prepared, w) in enumerate(batch):
        outputs = prepared.result.outputs
        for name, tensor in out.items():
            if name not in outputs:
                outputs[name] = torch.empty(len(prepared.result.start_s), tensor.shape[1])
            outputs[name][w] = tensor[row]
        prepared.done += 1
        if prepared.done == len(prepared.result.start_s):
            prepared.video = prepared.audio = None


def _finish(prepared: _Prepared, model, what: str) -> ClipResult:
    result = prepared.result
    result.pooled = {name: t.mean(dim=0) for name, t in result.outputs.items()}
    result.names = model.names if what == "predict" else ()
    for problem in result.problems:
        log.warning("%s (%s): %s: %s", problem.video_id, problem.path, problem.kind, problem.message)
    return result
