"""Models: one sub-package per family (hicmae/, cavmae/: config, model classes, upstream key
table, MACs count, presets) described by a ModelSpec, plus the shared pieces: blocks,
reconstruction targets, the upstream checkpoint converter (convert), compute counts (macs) and
the `info` report.

    spec = get_spec(cfg.model.arch)                  # the family of model.arch
    model = build_model(cfg.model, cfg.execution)   # its pretraining model
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING

from hicmae_dist.config import ExecutionConfig, ModelConfig
from hicmae_dist.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch.nn as nn


@functools.cache
def model_specs() -> dict[str, ModelSpec]:
    """{name: spec} of every sub-package of hicmae_dist.models with a spec module defining SPEC.
    The spec modules are imported here, on first use: they pull in torch and the model classes,
    which `load_config` (it imports only a family's config module) does not need."""
    specs = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg and importlib.util.find_spec(f"{__name__}.{info.name}.spec") is not None:
            spec = getattr(importlib.import_module(f"{__name__}.{info.name}.spec"), "SPEC", None)
            if isinstance(spec, ModelSpec):
                specs[spec.name] = spec
    return dict(sorted(specs.items()))


def get_spec(arch: str) -> ModelSpec:
    specs = model_specs()
    if arch not in specs:
        raise ValueError(f"model.arch {arch!r}: expected one of {', '.join(specs)}")
    return specs[arch]


def build_model(cfg: ModelConfig, execution: ExecutionConfig | None = None) -> nn.Module:
    """The pretraining model named by cfg.arch; execution None = the execution defaults."""
    return get_spec(cfg.arch).pretrain_class(cfg, execution)


def build_finetune_model(
    cfg: ModelConfig, num_classes: int, execution: ExecutionConfig | None = None, **kwargs
) -> nn.Module:
    """The fine-tuning model named by cfg.arch; kwargs go to its constructor (see the spec's
    finetune_kwargs)."""
    return get_spec(cfg.arch).finetune_class(cfg, num_classes, execution=execution, **kwargs)


__all__ = ["ModelSpec", "build_finetune_model", "build_model", "get_spec", "model_specs"]
