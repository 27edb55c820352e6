"""The DeepSpeed engine, built from the typed config (never from hand-written JSON)."""

from __future__ import annotations

from typing import Any

import torch

from hicmae_dist.config import Config


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """Every setting that matters is explicit: ZeRO stage, precision, clipping, overflow checks."""
    t = cfg.train
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,  # 0.0 = off (the paper clips nothing)
        "zero_optimization": {"stage": t.zero_stage},
        # bf16: skip a step whose gradients overflow rather than apply inf/nan.
        "bf16": {"enabled": t.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": t.fp16, "loss_scale": 0, "initial_scale_power": 16},  # 0 = dynamic
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW: exact, resumable, no JIT build
        "steps_per_print": 2**31 - 1,  # our own progress bar and MLflow do the reporting
        "wall_clock_breakdown": False,
    }


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


def build_optimizer(model: torch.nn.Module, cfg: Config, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW (HiCMAE) or Adam (CAV-MAE) over `groups` (default: the model's parameter groups,
    no decay on 1-D params, biases, mask tokens); torch's own, so a resume is exact. A group's
    "lr_scale" multiplies the scheduled LR (set_lr)."""
    t = cfg.train
    opt = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return opt(groups or model.param_groups(t.weight_decay), lr=0.0, betas=tuple(t.betas), eps=t.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_model_for_engine(cfg: Config, world_size: int) -> torch.nn.Module:
    """The model, built under zero.Init for ZeRO-3 so each rank only ever holds its partition
    (the model makes its blocks one by one: zero.Init partitions each as it is created)."""
    import deepspeed

    from hicmae_dist.models import build_model

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size), enabled=cfg.train.zero_stage == 3):
        return build_model(cfg.model, cfg.execution)


def build_engine(
    model: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False, groups: list[dict] | None = None
):
    import argparse

    import deepspeed

    # DeepSpeed would select cuda:LOCAL_RANK, wrong when a task sees only its own GPU (Slurm
    # --gpus-per-task=1): use the device comm.init_distributed selected.
    args = argparse.Namespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=model,
        optimizer=build_optimizer(model, cfg, groups),
        config=deepspeed_config(cfg, world_size, load_universal),
    )
    if cfg.execution.compile:
        engine.compile()
    return engine
