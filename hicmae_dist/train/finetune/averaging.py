"""Checkpoint weight averaging (the CAV-MAE release's wa / wa_start / wa_end): the weights at the
end of epochs start..end (0-based, inclusive; the release counts from 1) averaged tensor by
tensor, written as one file of the fold and tested beside the last and the selected epoch.

The weights come from the fold's epoch checkpoints (export.checkpoint_weights: ZeRO partitions
gathered); the fold keeps the checkpoints of that range past train.keep_checkpoints
(keeps_for_average).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hicmae_dist.train.export import checkpoint_weights
from hicmae_dist.train.rundir import RunDir

log = logging.getLogger(__name__)


def ends_epoch_in(state: dict, epochs: list[int]) -> int | None:
    """The epoch a checkpoint's state.json closes when it is in [start, end], else None. A
    checkpoint written after epoch e has epoch e + 1 in progress with none of its batches done;
    one written inside an epoch (a stop) closes none."""
    if not epochs or state.get("batch_in_epoch", 0) != 0:
        return None
    closed = state.get("epoch", 0) - 1
    return closed if epochs[0] <= closed <= epochs[1] else None


def keeps_for_average(epochs: list[int]):
    """For save_checkpoint's keep_also: True for the checkpoints the average needs."""
    return lambda ckpt: ends_epoch_in(RunDir.read_state(ckpt), epochs) is not None


def epoch_checkpoints(run: RunDir, epochs: list[int]) -> list[Path]:
    """The checkpoints that close epochs start..end, in epoch order; a missing one is named."""
    found = {}
    for ckpt in run.complete_checkpoints():
        closed = ends_epoch_in(RunDir.read_state(ckpt), epochs)
        if closed is not None:
            found[closed] = ckpt  # the newest wins (a resumed epoch saved again)
    missing = [e for e in range(epochs[0], epochs[1] + 1) if e not in found]
    if missing:
        raise FileNotFoundError(
            f"{run.checkpoints}: no checkpoint closes epoch(s) {missing} (0-based) for "
            f"finetune.weight_average {epochs}; were they removed, or was weight_average set "
            f"after those epochs ran?"
        )
    return [found[e] for e in range(epochs[0], epochs[1] + 1)]


def average_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The arithmetic mean of the checkpoints' fp32 weights, tensor by tensor (summed in float64)."""
    total: dict[str, torch.Tensor] = {}
    for ckpt in checkpoints:
        state = checkpoint_weights(ckpt)
        if total and set(state) != set(total):
            raise ValueError(f"{ckpt}: other tensors than {checkpoints[0]} ({sorted(set(state) ^ set(total))[:5]})")
        for k, v in state.items():
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(checkpoints)).float() for k, v in total.items()}


def write_average(run: RunDir, epochs: list[int]) -> Path:
    """Rank 0: the average of epochs start..end written to run.averaged_weights (then renamed)."""
    checkpoints = epoch_checkpoints(run, epochs)
    averaged = average_weights(checkpoints)
    log.info(
        "weight average of epochs %d-%d (0-based): %s", epochs[0], epochs[1], ", ".join(c.name for c in checkpoints)
    )
    out = run.averaged_weights
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(averaged, tmp)
    os.replace(tmp, out)
    return out
