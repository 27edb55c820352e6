"""Parameter and compute accounting, and example inputs, for the shipped models (`bench model`,
the timing, lives in hicmae_dist/bench/model.py).

Multiply-accumulates (MACs) per sample are counted by formula, not by tracing: the linear layers
(every nn.Linear, including q / kv / proj / MLP / heads), the patch-embedding convolutions (a
Linear over each patch) and the two attention matmuls (q k^T and weights @ v: 2 * Nq * Nk * C
over all heads), each for the number of tokens that part of the model really sees. LayerNorm,
softmax, GELU, position additions, pooling and losses are left out (a fraction of a percent).
tests/models/test_info.py checks the formula against torch's FlopCounterMode on small models.

Against SPEC.md's "about 13.8 / 27.6 / 46.1 G MACs per fine-tune view" for HiCMAE T / S / B,
this count gives 13.81 / 27.65 / 46.11 G: the same quantity (the video encoder is about 70% of it);
the differences are rounding plus the classifier head (12 k MACs).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from hicmae_dist.config import ModelConfig, load_config
from hicmae_dist.masking import num_masked, num_visible_mae

MODELS = {"hicmae-t": "hicmae-t-vox2", "hicmae-s": "hicmae-s-vox2", "hicmae-b": "hicmae-b-vox2",
          "cavmae-base": "cavmae-base-vox2"}  # name -> preset
DEFAULT_CLASSES = {"hicmae": 6, "cavmae": 527}
SPEC_FINETUNE_GMACS = {"hicmae-t": 13.8, "hicmae-s": 27.6, "hicmae-b": 46.1}  # SPEC.md 1, 'Sizes'


def model_config(name: str) -> ModelConfig:
    """The ModelConfig of a shipped model name (hicmae-t, hicmae-s, hicmae-b, cavmae-base)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)}")
    return load_config(MODELS[name]).model


# --- parameters --------------------------------------------------------------------------------

def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """{"total", "trainable", "components": {top-level module or parameter: count}}."""
    components: Counter[str] = Counter()
    for name, p in model.named_parameters():
        components[name.split(".")[0]] += p.numel()
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "components": dict(components)}


# --- multiply-accumulates ------------------------------------------------------------------------

def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return tokens * fan_in * fan_out


def _attention(nq: int, nk: int, dim: int) -> int:
    """q k^T and softmax(.) v, all heads: 2 * Nq * Nk * C."""
    return 2 * nq * nk * dim


def _block(n: int, dim: int, mlp_ratio: float) -> int:
    """Self-attention block: qkv, attention, proj, MLP."""
    hidden = int(dim * mlp_ratio)
    return _linear(n, dim, 3 * dim) + _attention(n, n, dim) + _linear(n, dim, dim) + 2 * _linear(n, dim, hidden)


def _cross_self_block(nq: int, nk: int, dim: int, mlp_ratio: float) -> int:
    """CSBlock: q on the queries, kv on the context, cross attention, proj, then a _block."""
    return (_linear(nq, dim, dim) + _linear(nk, dim, 2 * dim) + _attention(nq, nk, dim)
            + _linear(nq, dim, dim) + _block(nq, dim, mlp_ratio))


def _hicmae_macs(cfg: ModelConfig, kind: str, num_classes: int) -> dict[str, int]:
    from hicmae_dist.models.hicmae import audio_grid, video_grid

    C, r = cfg.width, cfg.mlp_ratio
    t, h, w = video_grid(cfg)
    nv_all, na_all = t * h * w, math.prod(audio_grid(cfg))
    video_patch, audio_patch = 3 * cfg.tubelet * cfg.patch ** 2, cfg.patch ** 2
    if kind == "pretrain":  # tube masking of the video, random masking of the audio
        nv = t * (h * w - num_masked(h * w, cfg.video_mask_ratio))
        na = na_all - num_masked(na_all, cfg.audio_mask_ratio)
    else:
        nv, na = nv_all, na_all
    out = {  # the patch embedding runs on every token, the blocks on the visible ones
        "video_encoder": _linear(nv_all, video_patch, C) + cfg.encoder_depth * _block(nv, C, r),
        "audio_encoder": _linear(na_all, audio_patch, C) + cfg.encoder_depth * _block(na, C, r),
        "fusion": cfg.fusion_depth * (_cross_self_block(nv, na, C, r) + _cross_self_block(na, nv, C, r)),
    }
    if kind == "pretrain":
        Cd, skips = cfg.decoder_width, len(cfg.intermediate_layers)
        for name, n_all, n_vis, patch_dim in (("video_decoder", nv_all, nv, video_patch),
                                              ("audio_decoder", na_all, na, audio_patch)):
            out[name] = (_linear(n_vis * (1 + skips), C, Cd)  # fusion output and every skip
                         + _block(n_all, Cd, r) + (cfg.decoder_depth - 1) * _cross_self_block(n_all, n_vis, Cd, r)
                         + _linear(n_all - n_vis, Cd, patch_dim))  # head on the masked tokens only
    else:
        out["head"] = _linear(1, 4 * C, num_classes)
    return out


