"""Learning-rate schedule of the HiCMAE recipe: linear warm-up from 0, then per-step cosine."""
from __future__ import annotations

import math

from hicmae_dist.config import TrainConfig


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the recipe: lr = base_lr * global batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, train: TrainConfig, global_batch: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `train.steps`."""
    peak = scaled_lr(train.base_lr, global_batch)
    floor = scaled_lr(train.min_lr, global_batch)
    if step < train.warmup_steps:
        return peak * step / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
