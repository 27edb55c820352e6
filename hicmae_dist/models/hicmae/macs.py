"""HiCMAE's multiply-accumulates per sample by component (see hicmae_dist.models.macs)."""

from __future__ import annotations

import math

from hicmae_dist.config import ModelConfig
from hicmae_dist.masking import num_masked
from hicmae_dist.models.hicmae.model import audio_grid, video_grid
from hicmae_dist.models.macs import block, cross_self_block, linear


def macs(cfg: ModelConfig, kind: str, num_classes: int, mode: str = "multimodal") -> dict[str, int]:
    C, r = cfg.width, cfg.mlp_ratio
    t, h, w = video_grid(cfg)
    nv_all, na_all = t * h * w, math.prod(audio_grid(cfg))
    video_patch, audio_patch = 3 * cfg.tubelet * cfg.patch**2, cfg.patch**2
    if kind == "pretrain":  # tube masking of the video, random masking of the audio
        nv = t * (h * w - num_masked(h * w, cfg.video_mask_ratio))
        na = na_all - num_masked(na_all, cfg.audio_mask_ratio)
    else:
        nv, na = nv_all, na_all
    out = {  # the patch embedding runs on every token, the blocks on the visible ones
        "video_encoder": linear(nv_all, video_patch, C) + cfg.encoder_depth * block(nv, C, r),
        "audio_encoder": linear(na_all, audio_patch, C) + cfg.encoder_depth * block(na, C, r),
        "fusion": cfg.fusion_depth * (cross_self_block(nv, na, C, r) + cross_self_block(na, nv, C, r)),
    }
    if kind == "pretrain":
        Cd, skips = cfg.decoder_width, len(cfg.intermediate_layers)
        for name, n_all, n_vis, patch_dim in (
            ("video_decoder", nv_all, nv, video_patch),
            ("audio_decoder", na_all, na, audio_patch),
        ):
            out[name] = (
                linear(n_vis * (1 + skips), C, Cd)  # fusion output and every skip
                + block(n_all, Cd, r)
                + (cfg.decoder_depth - 1) * cross_self_block(n_all, n_vis, Cd, r)
                + linear(n_all - n_vis, Cd, patch_dim)
            )  # head on the masked tokens only
    else:
        out["head"] = linear(1, 4 * C, num_classes)
    return out
