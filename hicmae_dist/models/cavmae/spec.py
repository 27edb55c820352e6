"""CAV-MAE's ModelSpec: what the rest of the package needs to know about the family."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from hicmae_dist.config import FinetuneConfig, ModelConfig
from hicmae_dist.models.cavmae import upstream
from hicmae_dist.models.cavmae.macs import macs
from hicmae_dist.models.cavmae.model import CAVMAEFinetune, CAVMAEPretrain
from hicmae_dist.models.spec import ModelSpec


def _finetune_param_groups(model: nn.Module, weight_decay: float, ft: FinetuneConfig) -> list[dict]:
    # the other modes' LayerNorms (and encoder) get no gradient: frozen, out of the optimiser
    unused = set(model.unused_parameters())
    for name, param in model.named_parameters():
        param.requires_grad_(name not in unused)
    return model.param_groups(weight_decay, head_lr_scale=ft.head_lr_scale)


def _input_shapes(cfg: ModelConfig, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (batch, 3, cfg.image_size, cfg.image_size), (batch, 1, cfg.audio_frames, cfg.mel_bins)


SPEC = ModelSpec(
    name="cavmae",
    pretrain_class=CAVMAEPretrain,
    finetune_class=CAVMAEFinetune,
    upstream=upstream,
    macs=macs,
    default_classes=527,
    presets_dir=Path(__file__).parent / "presets",
    finetune_kwargs=lambda ft: {"mode": ft.mode},
    finetune_param_groups=_finetune_param_groups,
    symmetric_contrastive=lambda cfg: bool(cfg.symmetric_contrastive),  # one direction unless asked
    input_shapes=_input_shapes,
    sizes={"cavmae-base": "cavmae-base-vox2"},
)
