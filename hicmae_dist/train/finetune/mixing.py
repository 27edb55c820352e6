"""Mixup / CutMix with label smoothing for fine-tuning batches (timm's 'batch' mode); multi-hot
targets are smoothed and mixed as the CAV-MAE release's dataloader does."""

from __future__ import annotations

import math

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off).scatter_(1, labels[:, None].cpu(), 1.0 - smoothing + off)


def smooth_multi_hot(multi_hot: torch.Tensor, smoothing: float, lam: float | None = None) -> torch.Tensor:
    """The release's multi-label targets (B, K) from multi-hot labels (B, K): negatives s / K,
    positives 1 - s; mixed with the clip at the mirrored position, s / K + (1 - s) (lam y +
    (1 - lam) y'). (So a mixed clip's positives get s / K more than an unmixed clip's, as there.)"""
    off = smoothing / multi_hot.shape[1]
    y = multi_hot.float().cpu()
    if lam is None:
        return torch.where(y > 0, 1.0 - smoothing, off)
    return off + (1.0 - smoothing) * (lam * y + (1.0 - lam) * y.flip(0))


def _cut_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of area (1 - lam) h w centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mix_batch(video: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor, num_classes: int, ft, rng):
    """Mixup / CutMix (timm's 'batch' mode) with label smoothing, one lambda for both
    modalities: every clip is mixed with the clip at the mirrored batch position.

    video (B, 3, T, H, W) or (B, 3, H, W); audio (B, 1, T_a, F); labels (B,) int64 or
    multi-hot (B, K) (smooth_multi_hot).
    Mixup blends both inputs with lambda. CutMix pastes a spatial box into the video (every
    frame) and a time span of the same fraction into the audio (all mel bins: the fraction is
    exact to one frame, where a second box would be clipped differently). With
    ft.mix_video_only (the release) the audio is left alone. Returns (video, audio, soft
    targets (B, K)); the inputs are modified in place.
    """
    multi_hot = labels.dim() == 2
    targets = (
        smooth_multi_hot(labels, ft.label_smoothing)
        if multi_hot
        else smooth_one_hot(labels, num_classes, ft.label_smoothing)
    )
    use_mixup, use_cutmix = ft.mixup > 0, ft.cutmix > 0
    if not (use_mixup or use_cutmix) or rng.random() >= ft.mix_prob:
        return video, audio, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < ft.switch_prob)
    lam = float(rng.beta(ft.cutmix, ft.cutmix) if cutmix else rng.beta(ft.mixup, ft.mixup))
    if cutmix:
        h, w = video.shape[-2:]
        y0, y1, x0, x1 = _cut_box(h, w, lam, rng)
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        if not ft.mix_video_only:
            frames = audio.shape[-2]
            span = round((1.0 - lam) * frames)
            start = int(rng.integers(0, frames - span + 1))
            audio[..., start : start + span, :] = audio.flip(0)[..., start : start + span, :]
    else:
        partner = video.flip(0)  # a copy, taken before the in-place blend
        video.mul_(lam).add_(partner, alpha=1.0 - lam)
        if not ft.mix_video_only:
            partner = audio.flip(0)
            audio.mul_(lam).add_(partner, alpha=1.0 - lam)
    if multi_hot:
        return video, audio, smooth_multi_hot(labels, ft.label_smoothing, lam)
    return video, audio, lam * targets + (1.0 - lam) * targets.flip(0)
