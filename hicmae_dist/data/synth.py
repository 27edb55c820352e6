"""A synthetic VoxCeleb2-like corpus written as real media files.

Layout (VoxCeleb2's official one):

    out/dev/mp4/idNNNNN/VIDEO/NNNNN.mp4   H.264 224x224 at 25 fps with a 16 kHz mono AAC track
    out/dev/aac/idNNNNN/VIDEO/NNNNN.m4a   the same AAC audio on its own
    out/labels.csv                         key,speaker,video,clip,label (label = hidden class)

Each clip has a hidden class that sets both what is seen (shape, colour, motion) and what is
heard (pitch, beat rate); the shape also pulses with the audio beat, so the two streams agree in
time as well as in kind. Per-clip jitter (position, phase, amplitude, detune, noise) makes every
clip different, so audio-visual contrastive learning has something real to find and retrieval
by hidden class rises above chance. Speakers set the background colour and the voice timbre.
Everything is drawn from `seed`: the same seed gives the same classes, metadata and pixels.

write_downstream renders the same kind of clips as a fine-tuning set: face-frame folders, 16 kHz
wavs and the authors' annotation files in subject-independent k folds (see its docstring);
write_multilabel a multi-label set (1-3 classes a clip) in the CAV-MAE release's JSON layout.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import json
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hicmae_dist.data.audio import SAMPLE_RATE
from hicmae_dist.data.video import FPS, FRAME_STRIDE, MIN_SOURCE_FRAMES, SOURCE_SIZE, face_crop

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


@dataclass(frozen=True)
class _ClipPlan:
    index: int
    speaker: str
    video: str
    clip: str
    label: int

    @property
    def key(self) -> str:
        return f"{self.speaker}/{self.video}/{self.clip}"


def write_corpus(
    out_dir: str | Path,
    num_clips: int,
    *,
    num_classes: int = 4,
    num_speakers: int | None = None,
    seed: int = 0,
    duration_s: float = 3.2,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write `num_clips` clips under out_dir (layout in the module docstring).

    Returns a summary: out_dir, clips, speakers, videos, classes, seconds, bytes, labels path.
    Clips are written under a temporary name and renamed when complete, so a reader never sees
    a half-written file; labels.csv is written last.
    """
    if num_clips < 1 or num_classes < 1:
        raise ValueError(f"num_clips and num_classes must be >= 1, got {num_clips}, {num_classes}")
    min_s = (MIN_SOURCE_FRAMES + FRAME_STRIDE) / FPS
    if duration_s < min_s:
        raise ValueError(
            f"duration_s={duration_s}: clips need at least {min_s:.2f} s (the "
            f"{MIN_SOURCE_FRAMES / FPS} s window plus room for a random start)"
        )
    out = Path(out_dir)
    num_speakers = num_speakers or max(2, num_clips // 8)
    plans = _plan(num_clips, min(num_speakers, num_clips), num_classes, seed)

    def write(plan: _ClipPlan) -> int:
        return _write_clip(out, plan, num_classes, seed, duration_s)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # the work is in ffmpeg subprocesses
        sizes = list(
            tqdm(pool.map(write, plans), total=len(plans), desc="synth clips", unit="clip", disable=not progress)
        )

    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "speaker", "video", "clip", "label"])
        writer.writerows([p.key, p.speaker, p.video, p.clip, p.label] for p in plans)
    return {
        "out_dir": str(out),
        "clips": len(plans),
        "speakers": len({p.speaker for p in plans}),
        "videos": len({(p.speaker, p.video) for p in plans}),
        "classes": num_classes,
        "seconds": round(len(plans) * _num_frames(duration_s) / FPS, 2),
        "bytes": sum(sizes),
        "labels": str(labels),
    }


def _num_frames(duration_s: float) -> int:
    return int(round(duration_s * FPS))


