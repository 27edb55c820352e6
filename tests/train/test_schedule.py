"""Learning-rate schedules worked out by hand: HiCMAE's warm-up + cosine, CAV-MAE's step decay."""

import math

import pytest

from hicmae_dist.config import load_config
from hicmae_dist.train.schedule import lr_at


def test_warmup_then_cosine_with_batch_scaling():
    train = load_config(
        "tiny-cpu", ["train.steps=110", "train.warmup_steps=10", "train.base_lr=2.56e-2", "train.min_lr=2.56e-4"]
    ).train
    # global batch 64: peak 2.56e-2 * 64 / 256 = 6.4e-3, floor 6.4e-5
    assert lr_at(0, train, 64) == 0.0
    assert lr_at(5, train, 64) == pytest.approx(3.2e-3)
    assert lr_at(10, train, 64) == pytest.approx(6.4e-3)
    assert lr_at(60, train, 64) == pytest.approx(6.4e-5 + (6.4e-3 - 6.4e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, train, 64) == pytest.approx(6.4e-5)


def test_cavmae_step_decay_is_absolute_and_halves_at_milestones():
    train = load_config("cavmae-base-vox2").train
    assert train.optimizer == "adam" and train.schedule == "step" and not train.scale_lr
    m10, m15, m20 = train.lr_milestones
    assert [lr_at(s, train, 48) for s in (0, m10 - 1, m10, m15, m20, train.steps - 1)] == pytest.approx(
        [5e-5, 5e-5, 2.5e-5, 1.25e-5, 6.25e-6, 6.25e-6]
    )
