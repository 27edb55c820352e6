"""Learning-rate schedules: HiCMAE's linear warm-up from 0 then per-step cosine, and CAV-MAE's
step decay (x gamma at each milestone)."""

from __future__ import annotations

import bisect
import math

from hicmae_dist.config import TrainConfig


def lr_at(step: int, train: TrainConfig, global_batch: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `train.steps`; the linear scaling
    rule lr = base_lr * global batch / 256 applies when train.scale_lr."""
    scale = global_batch / 256 if train.scale_lr else 1.0
    peak, floor = train.base_lr * scale, train.min_lr * scale
    if step < train.warmup_steps:
        return peak * step / train.warmup_steps
    if train.schedule == "step":
        return peak * train.lr_gamma ** bisect.bisect_right(train.lr_milestones, step)
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