def _plan(num_clips: int, num_speakers: int, num_classes: int, seed: int) -> list[_ClipPlan]:
    """Speakers round-robin, two clips per video, classes balanced and shuffled."""
    rng = np.random.default_rng((seed, 0))
    labels = rng.permutation(np.arange(num_clips) % num_classes)
    plans, videos = [], {}
    for i in range(num_clips):
        speaker = f"id{i % num_speakers:05d}"
        j = i // num_speakers  # this clip's index among its speaker's clips
        if j % 2 == 0:
            videos[speaker] = "".join(rng.choice(list(_ID_CHARS), 11))  # a YouTube-like id
        plans.append(_ClipPlan(i, speaker, videos[speaker], f"{j % 2 + 1:05d}", int(labels[i])))
    return plans


@dataclass(frozen=True)
class _ClassStyle:
    shape: str
    colour: np.ndarray  # (3,) float32 RGB in [0, 255]
    motion: int  # 0 horizontal, 1 vertical, 2 circular
    motion_hz: float
    f0: float  # fundamental, Hz
    beat_hz: float  # syllable-like amplitude beat, Hz


def _class_style(label: int, num_classes: int) -> _ClassStyle:
    r, g, b = colorsys.hsv_to_rgb(label / num_classes, 0.85, 0.95)
    return _ClassStyle(
        shape=SHAPES[label % len(SHAPES)],
        colour=np.array([r, g, b], np.float32) * 255,
        motion=label % 3,
        motion_hz=0.4 + 0.3 * (label % 4),
        f0=120.0 * 2 ** (3 * label / num_classes),  # classes spread evenly over 3 octaves
        beat_hz=2.0 + (label % 4),
    )