def _cavmae_macs(cfg: ModelConfig, kind: str, num_classes: int, mode: str) -> dict[str, int]:
    from hicmae_dist.models.cavmae import audio_grid, video_grid

    C, r = cfg.width, cfg.mlp_ratio
    na_all, nv_all = math.prod(audio_grid(cfg)), math.prod(video_grid(cfg))
    if kind == "pretrain":
        na, nv = num_visible_mae(na_all, cfg.audio_mask_ratio), num_visible_mae(nv_all, cfg.video_mask_ratio)
    else:
        na, nv = na_all, nv_all
    audio = _linear(na_all, cfg.patch ** 2, C) + cfg.encoder_depth * _block(na, C, r)
    video = _linear(nv_all, 3 * cfg.patch ** 2, C) + cfg.encoder_depth * _block(nv, C, r)
    if kind == "pretrain":  # the shared blocks: unified, audio and video streams
        Cd = cfg.decoder_width
        return {"audio_encoder": audio, "video_encoder": video,
                "shared": cfg.fusion_depth * (_block(na + nv, C, r) + _block(na, C, r) + _block(nv, C, r)),
                "decoder": (_linear(na + nv, C, Cd) + cfg.decoder_depth * _block(na_all + nv_all, Cd, r)
                            + _linear(na_all, Cd, cfg.patch ** 2) + _linear(nv_all, Cd, 3 * cfg.patch ** 2))}
    shared_tokens = {"multimodal": na + nv, "audio": na, "video": nv}[mode]
    out = {"audio_encoder": audio if mode != "video" else 0, "video_encoder": video if mode != "audio" else 0,
           "shared": cfg.fusion_depth * _block(shared_tokens, C, r), "head": _linear(1, C, num_classes)}
    return out


def macs(cfg: ModelConfig, kind: str = "pretrain", num_classes: int | None = None,
         mode: str = "multimodal") -> dict[str, int]:
    """Multiply-accumulates per sample, by component (our top-level module names), for the
    pretraining (masked inputs) or fine-tuning (one view, all tokens) forward pass."""
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"kind {kind!r}: expected 'pretrain' or 'finetune'")
    num_classes = num_classes or DEFAULT_CLASSES[cfg.arch]
    if cfg.arch == "hicmae":
        return _hicmae_macs(cfg, kind, num_classes)
    return _cavmae_macs(cfg, kind, num_classes, mode)


# --- the `info` report ---------------------------------------------------------------------------

def _build(cfg: ModelConfig, finetune: bool, num_classes: int, device: str = "meta") -> nn.Module:
    from hicmae_dist.models import build_finetune_model, build_model

    with torch.device(device):
        return build_finetune_model(cfg, num_classes) if finetune else build_model(cfg)


def _g(n: int) -> str:
    return f"{n / 1e9:.2f} G"


def info_report(name: str, finetune: bool = False, num_classes: int | None = None) -> str:
    """The text `hicmae-dist info` prints."""
    cfg = model_config(name)
    num_classes = num_classes or DEFAULT_CLASSES[cfg.arch]
    model = _build(cfg, finetune, num_classes)  # meta device: shapes only, no memory
    counts = parameter_counts(model)
    what = f"fine-tuning, {num_classes} classes" if finetune else "pretraining"
    lines = [f"model: {name} ({type(model).__name__}, {what}; preset {MODELS[name]})",
             f"total parameters: {counts['total']}",
             f"trainable parameters: {counts['trainable']}",
             "parameters by component:"]
    width = max(map(len, counts["components"]))
    lines += [f"  {k:<{width}}  {v:>12,}" for k, v in counts["components"].items()]
    lines.append("multiply-accumulates per sample (linear layers, patch-embedding convolutions, attention matmuls):")
    for kind, label in (("pretrain", "pretraining (masked)"), ("finetune", "fine-tuning (one view)")):
        parts = macs(cfg, kind, num_classes)
        total = sum(parts.values())
        spec = SPEC_FINETUNE_GMACS.get(name) if kind == "finetune" else None
        note = f"   (SPEC.md: about {spec} G)" if spec else ""
        lines.append(f"  {label}: {_g(total)}  = {total}{note}")
        lines += [f"    {k:<{width}}  {_g(v):>10}" for k, v in parts.items() if v]
    return "\n".join(lines)


# --- inputs ----------------------------------------------------------------------------------------

def example_inputs(cfg: ModelConfig, batch: int, device: str | torch.device = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (video, audio) of the shapes the pretraining model takes."""
    g = generator or torch.Generator().manual_seed(0)
    if cfg.arch == "cavmae":
        video_shape = (batch, 3, cfg.image_size, cfg.image_size)
    else:
        video_shape = (batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    video = torch.randn(video_shape, generator=g)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.mel_bins, generator=g)
    return video.to(device), audio.to(device)
