"""Atomic checkpoints: DeepSpeed's files plus our state.json, made current by a rename.

Layout under <run_dir>/checkpoints/:
    step00000100/          one complete checkpoint (DeepSpeed files + state.json)
    latest                 the tag of the newest complete checkpoint
A save writes into `.tmp-<tag>/`, renames it to `<tag>/` when every rank has written, then
replaces `latest` atomically; a crash at any point leaves the previous checkpoint current.
Loads go through torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

STATE_FILE = "state.json"
LATEST = "latest"


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor objects DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, loading with weights_only=True (no arbitrary unpickling)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = f"step{step:08d}"
    tmp_tag, final = f".tmp-{tag}", root / tag
    if _is_rank0() and (root / tmp_tag).exists():  # left by a crash during an earlier save
        shutil.rmtree(root / tmp_tag)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    _barrier()
    if _is_rank0():
        _atomic_write(root / tmp_tag / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _atomic_write(root / LATEST, tag)
        complete = sorted(p for p in root.glob("step*") if (p / STATE_FILE).exists())
        for old in complete[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {STATE_FILE}: "
                                f"the checkpoint directory was modified by hand")
    return path


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Collective. Restores weights and optimizer state into `engine`; returns our state."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    return json.loads((path / STATE_FILE).read_text())
