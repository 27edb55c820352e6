"""What pretraining and fine-tuning share around their loops: stop requests, precision, seeding,
the tracker, and the checks and restore of a resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hicmae_dist import comm
from hicmae_dist.config import Config, ConfigError, ExecutionConfig, TrainConfig
from hicmae_dist.data.loader import find_shards
from hicmae_dist.ops.attention import BACKENDS as ATTENTION
from hicmae_dist.tracking import Tracker, TrackingUnavailable, check_reachable, run_uri
from hicmae_dist.train.checkpoint import ResumeError, load_checkpoint
from hicmae_dist.train.rundir import RunDir

if TYPE_CHECKING:
    from hicmae_dist.data.downstream import DownstreamItem

log = logging.getLogger(__name__)


# --- stop requests (signals, Slurm's warning) ------------------------------------------------------

_stop = threading.Event()
_stop_reason: list[str] = []


def request_stop(reason: str) -> None:
    """Ask the running loop to save a checkpoint at the next step boundary and return.
    Safe to call from a signal handler."""
    _stop_reason.append(reason)
    _stop.set()


def install_stop_signals(signals=(signal.SIGTERM, signal.SIGUSR2)) -> None:
    """SIGTERM / SIGUSR2 (Slurm's warning before a time limit or preemption) -> request_stop."""
    for sig in signals:
        signal.signal(sig, lambda num, frame: request_stop(signal.Signals(num).name))


def stop_requested() -> bool:
    """This process was asked to stop (train_step agrees it with the other ranks)."""
    return _stop.is_set()


def stop_reason() -> str:
    return ",".join(_stop_reason) or "stop requested"


def clear_stop() -> None:
    """Forget a stop request: each training call honours the ones made during it."""
    _stop.clear()
    _stop_reason.clear()


def why_stopped() -> str:
    """The reason a step's agreed stop names: this rank's signal, or another rank's."""
    return stop_reason() if stop_requested() else "stop requested on another rank"


# --- precision and seeding -------------------------------------------------------------------------


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype inputs are cast to on the device (train.bf16 / train.fp16, else float32)."""
    return torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_attention_backend(execution: ExecutionConfig) -> None:
    """An explicit execution.attention_backend that cannot run on this rank's device (triton
    without a GPU of compute capability 8.0+, xformers not installed): a ConfigError at start-up,
    before minutes of engine set-up, not a RuntimeError at the first forward."""
    backend, device = execution.attention_backend, comm.current_device()
    why = None if backend == "auto" else ATTENTION.unavailable(backend, device, None)
    if why is not None:
        raise ConfigError(
            f"execution.attention_backend={backend} cannot run on {device.type}: {why} (auto picks what runs here)"
        )


# --- the tracker -----------------------------------------------------------------------------------


def tracking_uri_of(cfg: Config, run_dir: Path, tracking_uri: str | None) -> str:
    """--tracking-uri, else tracking.uri, else the run dir's own store."""
    return run_uri(tracking_uri, cfg.tracking.uri, run_dir)


