"""A clip cut into the model's windows and turned into its inputs, with the fine-tuning
evaluation's preprocessing (data/downstream.py, val / test): the same frame sampling, crops,
resize and normalisation, and the same fbank.

HiCMAE: a window is 64 frames at 25 fps (2.56 s) of which the model sees every 4th; the audio is
the 2.56 s from its first frame. CAV-MAE: a window is the 10.24 s of its 1024-frame fbank; its 10
frames (video.cavmae_frame_indices from the window's start) are 10 views with the same audio.
A window's views (CAV-MAE's frames, HiCMAE's spatial crops) are averaged by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hicmae_dist.config import ModelConfig
from hicmae_dist.data import audio, video
from hicmae_dist.data.downstream import crop_resize, short_side_box, test_views
from hicmae_dist.infer.sources import Clip

Corners = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


@dataclass(frozen=True)
class Recipe:
    """How one model sees a clip (from its ModelConfig)."""

    arch: str
    image_size: int
    num_frames: int
    audio_frames: int
    mel_bins: int
    frame_stride: int = video.FRAME_STRIDE

    @classmethod
    def of(cls, cfg: ModelConfig) -> Recipe:
        return cls(cfg.arch, cfg.image_size, cfg.num_frames, cfg.audio_frames, cfg.mel_bins)

    @property
    def cavmae(self) -> bool:
        return self.arch == "cavmae"

    @property
    def span_frames(self) -> int:
        """Frames at 25 fps one window covers."""
        if self.cavmae:
            return round(self.audio_frames * audio.FRAME_SHIFT / audio.SAMPLE_RATE * video.FPS)
        return self.num_frames * self.frame_stride

    @property
    def audio_samples(self) -> int:
        return round(self.span_frames / video.FPS * audio.SAMPLE_RATE)

    @property
    def resample(self):
        return Image.BICUBIC if self.cavmae else Image.BILINEAR


@dataclass(frozen=True)
class Window:
    start: int  # first frame (25 fps)
    views: tuple[tuple[tuple[int, ...], float], ...]  # (frame indices, crop position along the long side)
    padded: bool  # the clip is shorter than one window: its last frame repeated, the fbank zero-padded

    def frames(self) -> list[int]:
        return sorted({i for indices, _ in self.views for i in indices})


def plan_windows(
    recipe: Recipe, num_frames: int, *, hop: int | None = None, segments: int | None = None, crops: int = 1
) -> list[Window]:
    """Windows every `hop` frames (default: one span, back to back), or `segments` windows spread
    over the clip as the fine-tuning test pass spreads its chunks. A clip shorter than one window
    gives one padded window."""
    span, n = recipe.span_frames, num_frames
    if segments is None and n > span:
        starts = list(range(0, n - span + 1, hop or span))
    elif segments is None or segments == 1:
        starts = [0]
    else:
        starts = [int(c * max(n - span, 0) / (segments - 1)) for c in range(segments)]
    positions = [0.5] if crops == 1 else [k / (crops - 1) for k in range(crops)]
    if recipe.cavmae:
        return [Window(s, tuple(((s + j,), 0.5) for j in video.cavmae_frame_indices(n - s)), n < span) for s in starts]
    if segments is not None:  # the test pass's own chunks (downstream.test_views), frame for frame
        chunks = test_views(n, recipe.num_frames, recipe.frame_stride, segments)
    else:
        chunks = [[min(s + recipe.frame_stride * k, n - 1) for k in range(recipe.num_frames)] for s in starts]
        if n < span:
            chunks = test_views(n, recipe.num_frames, recipe.frame_stride, 1)
    return [Window(c[0], tuple((tuple(c), p) for p in positions), n < span) for c in chunks]


def centre_boxes(clip: Clip, size: int, position: float) -> Corners:
    """The evaluation crop: short side resized to size, a square at `position` along the long side."""
    left, top, w, h = short_side_box(clip.width, clip.height, size, position)
    return left, top, left + w, top + h


def window_inputs(
    clip: Clip, window: Window, recipe: Recipe, faces: dict[int, Corners] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, audio) of one window: HiCMAE (V, 3, T, S, S), (V, 1, 256, 128); CAV-MAE
    (V, 3, S, S), (V, 1, 1024, 128). `faces` gives each frame's crop (faces.track); else the
    centre crop of the views' positions."""
    size, frames = recipe.image_size, window.frames()
    decoded = dict(zip(frames, clip.frames(frames)))
    views = len(window.views)
    out_v = torch.empty(views, 3, *(() if recipe.cavmae else (recipe.num_frames,)), size, size)
    for v, (indices, position) in enumerate(window.views):
        pixels = np.stack(
            [
                crop_resize(
                    Image.fromarray(decoded[i]),
                    faces[i] if faces else centre_boxes(clip, size, position),
                    size,
                    resample=recipe.resample,
                )
                for i in indices
            ]
        )  # (T, S, S, 3) uint8
        if recipe.cavmae:
            video.image_into(out_v[v], torch.from_numpy(pixels[0]))
        else:
            video.frames_into(out_v[v], torch.from_numpy(pixels), None)
    out_a = torch.empty(views, 1, recipe.audio_frames, recipe.mel_bins)
    if recipe.cavmae:  # one fbank from the window's start, shared by its frames
        audio.cavmae_fbank_into(out_a[0, 0], audio_window(clip, window.start, recipe.audio_samples))
        out_a[1:] = out_a[0]
    else:
        for v, (indices, _) in enumerate(window.views):
            audio.fbank_into(out_a[v, 0], audio_window(clip, indices[0], recipe.audio_samples))
    return out_v, out_a


def audio_window(clip: Clip, frame: int, length: int) -> torch.Tensor:
    """The `length` samples from the time of `frame`; the clip's last ones when the audio ends
    before one 25 ms frame (as the fine-tuning dataset does); shorter at the end (zero-padded fbank)."""
    first = clip.audio_index(frame)
    wave = clip.wave[first : first + length]
    return wave if wave.shape[0] >= audio.FRAME_SAMPLES else clip.wave[-length:]
