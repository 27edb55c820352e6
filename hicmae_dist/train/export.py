"""Consolidated fp32 weights of a run's checkpoint, for fine-tuning: our format or the authors'."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hicmae_dist.config import config_from_dict
from hicmae_dist.models.convert import Converted, ours_file_payload, to_upstream, upstream_file_payload
from hicmae_dist.train.checkpoint import weights_only_loads
from hicmae_dist.train.rundir import RunDir

log = logging.getLogger(__name__)


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights in one of our checkpoint directories, fp32: with ZeRO (stages
    1-3: zero_pp_rank_* files) the fp32 master weights gathered from every partition; without
    (stage 0) the module's own state (the master weights in fp32 training, the weights the
    model runs with in bf16 / fp16 training)."""
    if any(ckpt.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        model_states = ckpt / "mp_rank_00_model_states.pt"
        if not model_states.exists():
            raise FileNotFoundError(f"{ckpt}: neither ZeRO partitions nor {model_states.name}: not a checkpoint")
        with weights_only_loads():
            state = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
        log.info(
            "%s: no ZeRO partitions (stage 0); the module's %s weights",
            ckpt,
            next(iter(state.values())).dtype if state else "(empty)",
        )
    return {k: v.float() for k, v in state.items()}


def run_weights(run_dir: Path, checkpoint: Path | None = None) -> Converted:
    """The weights of a pretraining run's `checkpoint` (default: its latest), gathered from every
    ZeRO partition (checkpoint_weights), with the run's model config."""
    import yaml

    run = RunDir(run_dir)
    ckpt = checkpoint or run.latest_checkpoint()
    if ckpt is None:
        missing = run.latest_pointer.relative_to(run.path)
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export ({missing} is missing)")
    cfg = config_from_dict(yaml.safe_load(run.config.read_text()))
    return Converted(cfg.model.arch, "pretrain", cfg.model, None, checkpoint_weights(ckpt))


def load_pretrained(source: str | Path) -> Converted:
    """Weights to start from: a pretraining run directory (its latest checkpoint), our weights
    file, or the authors' checkpoint (converted)."""
    from hicmae_dist.models.convert import load_weights

    source = Path(source)
    if source.is_dir():
        return run_weights(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such checkpoint file or run directory")
    return load_weights(source)


def export_weights(run_dir: Path, out: Path, *, to: str = "ours", checkpoint: Path | None = None) -> Converted:
    """run_weights written to `out` (weights_only-loadable; written then renamed)."""
    ours = run_weights(run_dir, checkpoint)
    if to == "ours":
        converted, payload = ours, ours_file_payload(ours)
    elif to == "upstream":
        converted = to_upstream(ours_file_payload(ours))
        payload = upstream_file_payload(converted)
    else:
        raise ValueError(f"to {to!r}: expected 'ours' or 'upstream'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return converted
