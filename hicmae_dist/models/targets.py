"""Reconstruction targets (docs/models.md, HiCMAE losses): what the decoders predict for each token.

Computed without gradient from the model's own inputs, in float32, one row per token in the
encoders' flat token order, so the rows of the masked tokens are `gather_visible(target, masked_idx)`.
The per-patch standardisation is the op `hicmae_dist.ops.patch_norm` (on the CPU the same ATen
maths as `_standardise`, bit for bit; on CUDA a fused kernel).
"""

from __future__ import annotations

import torch

from hicmae_dist.ops.tokens import patch_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_NORM_EPS = 1e-6


def _standardise(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """(x - mean) / (unbiased std + 1e-6) over `dim`: each patch on its own scale. The plain
    PyTorch form of what `patch_norm` computes."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.var(dim=dim, unbiased=True, keepdim=True).sqrt()
    return (x - mean) / (std + PATCH_NORM_EPS)


@torch.no_grad()
def video_target(video: torch.Tensor, tubelet: int, patch: int, frame_diff: bool = True) -> torch.Tensor:
    """Per-tubelet normalised pixels, optionally as frame differences.

    video: (B, 3, T, H, W), ImageNet-normalised. Returns (B, N, tubelet * patch * patch * 3) with
    N = (T / tubelet) * (H / patch) * (W / patch) in (t, h, w) order, each row flattened
    (frame, row, column, channel), channel last. Each tubelet is standardised per colour channel
    in [0, 1] pixel space; with frame_diff, every later frame of a tubelet becomes its difference
    to the tubelet's first (standardised) frame, which the release uses as the target.
    """
    B, C, T, H, W = video.shape
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(1, C, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(1, C, 1, 1, 1)
    pixels = video.float() * std + mean  # (B, 3, T, H, W) in [0, 1]
    t, h, w = T // tubelet, H // patch, W // patch
    x = pixels.view(B, C, t, tubelet, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, t, h, w, tubelet, patch, patch, C)
    x = x.reshape(B * t * h * w, tubelet, patch * patch, C)
    x = patch_norm(x, frame_diff)  # per tubelet and channel, then the frame differences
    return x.reshape(B, t * h * w, -1)


@torch.no_grad()
def audio_target(audio: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch normalised fbank.

    audio: (B, 1, T, F) normalised fbank, time first. Returns (B, N, patch * patch) with
    N = (T / patch) * (F / patch), token index t * (F / patch) + f, each row flattened
    (time, frequency); each patch standardised on its own.
    """
    B, C, T, F = audio.shape
    t, f = T // patch, F // patch
    x = audio.float().view(B, C, t, patch, f, patch)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(B * t * f, 1, patch * patch, C)  # (B * N, 1, P, C)
    return patch_norm(x, frame_diff=False).reshape(B, t * f, -1)
