"""Models: HiCMAE and CAV-MAE (pretraining and fine-tuning), their blocks, reconstruction
targets, upstream checkpoint converters (convert) and parameter / compute accounting (info)."""
from __future__ import annotations

import torch.nn as nn

from hicmae_dist.config import ModelConfig
from hicmae_dist.models.cavmae import CAVMAEFinetune, CAVMAEPretrain
from hicmae_dist.models.hicmae import HiCMAEFinetune, HiCMAEPretrain

ARCHS = ("hicmae", "cavmae")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pretraining model named by cfg.arch."""
    if cfg.arch == "hicmae":
        return HiCMAEPretrain(cfg)
    if cfg.arch == "cavmae":
        return CAVMAEPretrain(cfg)
    raise ValueError(f"model.arch {cfg.arch!r}: expected one of {', '.join(ARCHS)}")


def build_finetune_model(cfg: ModelConfig, num_classes: int, **kwargs) -> nn.Module:
    """The fine-tuning model named by cfg.arch; kwargs go to its constructor
    (HiCMAE: head_activation; CAV-MAE: mode)."""
    if cfg.arch == "hicmae":
        return HiCMAEFinetune(cfg, num_classes, **kwargs)
    if cfg.arch == "cavmae":
        return CAVMAEFinetune(cfg, num_classes, **kwargs)
    raise ValueError(f"model.arch {cfg.arch!r}: expected one of {', '.join(ARCHS)}")


__all__ = ["ARCHS", "CAVMAEFinetune", "CAVMAEPretrain", "HiCMAEFinetune", "HiCMAEPretrain",
           "build_finetune_model", "build_model"]
