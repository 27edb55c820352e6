"""The pretraining loop: a DeepSpeed engine over the shard loader, with atomic checkpoints,
`--resume auto`, MLflow tracking from rank 0 and a closing summary."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hicmae_dist import comm
from hicmae_dist.config import Config
from hicmae_dist.data.loader import find_shards, make_pretrain_loader
from hicmae_dist.tracking import Tracker, TrackingUnavailable, check_reachable, default_uri, end_status
from hicmae_dist.train.accounting import model_flops_per_sample, peak_flops
from hicmae_dist.train.checkpoint import (DiskFullError, ResumeError, disk_full_error, disk_full_errno,
                                          latest_checkpoint, latest_tag, load_checkpoint, read_state,
                                          resume_checkpoint, save_checkpoint, saved_world_size, to_universal)
from hicmae_dist.train.engine import build_engine, build_model_for_engine, deepspeed_config, global_batch, set_lr
from hicmae_dist.train.progress import Progress
from hicmae_dist.train.schedule import lr_at
from hicmae_dist.train.step import train_step

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


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


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer state."""

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
    return {"data_id": hashlib.sha256(listing.encode()).hexdigest()[:16], "data_shards": str(shards_dir),
            "data_num_shards": len(shards)}


# The fields of a run state that describe this run, not the checkpoint: kept on restore.
_THIS_RUN = ("world_size", "config_hash", "data_id", "data_shards", "data_num_shards")


def check_resume(ckpt: Path, state, run_dir: Path, allow_config_change: bool) -> dict[str, Any]:
    """Collective, before any weight is loaded: compare `ckpt`'s state.json with this run's config
    hash and data identity (when `state` and the checkpoint carry one) and refuse a change with
    ResumeError unless allow_config_change. Returns the saved state."""
    saved = read_state(ckpt)
    config_changed = saved.get("config_hash") != state.config_hash
    data_known = bool(getattr(state, "data_id", "")) and "data_id" in saved
    data_changed = data_known and saved["data_id"] != state.data_id
    # the same inputs on every rank; agreed anyway, so that no rank loads while another refuses
    config_changed, data_changed = comm.agree([config_changed, data_changed])
    problems = []
    if config_changed:
        problems.append(f"checkpoint {ckpt} was written with config hash {saved.get('config_hash')}, this run has "
                        f"{state.config_hash}: the model, data or optimiser settings changed "
                        f"(compare {run_dir / 'config.yaml'})")
    if data_changed:
        problems.append(f"checkpoint {ckpt} was written on the shard set {saved.get('data_shards')} "
                        f"({saved.get('data_num_shards')} shards, id {saved['data_id']}), this run reads "
                        f"{state.data_shards} ({state.data_num_shards} shards, id {state.data_id}): another data set")
    if problems and not allow_config_change:
        raise ResumeError("; ".join(problems) + "; --allow-config-change resumes anyway")
    for problem in problems:
        log.warning("%s; resuming anyway (--allow-config-change)", problem)
    if getattr(state, "data_id", "") and "data_id" not in saved:
        log.warning("checkpoint %s records no data identity (written before it was recorded): the data set is "
                    "not checked on this resume", ckpt)
    return saved


def restore(engine, ckpt: Path, state, run_dir: Path, allow_config_change: bool,
            saved: dict[str, Any] | None = None):
    """Check `ckpt` against this run (check_resume, unless its result is passed as `saved`: a
    changed config or data set is refused before any weight is loaded), load it into the engine
    (collective) and return its saved state as type(state), with this run's world size, config
    hash and data identity."""
    if saved is None:
        saved = check_resume(ckpt, state, run_dir, allow_config_change)
    load_checkpoint(engine, ckpt)
    known = {f.name for f in dataclasses.fields(state)}
    return type(state)(**{**{k: v for k, v in saved.items() if k in known},
                          **{k: getattr(state, k) for k in _THIS_RUN if k in known}})