def check_tracking(cfg: Config, run_dir: Path, tracking_uri: str | None, rank0: bool) -> None:
    """Before anything slow: a tracking server rank 0 cannot reach is a one-line error, on every
    rank (agreed), so no run is created and no data read."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri_of(cfg, run_dir, tracking_uri)
    err = None
    if rank0:
        try:
            check_reachable(uri)
        except TrackingUnavailable as e:
            err = e
    (bad,) = comm.agree([err is not None], comm.current_device())
    if bad:
        raise err or TrackingUnavailable(f"tracking server {uri} is unreachable from rank 0 (see its log)")


def open_tracker(
    cfg: Config, run_dir: Path, tracking_uri: str | None, rank0: bool, run_id: str | None, journal: Path | None = None
) -> tuple[Tracker, str]:
    """The run's MLflow tracker (rank 0; continues run_id when resuming) and its store URI.
    journal: the metrics file that replays steps MLflow lacks (tracking.py)."""
    uri = tracking_uri_of(cfg, run_dir, tracking_uri)
    tracker = Tracker(
        rank0 and cfg.tracking.enabled,
        uri,
        cfg.tracking.experiment,
        run_dir,
        run_name=cfg.tracking.run_name or Path(run_dir).name,
        run_id=run_id,
        system_metrics_s=cfg.tracking.system_metrics_s,
        journal=journal,
    )
    return tracker, uri


# --- resume: the run's identity, the checks, the restore ---------------------------------------------


@dataclass
class RunState:
    """What a pretraining checkpoint carries besides weights and optimizer state."""

    step: int = 0
    mlflow_run_id: str | None = None
    config_hash: str = ""
    world_size: int = 1
    batches: int = 0  # batches this rank has read: the data position
    bad_samples: int = 0  # unreadable samples the loader skipped and replaced
    nonfinite_skipped: int = 0
    data_id: str = ""  # shard_set_identity: the data set the run trains on
    data_shards: str = ""
    data_num_shards: int = 0


def shard_set_identity(shards_dir: str | Path) -> dict[str, Any]:
    """The data set's identity: a hash of its shard names and sizes (the loader's shard-*.tar),
    independent of where the directory sits; another or a re-prepared shard set changes it."""
    shards = find_shards(shards_dir)
    listing = json.dumps([[p.name, p.stat().st_size] for p in shards])
    return {
        "data_id": hashlib.sha256(listing.encode()).hexdigest()[:16],
        "data_shards": str(shards_dir),
        "data_num_shards": len(shards),
    }


def split_set_identity(splits: Mapping[str, Sequence[DownstreamItem]]) -> dict[str, str]:
    """A fine-tuning fold's data identity: a hash of its split files' rows (split, clip and audio
    paths relative to the clips' common root, labels, in order: the order the sampler draws
    from), so moving the data set keeps it and another fold, an edited label or a reordered file
    changes it. The media files are not read."""
    rows = [
        [name, os.path.abspath(item.frame_dir), os.path.abspath(item.wav_path), list(item.label)]
        for name, items in sorted(splits.items())
        for item in items
    ]
    root = os.path.commonpath([p for row in rows for p in row[1:3]]) if rows else ""
    for row in rows:
        row[1:3] = (os.path.relpath(p, root) for p in row[1:3])
    named = [n for n in ("train", "val", "test") if n in splits] + sorted(set(splits) - {"train", "val", "test"})
    counts = " / ".join(f"{name} {len(splits[name])}" for name in named)
    return {
        "data_id": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16],
        "data_splits": f"{counts} clips under {root}",
    }


def _data_description(state: Mapping[str, Any]) -> tuple[str, str]:
    """(what kind of data set, which one) for the refusal of another data set."""
    if state.get("data_splits"):
        return "the splits", f"{state['data_splits']} (id {state['data_id']})"
    return "the shard set", f"{state.get('data_shards')} ({state.get('data_num_shards')} shards, id {state['data_id']})"


# The fields of a run state that describe this run, not the checkpoint: kept on restore.
_THIS_RUN = ("world_size", "config_hash", "data_id", "data_shards", "data_num_shards", "data_splits")


def refuse_existing(run_dir: Path, resume: str) -> None:
    """resume "never" in a run dir that holds a checkpoint: ResumeError."""
    problem = RunDir(run_dir).refuse_existing(resume)
    if problem:
        raise ResumeError(problem)


def check_resume(ckpt: Path, state, run_dir: Path, allow_config_change: bool) -> dict[str, Any]:
    """Collective, before any weight is loaded: compare `ckpt`'s state.json with this run's config
    hash and data identity (when `state` and the checkpoint carry one) and refuse a change with
    ResumeError unless allow_config_change. Returns the saved state."""
    saved = RunDir.read_state(ckpt)
    config_problem = RunDir(run_dir).config_change(ckpt, saved, state.config_hash)
    data_known = bool(getattr(state, "data_id", "")) and "data_id" in saved
    data_changed = data_known and saved["data_id"] != state.data_id
    # the same inputs on every rank; agreed anyway, so that no rank loads while another refuses
    config_changed, data_changed = comm.agree([config_problem is not None, data_changed])
    problems = []
    if config_changed:
        problems.append(config_problem)
    if data_changed:
        problems.append(
            "checkpoint {} was written on {} {}, this run reads {}: another data set".format(
                ckpt, *_data_description(saved), _data_description(vars(state))[1]
            )
        )
    if problems and not allow_config_change:
        raise ResumeError("; ".join(problems) + "; --allow-config-change resumes anyway")
    for problem in problems:
        log.warning("%s; resuming anyway (--allow-config-change)", problem)
    if getattr(state, "data_id", "") and "data_id" not in saved:
        log.warning(
            "checkpoint %s records no data identity (written before it was recorded): the data set is "
            "not checked on this resume",
            ckpt,
        )
    return saved


def restore(engine, ckpt: Path, state, run_dir: Path, allow_config_change: bool, saved: dict[str, Any] | None = None):
    """Check `ckpt` against this run (check_resume, unless its result is passed as `saved`: a
    changed config or data set is refused before any weight is loaded), load it into the engine
    (collective) and return its saved state as type(state), with this run's world size, config
    hash and data identity."""
    if saved is None:
        saved = check_resume(ckpt, state, run_dir, allow_config_change)
    load_checkpoint(engine, ckpt)
    known = {f.name for f in dataclasses.fields(state)}
    return type(state)(
        **{**{k: v for k, v in saved.items() if k in known}, **{k: getattr(state, k) for k in _THIS_RUN if k in known}}
    )
