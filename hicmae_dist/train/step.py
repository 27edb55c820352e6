"""One optimizer step over `grad_accum` micro-batches, decided the same way on every rank.

Every micro-batch runs forward and backward with DeepSpeed's accumulation boundary set
explicitly (the last micro-batch is the boundary), so the engine's micro-step counter can never
drift from this loop. Every micro-batch runs backward whatever its loss: a rank that left out a
backward would leave the others waiting in ZeRO's gradient reduce-scatter. After the last
backward one `comm.agree` decides for all ranks whether the update is applied (no non-finite
loss on any rank in any micro-batch) and whether to stop. A refused update goes through
DeepSpeed's step with the wrapped torch optimizer's update switched off: the boundary
bookkeeping (finalised reductions, gradient buffers and partitions cleared) runs as on any
step, no weight or optimizer moment changes, and the next step starts on a fresh boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hicmae_dist import comm
from hicmae_dist.config import TrainConfig
from hicmae_dist.train.engine import set_lr
from hicmae_dist.train.schedule import lr_at


@dataclass
class StepResult:
    applied: bool  # the optimizer update happened, on every rank
    nonfinite: bool  # a non-finite loss on some rank (update refused) or gradient (DeepSpeed skipped it)
    stop: bool  # some rank asked to stop
    parts: torch.Tensor | None  # (P,) float64 on the device: loss parts, mean over micro-batches
    grad_norm: torch.Tensor | None  # () float64 on the device (NaN when DeepSpeed computes none)
    names: tuple[str, ...] = ()  # of the parts: forward's keys


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed wraps (ZeRO and its bf16 optimizer keep it as .optimizer)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


@contextlib.contextmanager
def _update_switched_off(engine):
    inner = _inner_optimizer(engine)
    inner.step = lambda *args, **kwargs: None  # the instance attribute shadows the method
    try:
        yield
    finally:
        del inner.step


def _grad_norm(engine, device) -> torch.Tensor:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return torch.tensor(float("nan"), dtype=torch.float64, device=device)
    if torch.is_tensor(norm):
        return norm.detach().to(device, torch.float64).reshape(())
    return torch.tensor(float(norm), dtype=torch.float64, device=device)


def train_step(
    engine,
    grad_accum: int,
    next_batch: Callable[[], Any],
    forward: Callable[[Any], dict[str, torch.Tensor]],
    stop_requested: bool,
    check_gradients: bool = True,
) -> StepResult:
    """Forward and backward `grad_accum` micro-batches from next_batch(), then the agreed update.

    forward(batch) returns scalar tensors, "loss" among them (the one that is backpropagated);
    `parts` holds them all in forward's order, each the mean over the micro-batches.
    check_gradients: an update DeepSpeed skipped for a non-finite gradient norm counts as
    non-finite (off under fp16, where such skips are the loss scaler's calibration)."""
    device = engine.device
    bad = torch.zeros((), dtype=torch.bool, device=device)
    parts, names = None, ()
    for i in range(grad_accum):
        engine.set_gradient_accumulation_boundary(i == grad_accum - 1)
        out = forward(next_batch())
        loss = out["loss"]
        bad |= ~torch.isfinite(loss.detach())
        engine.backward(loss)
        values = torch.stack([v.detach().reshape(()).double() for v in out.values()]) / grad_accum
        parts = values if parts is None else parts + values
        names = tuple(out)
    nonfinite, stop = comm.agree([bad, stop_requested], device)  # the step's one host read
    if nonfinite:
        with _update_switched_off(engine):
            engine.step()
        return StepResult(False, True, stop, None, None, names)
    engine.step()
    applied = engine.was_step_applied()  # DeepSpeed's own skip: from all-reduced norms, so agreed
    return StepResult(applied, check_gradients and not applied, stop, parts, _grad_norm(engine, device), names)


def scheduled_step(
    engine,
    train: TrainConfig,
    step: int,
    batch: int,
    next_batch: Callable[[], Any],
    forward: Callable[[Any], dict[str, torch.Tensor]],
    stop: bool,
) -> tuple[StepResult, float]:
    """train_step at the schedule's learning rate for `step` (global batch `batch`); returns the
    result and that learning rate. Pretraining and fine-tuning both step through here."""
    lr = lr_at(step, train, batch)
    set_lr(engine.optimizer, lr)
    return train_step(engine, train.grad_accum, next_batch, forward, stop, check_gradients=not train.fp16), lr