def check_tracking(cfg: Config, run_dir: Path, tracking_uri: str | None, rank0: bool) -> None:
    """Before anything slow: a tracking server rank 0 cannot reach is a one-line error, on every
    rank (agreed), so no run is created and no data read."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri or cfg.tracking.uri or default_uri(run_dir)
    err = None
    if rank0:
        try:
            check_reachable(uri)
        except TrackingUnavailable as e:
            err = e
    (bad,) = comm.agree([err is not None], comm.current_device())
    if bad:
        raise err or TrackingUnavailable(f"tracking server {uri} is unreachable from rank 0 (see its log)")


def open_tracker(cfg: Config, run_dir: Path, tracking_uri: str | None, rank0: bool,
                 run_id: str | None, journal: Path | None = None) -> tuple[Tracker, str]:
    """The run's MLflow tracker (rank 0; continues run_id when resuming) and its store URI.
    journal: the metrics file that replays steps MLflow lacks (tracking.py)."""
    uri = tracking_uri or cfg.tracking.uri or default_uri(run_dir)
    tracker = Tracker(rank0 and cfg.tracking.enabled, uri, cfg.tracking.experiment, run_dir,
                      run_name=cfg.tracking.run_name or run_dir.name, run_id=run_id,
                      system_metrics_s=cfg.tracking.system_metrics_s, journal=journal)
    return tracker, uri


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _read_metrics(run_dir: Path, upto_step: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows up to `upto_step` (a resume drops the rows of the lost steps)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in ((axes[0], ["loss"], "total"),
                            (axes[1], ["loss_video", "loss_audio"], "reconstruction"),
                            (axes[2], ["loss_contrastive"], "contrastive (sum over layers)")):
        for k in keys:
            ax.plot(steps, [r[k] for r in rows], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pretrain(cfg: Config, run_dir: Path, *, resume: str = "auto", tracking_uri: str | None = None,
             progress: bool = True, allow_config_change: bool = False) -> dict[str, Any]:
    """Pretrain `cfg.model` on the shards in `cfg.data.shards`; returns the summary dict.

    resume: "auto" continues from the newest complete checkpoint under run_dir (if any);
    "never" refuses to start in a run dir that already has one.
    """
    dist_env = comm.init_distributed()
    rank0 = dist_env.rank == 0
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: pass --data DIR (a directory of .tar shards)")
    check_tracking(cfg, run_dir, tracking_uri, rank0)

    if resume == "never" and latest_tag(run_dir) is not None:
        raise ResumeError(f"{run_dir} already holds checkpoint {latest_tag(run_dir)}; use --resume auto or a new "
                          f"--run-dir")
    ckpt = resume_checkpoint(run_dir)  # verified; removes what interrupted saves left
    state = RunState(config_hash=cfg.hash(), world_size=dist_env.world_size, **shard_set_identity(cfg.data.shards))
    # before any conversion or load: a changed config or data set is refused first
    saved = check_resume(ckpt, state, run_dir, allow_config_change) if ckpt is not None else None
    universal = ckpt is not None and saved_world_size(ckpt) != dist_env.world_size
    if universal:  # written by another number of ranks: convert once (rank 0), load anywhere
        if rank0:
            log.info("checkpoint %s was written by %d ranks, this job has %d: converting to universal",
                     ckpt, saved_world_size(ckpt), dist_env.world_size)
            to_universal(ckpt)
        comm.barrier()
        ckpt = to_universal(ckpt)

    seed_everything(cfg.train.seed)
    engine = build_engine(build_model_for_engine(cfg, dist_env.world_size), cfg, dist_env.world_size,
                          load_universal=universal)
    batch = global_batch(cfg, dist_env.world_size)

    if ckpt is not None:
        state = restore(engine, ckpt, state, run_dir, allow_config_change, saved=saved)
        log.info("resumed from %s at step %d", ckpt, state.step)
    start_step = state.step

    if rank0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "deepspeed.json").write_text(json.dumps(deepspeed_config(cfg, dist_env.world_size), indent=1))
    rows = _read_metrics(run_dir, start_step) if rank0 else []
    if rank0:  # rewrite without the rows of steps lost since the checkpoint
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # The stream is a function of (seed, rank, world size): a resumed job skips the batches it
    # already trained on, undecoded, and continues the same stream.
    loader = iter(make_pretrain_loader(cfg.data.shards, cfg.data, cfg.model, rank=dist_env.rank,
                                       world_size=dist_env.world_size, seed=cfg.train.seed,
                                       start_batch=state.batches))
    device = engine.device
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32
    flops_per_sample = model_flops_per_sample(cfg)
    tokens_per_clip = sum(m.shape[1] for m in engine.module.make_masks(1))  # input tokens, both modalities
    peak, peak_source = peak_flops(torch.device(device), cfg.train.bf16)
    log.info("MFU against %s", peak_source)

    def next_batch():
        b = next(loader)
        state.batches += 1
        state.bad_samples += int(b["bad_samples"])
        return b

    def forward(b):  # pinned host batches, copied while the device works; cast on the device
        # the masks stay on the host: the model reads their counts there (masking.split_indices_to)
        return engine(*(b[k].to(device, non_blocking=True).to(dtype) for k in ("video", "audio")),
                      b["video_mask"], b["audio_mask"])

    nonfinite_in_a_row = 0
    # The log window accumulates on the device; the host reads it once per window (float64:
    # the same sums, to the bit, as the host-side floats they replace).
    window_sum, window_lr, window_steps, names = None, 0.0, 0, None
    window_start = time.perf_counter()
    session_start = None  # timed from the end of the first step (excludes start-up)
    steps_timed = 0
    reporter = Progress(cfg.train.steps, start_step, "pretrain", enabled=rank0, bar=progress)
    metrics_file = open(run_dir / METRICS_FILE, "a") if rank0 else None
    # The MLflow run is created (or reopened) last, so an error above leaves none RUNNING; from
    # here on every way out ends it (FAILED, KILLED for Ctrl-C or a stop signal, FINISHED).
    tracker, uri = open_tracker(cfg, run_dir, tracking_uri, rank0, state.mlflow_run_id,
                                journal=run_dir / METRICS_FILE)
    state.mlflow_run_id = tracker.run_id
    if rank0 and start_step == 0:
        tracker.log_params(cfg.flat())
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "deepspeed.json")
    interrupted = None
    # A stop requested before the loop (a signal during start-up) is honoured after the first
    # step; the request is cleared when this call ends (the finally below).
    try:
        while state.step < cfg.train.steps:  # a skipped step is tried again on the next batch
            step = state.step
            lr = lr_at(step, cfg.train, batch)
            set_lr(engine.optimizer, lr)
            result = train_step(engine, cfg.train.grad_accum, next_batch, forward, stop_requested(),
                                check_gradients=not cfg.train.fp16)
            if result.nonfinite:
                # Refused on every rank: nothing of this step's micro-batches reaches the weights.
                state.nonfinite_skipped += 1
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient on some rank, step skipped on all (%d in a row)",
                            step, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise FloatingPointError(f"{nonfinite_in_a_row} non-finite losses in a row at step {step}; "
                                             f"stopping (last good checkpoint: {latest_checkpoint(run_dir)})")
            else:
                nonfinite_in_a_row = 0
                names = result.names
                values = torch.cat([result.parts, result.grad_norm.reshape(1)])
                window_sum = values if window_sum is None else window_sum + values
                window_lr += lr
                window_steps += 1
                state.step = step + 1
                reporter.update(1)
                if session_start is None:
                    session_start = time.perf_counter()
                else:
                    steps_timed += 1

            if window_steps and (state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps):
                means = (window_sum / window_steps).tolist()  # the window's one host read (a sync)
                elapsed = time.perf_counter() - window_start
                row = dict(zip(names, means[:-1]))
                row.update(lr=window_lr / window_steps, grad_norm=means[-1])
                clips_per_s = window_steps * batch / elapsed
                row.update(step=state.step, clips_per_s=clips_per_s, step_time_s=elapsed / window_steps,
                           bad_samples=state.bad_samples,
                           tokens_per_s=clips_per_s * tokens_per_clip,
                           tflops_per_s=clips_per_s * flops_per_sample / 1e12)
                if peak:
                    row["mfu"] = clips_per_s * flops_per_sample / (peak * dist_env.world_size)
                window_sum, window_lr, window_steps, window_start = None, 0.0, 0, time.perf_counter()
                if rank0:
                    rows.append(row)
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    tracker.log_metrics(state.step, {k: v for k, v in row.items() if k != "step"})
                    tracker.flush()
                    reporter.window(state.step, {"loss": row["loss"], "clips/s": clips_per_s},
                                    row["step_time_s"])
            if result.stop or (not result.nonfinite and (state.step % cfg.train.checkpoint_every == 0
                                                         or state.step == cfg.train.steps)):
                save_checkpoint(engine, run_dir, state.step, vars(state), cfg.train.keep_checkpoints)
            if result.stop:
                interrupted = stop_reason() if stop_requested() else "stop requested on another rank"
                log.warning("stopping at step %d (%s); checkpoint saved", state.step, interrupted)
                break
    except BaseException as err:  # the failing job's run ends FAILED (KILLED for Ctrl-C); a resume reopens it
        tracker.finish(end_status(err))
        code = disk_full_errno(err) if isinstance(err, OSError) and not isinstance(err, DiskFullError) else None
        if code is not None:  # metrics.jsonl and the like on a full disk: one line too (DiskFullError)
            raise disk_full_error(code, err.filename or run_dir, run_dir) from err
        raise
    finally:
        clear_stop()
        reporter.close()
        if metrics_file:
            metrics_file.close()

    session_s = time.perf_counter() - session_start if session_start else 0.0
    summary = {
        "steps": state.step,
        "start_step": start_step,
        "loss_first": rows[0]["loss"] if rows else None,
        "loss_last": rows[-1]["loss"] if rows else None,
        "clips_per_s": steps_timed * batch / session_s if session_s > 0 else None,
        "world_size": dist_env.world_size,
        "global_batch": batch,
        "nonfinite_skipped": state.nonfinite_skipped,
        "bad_samples": state.bad_samples,
        "interrupted": interrupted,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "run_dir": str(run_dir.resolve()),
        "tracking_uri": uri,
        "mlflow_run_id": tracker.run_id,
    }
    if rank0:
        try:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            tracker.log_artifact(run_dir / "summary.json")
            if rows:
                tracker.log_artifact(plot_losses(rows, run_dir / "losses.png"))
        except BaseException as err:
            tracker.finish(end_status(err))
            raise
        # A stopped run is KILLED in MLflow until a resume (a requeued job) sets it RUNNING again.
        tracker.finish("KILLED" if interrupted else "FINISHED")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def num(x, fmt):
        return format(x, fmt) if x is not None else "n/a"

    lines = [
        f"steps            {s['steps']} (this session from {s['start_step']}, "
        f"{s['world_size']} rank(s), global batch {s['global_batch']})",
        f"loss first/last  {num(s['loss_first'], '.4f')} -> {num(s['loss_last'], '.4f')}",
        f"throughput       {num(s['clips_per_s'], '.1f')} clips/s",
        *([f"interrupted      {s['interrupted']} (resume with --resume auto)"] if s["interrupted"] else []),
        f"checkpoint       {s['checkpoint']}",
        f"mlflow store     {s['tracking_uri']} (run {s['mlflow_run_id']})",
    ]
    if s["tracking_uri"].startswith("sqlite:"):
        lines.append(f"open it with     mlflow ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1")
    return "\n".join(lines)
