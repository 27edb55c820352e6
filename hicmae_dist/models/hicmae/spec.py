"""HiCMAE's ModelSpec: what the rest of the package needs to know about the family."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from hicmae_dist.config import FinetuneConfig, ModelConfig
from hicmae_dist.models.hicmae import upstream
from hicmae_dist.models.hicmae.macs import macs
from hicmae_dist.models.hicmae.model import HiCMAEFinetune, HiCMAEPretrain
from hicmae_dist.models.spec import ModelSpec


def _finetune_param_groups(model: nn.Module, weight_decay: float, ft: FinetuneConfig) -> list[dict]:
    return model.param_groups(weight_decay, layer_decay=ft.layer_decay)


def _input_shapes(cfg: ModelConfig, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size), (batch, 1, cfg.audio_frames, cfg.mel_bins)


def _activation_token_widths(m: ModelConfig) -> list[tuple[float, int]]:
    """Tokens x width per group of blocks (a CSBlock counts as 1.5 blocks), for one sample."""
    nv = (m.num_frames // m.tubelet) * (m.image_size // m.patch) ** 2
    na = (m.audio_frames // m.patch) * (m.mel_bins // m.patch)
    vis_v = nv - int(m.video_mask_ratio * (m.image_size // m.patch) ** 2) * (m.num_frames // m.tubelet)
    vis_a = na - int(m.audio_mask_ratio * na)
    return [
        (m.encoder_depth * (vis_v + vis_a), m.width),
        (m.fusion_depth * 1.5 * (vis_v + vis_a), m.width),
        (1.5 * m.decoder_depth * (nv + na), m.decoder_width),
    ]


SPEC = ModelSpec(
    name="hicmae",
    pretrain_class=HiCMAEPretrain,
    finetune_class=HiCMAEFinetune,
    upstream=upstream,
    macs=macs,
    default_classes=6,
    presets_dir=Path(__file__).parent / "presets",
    finetune_kwargs=lambda ft: {"head_activation": ft.head_activation},
    finetune_param_groups=_finetune_param_groups,
    symmetric_contrastive=lambda cfg: True,  # its loss is always symmetric
    input_shapes=_input_shapes,
    activation_token_widths=_activation_token_widths,
    sizes={"hicmae-t": "hicmae-t-vox2", "hicmae-s": "hicmae-s-vox2", "hicmae-b": "hicmae-b-vox2"},
    paper_finetune_gmacs={"hicmae-t": 13.8, "hicmae-s": 27.6, "hicmae-b": 46.1},  # docs/models.md, sizes
)
