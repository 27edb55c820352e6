"""CAV-MAE's multiply-accumulates per sample by component (see hicmae_dist.models.macs)."""

from __future__ import annotations

import math

from hicmae_dist.config import ModelConfig
from hicmae_dist.masking import num_visible_mae
from hicmae_dist.models.cavmae.model import audio_grid, video_grid
from hicmae_dist.models.macs import block, linear


def macs(cfg: ModelConfig, kind: str, num_classes: int, mode: str) -> dict[str, int]:
    C, r = cfg.width, cfg.mlp_ratio
    na_all, nv_all = math.prod(audio_grid(cfg)), math.prod(video_grid(cfg))
    if kind == "pretrain":
        na, nv = num_visible_mae(na_all, cfg.audio_mask_ratio), num_visible_mae(nv_all, cfg.video_mask_ratio)
    else:
        na, nv = na_all, nv_all
    audio = linear(na_all, cfg.patch**2, C) + cfg.modality_depth * block(na, C, r)
    video = linear(nv_all, 3 * cfg.patch**2, C) + cfg.modality_depth * block(nv, C, r)
    if kind == "pretrain":  # the shared blocks: unified, audio and video streams
        Cd = cfg.decoder_width
        return {
            "audio_encoder": audio,
            "video_encoder": video,
            "shared": cfg.shared_depth * (block(na + nv, C, r) + block(na, C, r) + block(nv, C, r)),
            "decoder": (
                linear(na + nv, C, Cd)
                + cfg.decoder_depth * block(na_all + nv_all, Cd, r)
                + linear(na_all, Cd, cfg.patch**2)
                + linear(nv_all, Cd, 3 * cfg.patch**2)
            ),
        }
    shared_tokens = {"multimodal": na + nv, "audio": na, "video": nv}[mode]
    out = {
        "audio_encoder": audio if mode != "video" else 0,
        "video_encoder": video if mode != "audio" else 0,
        "shared": cfg.shared_depth * block(shared_tokens, C, r),
        "head": linear(1, C, num_classes),
    }
    return out