def _render_clip(plan: _ClipPlan, num_classes: int, seed: int, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(frames (n, 224, 224, 3) uint8 at 25 fps, pcm (S,) int16 at 16 kHz) of one clip."""
    style = _class_style(plan.label, num_classes)
    background, timbre = _speaker_look(plan.speaker, seed)
    rng = np.random.default_rng((seed, 2, plan.index))
    beat = _beat(style, rng.uniform(0, 2 * np.pi))  # phase shared by sound and picture: they are one event
    n_frames = _num_frames(duration_s)
    pcm = _render_audio(style, timbre, beat, n_frames / FPS, rng)
    frames = _render_frames([(style, beat, _placement(rng))], background, n_frames, rng)
    return frames, pcm


def _speaker_look(speaker: str, seed: int) -> tuple[np.ndarray, float]:
    """(background (3,) float32, timbre): harmonic k of the voice has weight 1 / k**timbre."""
    spk = np.random.default_rng((seed, 1, int(speaker[2:])))
    return spk.uniform(30, 200, 3).astype(np.float32), spk.uniform(0.7, 2.0)


def _beat(style: _ClassStyle, phase: float):
    def beat(t: np.ndarray) -> np.ndarray:  # envelope in [0, 1]
        return (0.5 - 0.5 * np.cos(2 * np.pi * style.beat_hz * t + phase)) ** 2

    return beat


def _write_clip(out: Path, plan: _ClipPlan, num_classes: int, seed: int, duration_s: float) -> int:
    """Render and encode one clip; returns the bytes written (mp4 + m4a)."""
    frames, pcm = _render_clip(plan, num_classes, seed, duration_s)

    mp4 = (out / "dev" / "mp4" / plan.key).with_suffix(".mp4")
    m4a = (out / "dev" / "aac" / plan.key).with_suffix(".m4a")
    for path in (mp4, m4a):
        path.parent.mkdir(parents=True, exist_ok=True)
    m4a_part, mp4_part = m4a.with_suffix(".part"), mp4.with_suffix(".part")  # renamed when done
    exact = ["-fflags", "+bitexact", "-map_metadata", "-1"]
    _ffmpeg(
        [
            "-f",
            "s16le",
            "-ar",
            str(SAMPLE_RATE),
            "-ac",
            "1",
            "-i",
            "pipe:0",
            "-c:a",
            "aac",
            "-b:a",
            "48k",
            "-flags:a",
            "+bitexact",
            *exact,
            "-f",
            "mp4",
            str(m4a_part),
        ],
        pcm.tobytes(),
        m4a,
    )
    _ffmpeg(
        [
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{SOURCE_SIZE}x{SOURCE_SIZE}",
            "-r",
            str(FPS),
            "-i",
            "pipe:0",
            "-i",
            str(m4a_part),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "20",
            "-pix_fmt",
            "yuv420p",
            "-g",
            str(2 * FPS),
            "-flags:v",
            "+bitexact",
            "-c:a",
            "copy",
            *exact,
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            str(mp4_part),
        ],
        frames.tobytes(),
        mp4,
    )
    m4a_part.rename(m4a)
    mp4_part.rename(mp4)
    return mp4.stat().st_size + m4a.stat().st_size


def _render_audio(style: _ClassStyle, timbre: float, beat, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """(S,) int16 mono at 16 kHz: harmonics of a detuned f0, gated by the beat, plus noise."""
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    f0 = style.f0 * rng.uniform(0.97, 1.03)
    harmonics = [k for k in range(1, 16) if k * f0 < 0.45 * SAMPLE_RATE]
    voice = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k**timbre for k in harmonics)
    voice = voice / np.abs(voice).max()
    wave = rng.uniform(0.25, 0.5) * beat(t) * voice + rng.uniform(0.005, 0.03) * rng.standard_normal(t.size)
    return (np.clip(wave, -1, 1) * 32767).astype(np.int16)


@dataclass(frozen=True)
class _Placement:
    cx: float  # centre of the motion
    cy: float
    amp: float
    phase: float
    radius: float


def _placement(rng: np.random.Generator, centre=((92, 132), (62, 100)), radius=(18, 26), amp=(10, 20)) -> _Placement:
    cx, cy = rng.uniform(*centre[0]), rng.uniform(*centre[1])
    a, phase = rng.uniform(*amp), rng.uniform(0, 2 * np.pi)
    return _Placement(cx, cy, a, phase, rng.uniform(*radius))


def _render_frames(
    shapes: list[tuple[_ClassStyle, object, _Placement]],
    background: np.ndarray,
    n_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_frames, 224, 224, 3) uint8: each (style, beat, placement) shape moving and pulsing over
    a speaker background, painted in order.

    The shapes stay inside the face crop the data layer keeps (rows 0:160, cols 32:192).
    """
    noise_std = rng.uniform(1, 3)
    boxes = []
    for _style, _beat, at in shapes:
        # A shape (at most 1.2 r across from its centre, times the 1.3 beat pulse) never
        # leaves this box, so only the box is drawn.
        half = int(at.amp + 1.6 * at.radius) + 2
        top, bottom = max(0, int(at.cy) - half), min(SOURCE_SIZE, int(at.cy) + half)
        left, right = max(0, int(at.cx) - half), min(SOURCE_SIZE, int(at.cx) + half)
        yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
        boxes.append((top, bottom, left, right, yy, xx))
    rows = np.arange(SOURCE_SIZE, dtype=np.float32)[:, None, None]
    texture = rng.normal(0, 8, (SOURCE_SIZE, SOURCE_SIZE, 3)).astype(np.float32)  # static per clip
    base = background * (0.75 + 0.25 * rows / SOURCE_SIZE) + texture  # vertical gradient
    frames = np.empty((n_frames, SOURCE_SIZE, SOURCE_SIZE, 3), np.uint8)
    for f in range(n_frames):
        t = f / FPS
        frame = base.copy()
        for (style, beat, at), (top, bottom, left, right, yy, xx) in zip(shapes, boxes):
            angle = 2 * np.pi * style.motion_hz * t + at.phase
            s, c = at.amp * np.sin(angle), at.amp * np.cos(angle)
            dx, dy = ((s, 0.0), (0.0, s), (s, c))[style.motion]
            r = at.radius * (1 + 0.3 * beat(np.array(t)))
            inside = _shape_mask(style.shape, xx - (at.cx + dx), yy - (at.cy + dy), r)[..., None]
            box = frame[top:bottom, left:right]
            box += (style.colour - box) * inside
        luma_noise = rng.standard_normal((SOURCE_SIZE, SOURCE_SIZE, 1), dtype=np.float32)
        frame += noise_std * luma_noise
        frames[f] = np.clip(frame, 0, 255)
    return frames


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """(H, W) float32 coverage in [0, 1] with a one-pixel soft edge."""
    if shape == "circle":
        d = np.hypot(dx, dy) - r
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "triangle":  # apex up: inside when below the apex and within the slanted sides
        d = np.maximum(dy - 0.8 * r, np.abs(dx) * 1.8 - (dy + r))
    elif shape == "diamond":
        d = np.abs(dx) + np.abs(dy) - 1.2 * r
    elif shape == "ring":
        d = np.abs(np.hypot(dx, dy) - 0.8 * r) - 0.3 * r
    else:  # cross
        d = np.minimum(
            np.maximum(np.abs(dx) - 0.3 * r, np.abs(dy) - r), np.maximum(np.abs(dy) - 0.3 * r, np.abs(dx) - r)
        )
    return np.clip(0.5 - d, 0, 1)


def write_downstream(
    out_dir: str | Path,
    num_clips: int,
    *,
    num_classes: int = 4,
    num_subjects: int | None = None,
    folds: int = 5,
    seed: int = 0,
    duration_s: float = 3.2,
    regression: bool = False,
    multilabel: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """A synthetic fine-tuning set in the downstream format (hicmae_dist.data.downstream):

        out/frames/<subject>/<clip>/00001.jpg ...   the clip's face crop (JPEG q90), 25 fps
        out/audio/<subject>/<clip>.wav             16 kHz mono int16
        out/labels.csv                             clip,subject,label (the hidden class)
        out/splits/split01/{train,val,test}.csv    subject-independent folds, annotation format

    Clips are rendered as write_corpus renders them (the hidden class sets shape, colour,
    motion, pitch and rhythm; subjects set background and timbre); the frames are the 160 px
    crop prepare stores for pretraining (rows 0:160, columns 32:192 of the 224 frame), as the
    emotion sets ship face crops aligned like VoxCeleb2's. regression=True writes two
    float labels per clip instead of the class: valence = 2 * class / (K - 1) - 1 and arousal
    = the beat rate scaled to [0, 1], each with a little per-clip noise. Files are written under
    a temporary name and renamed; the split files are written last. multilabel=True writes the
    CAV-MAE release's layout instead (write_multilabel).
    """
    from hicmae_dist.data.downstream import make_folds, write_folds

    if num_clips < 1 or num_classes < 1:
        raise ValueError(f"num_clips and num_classes must be >= 1, got {num_clips}, {num_classes}")
    if multilabel:
        if regression:
            raise ValueError("a set is multi-label or regression, not both")
        return write_multilabel(
            out_dir,
            num_clips,
            num_classes=num_classes,
            num_subjects=num_subjects,
            folds=folds,
            seed=seed,
            duration_s=duration_s,
            workers=workers,
            progress=progress,
        )
    out = Path(out_dir)
    num_subjects = min(num_subjects or max(folds, num_clips // 4), num_clips)
    if num_subjects < folds:
        raise ValueError(
            f"{num_subjects} subjects ({num_clips} clips) cannot make {folds} subject-independent "
            f"folds: ask for at least {folds} clips and subjects"
        )
    plans = _plan(num_clips, num_subjects, num_classes, seed)
    make_folds(plans, [p.speaker for p in plans], folds, seed)  # its checks (k >= 3 ...) before any clip is written

    write = functools.partial(
        _write_downstream_clip,
        out=out,
        num_classes=num_classes,
        seed=seed,
        duration_s=duration_s,
        regression=regression,
    )
    with ThreadPoolExecutor(max(1, workers)) as pool:
        items = list(
            tqdm(pool.map(write, plans), total=len(plans), desc="synth downstream", unit="clip", disable=not progress)
        )
    subjects = [p.speaker for p in plans]
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip", "subject", "label"])
        writer.writerows([f"{p.speaker}/{p.index:05d}", p.speaker, p.label] for p in plans)
    paths = write_folds(out / "splits", make_folds(items, subjects, folds, seed))
    return {
        "out_dir": str(out),
        "clips": len(plans),
        "subjects": len(set(subjects)),
        "classes": num_classes,
        "folds": folds,
        "regression": regression,
        "frames_per_clip": _num_frames(duration_s),
        "splits": str(out / "splits"),
        "fold_sizes": [{name: len(Path(p).read_text().splitlines()) for name, p in fold.items()} for fold in paths],
    }


def _write_downstream_clip(
    plan: _ClipPlan, *, out: Path, num_classes: int, seed: int, duration_s: float, regression: bool
):
    """Render one clip, write its face-crop frames and its wav; returns its DownstreamItem."""
    from hicmae_dist.data.downstream import DownstreamItem

    frames, pcm = _render_clip(plan, num_classes, seed, duration_s)
    clip_dir = out / "frames" / plan.speaker / f"{plan.index:05d}"
    wav = out / "audio" / plan.speaker / f"{plan.index:05d}.wav"
    if not clip_dir.exists():
        _write_crops(frames, clip_dir)
    _write_wav(pcm, wav)
    return DownstreamItem(clip_dir, wav, _downstream_labels(plan, num_classes, seed, regression))


def _write_crops(frames: np.ndarray, clip_dir: Path) -> None:
    """frames (T, 224, 224, 3) uint8 -> clip_dir/00001.jpg ... (160 px face crops, JPEG q90),
    written under clip_dir.part and renamed."""
    part = clip_dir.with_name(clip_dir.name + ".part")
    part.mkdir(parents=True, exist_ok=True)
    crops = face_crop(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    for i, frame in enumerate(crops):
        Image.fromarray(frame).save(part / f"{i + 1:05d}.jpg", quality=90)
    part.rename(clip_dir)


def _write_wav(pcm: np.ndarray, wav: Path) -> None:
    """16 kHz mono int16 samples -> wav, written under a .part name and renamed."""
    wav.parent.mkdir(parents=True, exist_ok=True)
    part = wav.with_suffix(".part")
    with wave.open(str(part), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    part.rename(wav)


def _downstream_labels(plan: _ClipPlan, num_classes: int, seed: int, regression: bool) -> tuple:
    """(class,), or (valence, arousal) with a little per-clip noise (write_downstream's docstring)."""
    if not regression:
        return (plan.label,)
    noise = np.random.default_rng((seed, 3, plan.index)).normal(0, 0.05, 2)
    style = _class_style(plan.label, num_classes)
    valence = 2 * plan.label / max(1, num_classes - 1) - 1 + noise[0]
    arousal = (style.beat_hz - 2.0) / 3.0 + noise[1]
    return (round(float(valence), 4), round(float(arousal), 4))


def write_multilabel(
    out_dir: str | Path,
    num_clips: int,
    *,
    num_classes: int = 5,
    num_subjects: int | None = None,
    folds: int = 3,
    seed: int = 0,
    duration_s: float = 3.2,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """A synthetic multi-label set in the CAV-MAE release's layout (data.downstream's docstring):

        out/frames/frame_{i}/<video_id>.jpg           i = 0..9, frame int(i n / 10), the 160 px face crop
        out/audio/<video_id>.wav                      16 kHz mono int16
        out/splits/class_labels_indices.csv           index,mid,display_name (mid /m/synthK)
        out/splits/split01/{train,val,test}.json      subject-independent folds, the release's datafiles

    Each clip carries 1-3 of the K classes (chances 0.4, 0.4, 0.2): its sound is the sum of the
    classes' voices (each gated by its own beat) and its picture overlays their shapes, each
    class at its own place on a ring around the centre. Subjects set background and timbre.
    """
    from hicmae_dist.data.downstream import make_folds

    if num_classes < 3:
        raise ValueError(f"a multi-label set of 1-3 classes per clip needs num_classes >= 3, got {num_classes}")
    out = Path(out_dir)
    num_subjects = min(num_subjects or max(folds, num_clips // 4), num_clips)
    plans = _plan(num_clips, num_subjects, num_classes, seed)
    rng = np.random.default_rng((seed, 5))
    labels = [
        tuple(sorted(int(k) for k in rng.choice(num_classes, rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]), replace=False)))
        for _ in plans
    ]
    subjects = [p.speaker for p in plans]
    split_of = make_folds(list(range(num_clips)), subjects, folds, seed)  # checks before any clip is written
    write = functools.partial(
        _write_multilabel_clip, out=out, num_classes=num_classes, seed=seed, duration_s=duration_s
    )
    with ThreadPoolExecutor(max(1, workers)) as pool:
        entries = list(
            tqdm(
                pool.map(write, plans, labels),
                total=len(plans),
                desc="synth multi-label",
                unit="clip",
                disable=not progress,
            )
        )
    (out / "splits").mkdir(parents=True, exist_ok=True)
    with open(out / "splits" / "class_labels_indices.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([k, f"/m/synth{k}", _class_name(k, num_classes)] for k in range(num_classes))
    for f, fold in enumerate(split_of):
        for name, indices in fold.items():
            path = out / "splits" / f"split{f + 1:02d}" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"data": [entries[i] for i in indices]}, indent=1))
    counts = np.bincount([k for ls in labels for k in ls], minlength=num_classes)
    return {
        "out_dir": str(out),
        "clips": num_clips,
        "subjects": len(set(subjects)),
        "classes": num_classes,
        "folds": folds,
        "multilabel": True,
        "labels_per_clip": float(np.mean([len(ls) for ls in labels])),
        "class_counts": counts.tolist(),
        "splits": str(out / "splits"),
        "fold_sizes": [{name: len(idx) for name, idx in fold.items()} for fold in split_of],
    }


def _slot(k: int, num_classes: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The (x, y) ranges of class k's shape centre in a multi-label clip: its own place on a
    ring around the face crop's centre (+- 6 px), so that two or three shapes are all seen."""
    angle = 2 * np.pi * k / num_classes
    x, y = 112 + 42 * np.cos(angle), 80 + 42 * np.sin(angle)  # around the face crop's centre
    return (x - 6, x + 6), (y - 6, y + 6)


def _class_name(k: int, num_classes: int) -> str:
    style = _class_style(k, num_classes)
    return f"{style.shape} {style.f0:.0f} Hz"


def _write_multilabel_clip(
    plan: _ClipPlan, labels: tuple[int, ...], *, out: Path, num_classes: int, seed: int, duration_s: float
) -> dict:
    """Render one multi-label clip, write its 10 frames and its wav; returns its datafile entry."""
    background, timbre = _speaker_look(plan.speaker, seed)
    rng = np.random.default_rng((seed, 4, plan.index))
    n_frames = _num_frames(duration_s)
    voices, shapes = [], []
    for k in labels:
        style = _class_style(k, num_classes)
        beat = _beat(style, rng.uniform(0, 2 * np.pi))
        voices.append(_render_audio(style, timbre, beat, n_frames / FPS, rng).astype(np.float32))
        shapes.append((style, beat, _placement(rng, centre=_slot(k, num_classes), radius=(16, 20), amp=(3, 6))))
    pcm = np.clip(sum(voices) / np.sqrt(len(voices)), -32768, 32767).astype(np.int16)
    frames = _render_frames(shapes, background, n_frames, rng)
    crops = face_crop(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    video_id = f"syn{plan.index:05d}"
    for i in range(10):  # the release's extract_video_frame.py: frame int(i * n / 10)
        path = out / "frames" / f"frame_{i}" / f"{video_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crops[int(i * n_frames / 10)]).save(path, quality=90)
    wav = out / "audio" / f"{video_id}.wav"
    _write_wav(pcm, wav)
    return {
        "video_id": video_id,
        "wav": str(wav.resolve()),
        "video_path": str((out / "frames").resolve()),
        "labels": ",".join(f"/m/synth{k}" for k in labels),
    }


def _ffmpeg(args: list[str], stdin: bytes, target: Path) -> None:
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-v", "error", "-y", *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {target}: {proc.stderr.decode(errors='replace')[-2000:]}")
