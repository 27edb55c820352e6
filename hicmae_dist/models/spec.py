"""ModelSpec: what the rest of the package needs to know about one model family.

Each family lives in its own sub-package of hicmae_dist.models (hicmae/, cavmae/) whose
spec.py defines `SPEC = ModelSpec(...)`; hicmae_dist.models.get_spec finds it by name (and
imports it on first use), so a third family is one new folder and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hicmae_dist.config import FinetuneConfig, ModelConfig

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the value of model.arch
    pretrain_class: type[nn.Module]  # (cfg: ModelConfig)
    finetune_class: type[nn.Module]  # (cfg: ModelConfig, num_classes: int, **finetune_kwargs(...))
    # the family's side of the upstream converter (hicmae_dist.models.convert): a module with
    # RENAMES, COMPONENTS (key tables), MARKERS, HEAD_KEY, upstream_kind(state),
    # infer_config(state, kind) and upstream_payload(state)
    upstream: ModuleType
    # multiply-accumulates per sample by component: (cfg, kind, num_classes, finetune mode) -> {name: MACs}
    macs: Callable[[ModelConfig, str, int, str], dict[str, int]]
    default_classes: int  # the class count of the family's reference fine-tuning task
    presets_dir: Path
    # constructor kwargs of the fine-tuning model taken from the finetune section
    finetune_kwargs: Callable[[FinetuneConfig], dict[str, Any]]
    # the optimiser groups of a fine-tuning model (freezing what gets no gradient, if anything)
    finetune_param_groups: Callable[[nn.Module, float, FinetuneConfig], list[dict]]
    # whether the contrastive loss runs both directions, as the pretraining model calls it
    symmetric_contrastive: Callable[[ModelConfig], bool]
    # the pretraining model's (video, audio) input shapes for a batch
    input_shapes: Callable[[ModelConfig, int], tuple[tuple[int, ...], tuple[int, ...]]]
    # (tokens, width) per group of blocks kept for the backward, None where not modelled
    activation_token_widths: Callable[[ModelConfig], list[tuple[float, int]]] | None = None
    # the shipped sizes, as `info`, `bench model` and kernels/ name them: {name: preset}
    sizes: dict[str, str] = field(default_factory=dict)
    # the paper's fine-tuning GMACs per view of those sizes, where it gives them (`info` compares)
    paper_finetune_gmacs: dict[str, float] = field(default_factory=dict)
