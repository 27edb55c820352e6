"""Atomic checkpoints: DeepSpeed's files plus our state.json, made current by a rename.

Layout under <run_dir>/checkpoints/:
    step00000100/          one complete checkpoint (DeepSpeed files + state.json)
    latest                 the tag of the newest complete checkpoint
A save writes into `.tmp-<tag>/`, renames it to `<tag>/` when every rank has written, then
replaces `latest` atomically; a crash at any point leaves the previous checkpoint current.
Every load, DeepSpeed's included, runs with weights_only=True (weights_only_loads).
A checkpoint written at another world size is converted to DeepSpeed's universal format first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from hicmae_dist import comm

STATE_FILE = "state.json"
LATEST = "latest"


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor objects DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's own included, runs with weights_only=True
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides their weights_only=False): no arbitrary unpickling."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = f"step{step:08d}"
    tmp_tag, final = f".tmp-{tag}", root / tag
    if comm.is_rank0() and (root / tmp_tag).exists():  # left by a crash during an earlier save
        shutil.rmtree(root / tmp_tag)
    comm.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    rank, world_size = comm.world()
    torch.save(_rng_state(), root / tmp_tag / _rng_file(rank))  # dropout/drop-path streams, per rank
    comm.barrier()
    if comm.is_rank0():
        _atomic_write(root / tmp_tag / STATE_FILE, json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _atomic_write(root / LATEST, tag)
        complete = sorted(p for p in root.glob("step*") if (p / STATE_FILE).exists())
        for old in complete[:-keep]:
            shutil.rmtree(old)
    comm.barrier()
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


def saved_world_size(path: Path) -> int:
    return json.loads((path / STATE_FILE).read_text()).get("world_size", 1)


def to_universal(path: Path) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (loadable at any world size) under
    checkpoints/universal/<tag>; done once, atomically (temporary name, then rename)."""
    from deepspeed.checkpoint import ds_to_universal

    out = path.parent / "universal" / path.name
    if (out / STATE_FILE).exists():
        return out
    tmp = out.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with weights_only_loads():
        ds_to_universal.main(args)
    shutil.copy(path / STATE_FILE, tmp / STATE_FILE)
    os.replace(tmp, out)
    return out


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Collective. Restores weights and optimizer state into `engine`; returns our state.
    A universal checkpoint (to_universal) needs an engine built with load_universal=True."""
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    state = json.loads((path / STATE_FILE).read_text())
    rank, world_size = comm.world()
    rng = path / _rng_file(rank)
    if rng.exists() and state.get("world_size") == world_size:
        _set_rng_state(torch.load(rng, weights_only=True))  # the same ranks: continue their streams
    return state
