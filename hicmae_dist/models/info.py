"""Parameter and compute accounting, and example inputs, for the shipped models (`bench model`,
the timing, lives in hicmae_dist/bench/model.py).

MACs come from hicmae_dist.models.macs (each family's count, by formula). Against the paper's
"about 13.8 / 27.6 / 46.1 G MACs per fine-tune view" for HiCMAE T / S / B, it gives
13.81 / 27.65 / 46.11 G: the same quantity (the video encoder is about 70% of it); the
differences are rounding plus the classifier head (12 k MACs).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from hicmae_dist.config import ModelConfig, load_config
from hicmae_dist.models import build_finetune_model, build_model, get_spec, model_specs
from hicmae_dist.models.macs import macs

# the shipped sizes of every family: {name: preset}, and the paper's fine-tuning GMACs of some
MODELS = {name: preset for spec in model_specs().values() for name, preset in spec.sizes.items()}
SPEC_FINETUNE_GMACS = {name: g for spec in model_specs().values() for name, g in spec.paper_finetune_gmacs.items()}


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
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "components": dict(components),
    }


# --- the `info` report ---------------------------------------------------------------------------


def _build(cfg: ModelConfig, finetune: bool, num_classes: int, device: str = "meta") -> nn.Module:
    with torch.device(device):
        return build_finetune_model(cfg, num_classes) if finetune else build_model(cfg)


def _g(n: int) -> str:
    return f"{n / 1e9:.2f} G"


def info_report(name: str, finetune: bool = False, num_classes: int | None = None) -> str:
    """The text `hicmae-dist info` prints."""
    cfg = model_config(name)
    num_classes = num_classes or get_spec(cfg.arch).default_classes
    model = _build(cfg, finetune, num_classes)  # meta device: shapes only, no memory
    counts = parameter_counts(model)
    what = f"fine-tuning, {num_classes} classes" if finetune else "pretraining"
    lines = [
        f"model: {name} ({type(model).__name__}, {what}; preset {MODELS[name]})",
        f"total parameters: {counts['total']}",
        f"trainable parameters: {counts['trainable']}",
        "parameters by component:",
    ]
    width = max(map(len, counts["components"]))
    lines += [f"  {k:<{width}}  {v:>12,}" for k, v in counts["components"].items()]
    lines.append("multiply-accumulates per sample (linear layers, patch-embedding convolutions, attention matmuls):")
    for kind, label in (("pretrain", "pretraining (masked)"), ("finetune", "fine-tuning (one view)")):
        parts = macs(cfg, kind, num_classes)
        total = sum(parts.values())
        spec = SPEC_FINETUNE_GMACS.get(name) if kind == "finetune" else None
        note = f"   (the paper: about {spec} G)" if spec else ""
        lines.append(f"  {label}: {_g(total)}  = {total}{note}")
        lines += [f"    {k:<{width}}  {_g(v):>10}" for k, v in parts.items() if v]
    return "\n".join(lines)


# --- inputs ----------------------------------------------------------------------------------------


def example_inputs(
    cfg: ModelConfig, batch: int, device: str | torch.device = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (video, audio) of the shapes the pretraining model takes."""
    g = generator or torch.Generator().manual_seed(0)
    video_shape, audio_shape = get_spec(cfg.arch).input_shapes(cfg, batch)
    video = torch.randn(video_shape, generator=g)
    audio = torch.randn(audio_shape, generator=g)
    return video.to(device), audio.to(device)
