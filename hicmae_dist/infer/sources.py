"""What embed / predict read: video files, folders of them and CSV lists, each opened as a Clip
(frames at the model's 25 fps, 16 kHz mono audio). A video that cannot be used raises SkipVideo
with a kind and a reason; the runner reports it and goes on."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hicmae_dist.config import ConfigError
from hicmae_dist.data import audio, video

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")
LIST_SUFFIXES = (".csv", ".txt")
SKIP_KINDS = ("missing", "unreadable", "no_audio", "too_short")


class SkipVideo(Exception):
    """A video that gives no window; kind is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class VideoInput:
    id: str  # unique across the run: the path under the folder given, or the CSV's id column
    path: Path


def list_inputs(inputs: list[str | Path]) -> list[VideoInput]:
    """Every video named by `inputs`: a video file, a folder (searched recursively for
    VIDEO_SUFFIXES) or a .csv / .txt list (a `path` column and an optional `id` column, or one
    path per line; relative paths from the list's folder). Ids must be unique."""
    found: list[VideoInput] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found += [
                VideoInput(p.relative_to(entry).with_suffix("").as_posix(), p)
                for p in sorted(entry.rglob("*"))
                if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
            ]
        elif entry.suffix.lower() in LIST_SUFFIXES:
            found += read_list(entry)
        else:  # a file, even a missing one: reported per video, not fatal
            found.append(VideoInput(entry.stem, entry))
    seen: dict[str, Path] = {}
    for item in found:
        if item.id in seen:
            raise ConfigError(
                f"two inputs have the id {item.id!r} ({seen[item.id]} and {item.path}): give them "
                f"unique names, or list them in a CSV with an `id` column"
            )
        seen[item.id] = item.path
    return found


def read_list(path: Path) -> list[VideoInput]:
    """A CSV with a header naming `path` (and optionally `id`), or bare paths one per line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input list")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    header = next(csv.reader(lines[:1]), [])
    if "path" not in header:
        rows = [{"path": ln.strip()} for ln in lines]
    else:
        rows = list(csv.DictReader(lines))
    items = []
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ConfigError(f"{path}: row {n} has no path (expected a `path` column, or one path per line)")
        p = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        items.append(VideoInput(row.get("id") or p.stem, p))
    return items


class Clip:
    """Frames at video.FPS and 16 kHz mono audio. Subclasses give num_frames, size, frames()."""

    num_frames: int  # at video.FPS
    width: int
    height: int
    wave: torch.Tensor  # (S,) float32, 16 kHz mono
    audio_start_s: float = 0.0  # where wave[0] sits on the frames' clock
    audio_cut: str | None = None  # a note when the audio track could be decoded only in part

    def frames(self, indices: list[int]) -> np.ndarray:  # (len(indices), H, W, 3) uint8
        raise NotImplementedError

    def audio_index(self, frame: int) -> int:
        """The sample of wave at the time of `frame`."""
        return max(0, round((frame / video.FPS - self.audio_start_s) * audio.SAMPLE_RATE))


class TensorClip(Clip):
    """Frames someone already has: (T, H, W, 3) uint8 at 25 fps and a (S,) 16 kHz waveform."""

    def __init__(self, frames: torch.Tensor | np.ndarray, wave: torch.Tensor | np.ndarray):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"frames: expected (T, H, W, 3) uint8 at {video.FPS} fps, got {frames.shape} {frames.dtype}"
            )
        self._frames = frames
        self.num_frames, self.height, self.width = frames.shape[:3]
        self.wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)

    def frames(self, indices: list[int]) -> np.ndarray:
        return self._frames[indices]


class VideoFileClip(Clip):
    """A video file through torchcodec: frame i is the one shown at begin + i / 25 s (any source
    rate is resampled so), the audio resampled to 16 kHz mono."""

    def __init__(self, path: Path):
        from torchcodec.decoders import AudioDecoder, VideoDecoder

        if not path.is_file():
            raise SkipVideo("missing", f"{path}: no such file")
        try:
            self.decoder = VideoDecoder(path, dimension_order="NHWC")  # exact mode: scans the stream
            info = self.decoder.metadata
            self.begin_s, end_s = float(info.begin_stream_seconds or 0.0), float(info.end_stream_seconds)
            self.width, self.height = info.width, info.height
        except Exception as exn:  # torchcodec raises RuntimeError / ValueError on broken files
            raise SkipVideo("unreadable", f"unreadable video: {_first_line(exn)}") from exn
        self.num_frames = int((end_s - self.begin_s) * video.FPS + 1e-6)
        if self.num_frames < 1 or len(self.decoder) < 1:
            raise SkipVideo("unreadable", "no decodable video frame")
        try:
            decoder = AudioDecoder(path, sample_rate=audio.SAMPLE_RATE, num_channels=1)
            samples, self.audio_cut = _decode_audio(decoder, end_s)
        except Exception as exn:
            raise SkipVideo("no_audio", f"no readable audio track: {_first_line(exn)}") from exn
        if samples.data.shape[-1] < audio.FRAME_SAMPLES:
            raise SkipVideo("no_audio", f"audio track of {samples.data.shape[-1]} samples (< one 25 ms frame)")
        self.wave = samples.data[0]
        self.audio_start_s = float(samples.pts_seconds) - self.begin_s

    def frames(self, indices: list[int]) -> np.ndarray:
        times = [self.begin_s + i / video.FPS for i in indices]
        try:
            return self.decoder.get_frames_played_at(times).data.numpy()
        except Exception as exn:
            raise SkipVideo("unreadable", f"frames at {times[0]:.2f}-{times[-1]:.2f} s: {_first_line(exn)}") from exn


def _decode_audio(decoder, end_s: float):
    """(samples up to the video's end, None), or where a damaged track (a cut file's last packet)
    stops decoding: (the samples up to there, a note), the point found by bisection to 0.05 s."""
    begin = float(decoder.metadata.begin_stream_seconds or 0.0)
    try:
        return decoder.get_samples_played_in_range(begin, end_s), None
    except RuntimeError as exn:
        error = _first_line(exn)
    good, bad = begin, end_s
    while bad - good > 0.05:
        mid = (good + bad) / 2
        try:
            decoder.get_samples_played_in_range(begin, mid)
            good = mid
        except RuntimeError:
            bad = mid
    if good - begin < audio.FRAME_SAMPLES / audio.SAMPLE_RATE:
        raise RuntimeError(error)
    return decoder.get_samples_played_in_range(
        begin, good
    ), f"audio track damaged after {good:.2f} s of {end_s:.2f} s ({error}): later windows reuse its last samples"


def _first_line(exn: BaseException) -> str:
    """The message's first line without torchcodec's 'function, source.cpp:line, ' prefix."""
    lines = str(exn).strip().splitlines()
    return re.sub(r"^\w+, \S+:\d+, ", "", lines[0].strip()) if lines else type(exn).__name__
