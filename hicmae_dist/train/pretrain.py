"""The pretraining loop: a DeepSpeed engine over the shard loader, with atomic checkpoints,
`--resume auto`, MLflow tracking from rank 0 and a closing summary.

pretrain() is the loop; around it: _start (resume checks, universal conversion, the engine),
MetricsWindow (the log window's device-side sums), MetricsLog (metrics.jsonl, the tracker, the
progress line), the checkpoint policy (_checkpoint_due) and _finish (summary.json, losses.png).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hicmae_dist import comm
from hicmae_dist.config import Config, TrainConfig
from hicmae_dist.data.device import check_decode_on, to_device
from hicmae_dist.data.loader import make_pretrain_loader
from hicmae_dist.tracking import Tracker, end_status
from hicmae_dist.train.accounting import model_flops_per_sample, peak_flops
from hicmae_dist.train.checkpoint import (
    DiskFullError,
    disk_full_errno,
    disk_full_error,
    resume_checkpoint,
    save_checkpoint,
    saved_world_size,
    to_universal,
    universal_path,
)
from hicmae_dist.train.engine import build_engine, build_model_for_engine, deepspeed_config, global_batch
from hicmae_dist.train.progress import Progress
from hicmae_dist.train.rundir import RunDir
from hicmae_dist.train.runtime import (
    RunState,
    check_attention_backend,
    check_resume,
    check_tracking,
    clear_stop,
    compute_dtype,
    open_tracker,
    refuse_existing,
    restore,
    seed_everything,
    shard_set_identity,
    stop_requested,
    why_stopped,
)
from hicmae_dist.train.step import StepResult, scheduled_step

log = logging.getLogger(__name__)


def _start(cfg: Config, run: RunDir, resume: str, allow_config_change: bool, world_size: int, rank0: bool):
    """(engine, state): a fresh run, or the newest checkpoint that verifies, checked against this
    config and data set before any conversion or load, and restored."""
    refuse_existing(run.path, resume)
    ckpt = resume_checkpoint(run.path)  # verified; removes what interrupted saves left
    state = RunState(config_hash=cfg.hash(), world_size=world_size, **shard_set_identity(cfg.data.shards))
    # before any conversion or load: a changed config or data set is refused first
    saved = check_resume(ckpt, state, run.path, allow_config_change) if ckpt is not None else None
    universal = ckpt is not None and saved_world_size(ckpt) != world_size
    if universal:  # written by another number of ranks: convert once (rank 0), load anywhere
        if rank0:
            log.info(
                "checkpoint %s was written by %d ranks, this job has %d: converting to universal",
                ckpt,
                saved_world_size(ckpt),
                world_size,
            )
            to_universal(ckpt)
        comm.barrier()
        ckpt = universal_path(ckpt)

    seed_everything(cfg.train.seed)
    engine = build_engine(build_model_for_engine(cfg, world_size), cfg, world_size, load_universal=universal)
    if ckpt is not None:
        state = restore(engine, ckpt, state, run.path, allow_config_change, saved=saved)
        log.info("resumed from %s at step %d", ckpt, state.step)
    return engine, state


def _write_run_files(cfg: Config, run: RunDir, world_size: int, start_step: int) -> list[dict[str, Any]]:
    """Rank 0: config.yaml, deepspeed.json, and metrics.jsonl without the rows of steps lost
    since the checkpoint; returns the rows kept."""
    run.config.write_text(cfg.to_yaml())
    run.deepspeed_config.write_text(json.dumps(deepspeed_config(cfg, world_size), indent=1))
    rows = run.metrics_rows(start_step)
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _batch_source(cfg: Config, engine, state: RunState, rank: int, world_size: int):
    """(next_batch, forward) for train_step. The stream is a function of (seed, rank, world
    size): a resumed job skips the batches it already trained on, undecoded, and continues it."""
    loader = iter(
        make_pretrain_loader(
            cfg.data.shards,
            cfg.data,
            cfg.model,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            start_batch=state.batches,
        )
    )
    device, dtype = engine.device, compute_dtype(cfg.train)

    def next_batch():
        b = next(loader)
        state.batches += 1
        state.bad_samples += int(b["bad_samples"])
        return b

    def forward(b):  # pinned host batches, copied while the device works; normalised and cast there
        # the masks stay on the host: the model reads their counts there (masking.split_indices_to)
        x = to_device(b, device, dtype)
        return engine(x["video"], x["audio"], b["video_mask"], b["audio_mask"])

    return next_batch, forward


@dataclass
class Rates:
    """Turns a window's step count and time into throughput: clips, tokens, FLOPs, MFU."""

    batch: int  # global batch
    world_size: int
    tokens_per_clip: int  # input tokens, both modalities
    flops_per_sample: float
    peak: float | None  # per device; None: no MFU

    @classmethod
    def measure(cls, cfg: Config, engine, batch: int, world_size: int) -> Rates:
        flops_per_sample = model_flops_per_sample(cfg)
        tokens_per_clip = sum(m.shape[1] for m in engine.module.make_masks(1))
        peak, peak_source = peak_flops(torch.device(engine.device), cfg.train.bf16)
        log.info("MFU against %s", peak_source)
        return cls(batch, world_size, tokens_per_clip, flops_per_sample, peak)

    def row(self, steps: int, elapsed: float, bad_samples: int, step: int) -> dict[str, Any]:
        clips_per_s = steps * self.batch / elapsed
        row = dict(
            step=step,
            clips_per_s=clips_per_s,
            step_time_s=elapsed / steps,
            bad_samples=bad_samples,
            tokens_per_s=clips_per_s * self.tokens_per_clip,
            tflops_per_s=clips_per_s * self.flops_per_sample / 1e12,
        )
        if self.peak:
            row["mfu"] = clips_per_s * self.flops_per_sample / (self.peak * self.world_size)
        return row


@dataclass
class MetricsWindow:
    """The log window's loss parts and grad norm, summed on the device; the host reads them once
    per window (float64: the same sums, to the bit, as the host-side floats they replace)."""

    sums: torch.Tensor | None = None  # (P + 1,) float64: the parts, then the grad norm
    lr: float = 0.0
    steps: int = 0
    names: tuple[str, ...] = ()
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult, lr: float) -> None:
        self.names = result.names
        values = torch.cat([result.parts, result.grad_norm.reshape(1)])
        self.sums = values if self.sums is None else self.sums + values
        self.lr += lr
        self.steps += 1

    def close(self, rates: Rates, state: RunState) -> dict[str, Any]:
        """The window's metrics row; starts the next window."""
        means = (self.sums / self.steps).tolist()  # the window's one host read (a sync)
        elapsed = time.perf_counter() - self.start
        row = dict(zip(self.names, means[:-1]))
        row.update(lr=self.lr / self.steps, grad_norm=means[-1])
        row.update(rates.row(self.steps, elapsed, state.bad_samples, state.step))
        self.sums, self.lr, self.steps, self.start = None, 0.0, 0, time.perf_counter()
        return row


class MetricsLog:
    """Rank 0's record of each window: a metrics.jsonl row (the source of truth), the tracker,
    the progress line. Other ranks keep nothing."""

    def __init__(self, run: RunDir, rows: list[dict[str, Any]], tracker: Tracker, reporter: Progress, rank0: bool):
        self.rows, self.tracker, self.reporter = rows, tracker, reporter
        self.file = open(run.metrics, "a") if rank0 else None

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.tracker.log_metrics(row["step"], {k: v for k, v in row.items() if k != "step"})
        self.tracker.flush()
        self.reporter.window(row["step"], {"loss": row["loss"], "clips/s": row["clips_per_s"]}, row["step_time_s"])

    def close(self) -> None:
        if self.file:
            self.file.close()


class NonfiniteGuard:
    """Counts refused steps; too many in a row stop the run (the last checkpoint stays good)."""

    def __init__(self, limit: int, run: RunDir):
        self.limit, self.run, self.in_a_row = limit, run, 0

    def applied(self) -> None:
        self.in_a_row = 0

    def refused(self, state: RunState) -> None:
        state.nonfinite_skipped += 1
        self.in_a_row += 1
        log.warning(
            "step %d: non-finite loss or gradient on some rank, step skipped on all (%d in a row)",
            state.step,
            self.in_a_row,
        )
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row at step {state.step}; "
                f"stopping (last good checkpoint: {self.run.latest_checkpoint()})"
            )


def _checkpoint_due(result: StepResult, step: int, train: TrainConfig) -> bool:
    """On a stop, every checkpoint_every steps, after the last step (an applied step)."""
    return result.stop or (not result.nonfinite and (step % train.checkpoint_every == 0 or step == train.steps))


def _raise_if_disk_full(err: BaseException, run: RunDir) -> None:
    """metrics.jsonl and the like on a full disk: one line too (DiskFullError)."""
    code = disk_full_errno(err) if isinstance(err, OSError) and not isinstance(err, DiskFullError) else None
    if code is not None:
        raise disk_full_error(code, err.filename or run.path, run.path) from err


def pretrain(
    cfg: Config,
    run_dir: Path,
    *,
    resume: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Pretrain `cfg.model` on the shards in `cfg.data.shards`; returns the summary dict.

    resume: "auto" continues from the newest complete checkpoint under run_dir (if any);
    "never" refuses to start in a run dir that already has one.
    """
    dist_env = comm.init_distributed()
    rank0, world_size = dist_env.rank == 0, dist_env.world_size
    run = RunDir(run_dir).create()
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: pass --data DIR (a directory of .tar shards)")
    check_decode_on(cfg.data)  # before minutes of engine set-up
    check_attention_backend(cfg.execution)
    check_tracking(cfg, run.path, tracking_uri, rank0)
    engine, state = _start(cfg, run, resume, allow_config_change, world_size, rank0)
    start_step, batch = state.step, global_batch(cfg, world_size)
    rows = _write_run_files(cfg, run, world_size, start_step) if rank0 else []
    next_batch, forward = _batch_source(cfg, engine, state, dist_env.rank, world_size)
    rates, window, clock = Rates.measure(cfg, engine, batch, world_size), MetricsWindow(), SessionClock()
    nonfinite = NonfiniteGuard(cfg.train.max_nonfinite_in_a_row, run)
    reporter = Progress(cfg.train.steps, start_step, "pretrain", enabled=rank0, bar=progress)
    # The MLflow run is created (or reopened) last, so an error above leaves none RUNNING; from
    # here on every way out ends it (FAILED, KILLED for Ctrl-C or a stop signal, FINISHED).
    tracker, uri = _open_run(cfg, run, tracking_uri, rank0, state, start_step)
    metrics, interrupted = MetricsLog(run, rows, tracker, reporter, rank0), None
    # A stop requested before the loop (a signal during start-up) is honoured after the first
    # step; the request is cleared when this call ends (the finally below).
    try:
        while state.step < cfg.train.steps:  # a skipped step is tried again on the next batch
            result, lr = scheduled_step(engine, cfg.train, state.step, batch, next_batch, forward, stop_requested())
            if result.nonfinite:  # refused on every rank: nothing of it reaches the weights
                nonfinite.refused(state)
            else:
                nonfinite.applied()
                window.add(result, lr)
                state.step += 1
                reporter.update(1)
                clock.tick()
            if window.steps and (state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps):
                metrics.write(window.close(rates, state))
            if _checkpoint_due(result, state.step, cfg.train):
                save_checkpoint(engine, run.path, state.step, vars(state), cfg.train.keep_checkpoints)
            if result.stop:
                interrupted = why_stopped()
                log.warning("stopping at step %d (%s); checkpoint saved", state.step, interrupted)
                break
    except BaseException as err:  # the failing job's run ends FAILED (KILLED for Ctrl-C); a resume reopens it
        tracker.finish(end_status(err))
        _raise_if_disk_full(err, run)
        raise
    finally:
        clear_stop()
        reporter.close()
        metrics.close()
    summary = _summary(
        state, start_step, rows, clock.clips_per_s(batch), world_size, batch, interrupted, run, uri, tracker.run_id
    )
    if rank0:
        _finish(run, summary, rows, tracker)
    return summary


class SessionClock:
    """This session's throughput, timed from the end of the first step (excludes start-up)."""

    def __init__(self):
        self.start: float | None = None
        self.steps = 0

    def tick(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def clips_per_s(self, batch: int) -> float | None:
        seconds = time.perf_counter() - self.start if self.start else 0.0
        return self.steps * batch / seconds if seconds > 0 else None


def _open_run(
    cfg: Config, run: RunDir, tracking_uri: str | None, rank0: bool, state: RunState, start_step: int
) -> tuple[Tracker, str]:
    """The MLflow run (new, or the checkpoint's reopened); a new one gets the params and files."""
    tracker, uri = open_tracker(cfg, run.path, tracking_uri, rank0, state.mlflow_run_id, journal=run.metrics)
    state.mlflow_run_id = tracker.run_id
    if rank0 and start_step == 0:
        tracker.log_params(cfg.flat())
        tracker.log_artifact(run.config)
        tracker.log_artifact(run.deepspeed_config)
    return tracker, uri


def _summary(
    state: RunState,
    start_step: int,
    rows: list[dict[str, Any]],
    clips_per_s: float | None,
    world_size: int,
    batch: int,
    interrupted: str | None,
    run: RunDir,
    uri: str,
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    return {
        "steps": state.step,
        "start_step": start_step,
        "loss_first": rows[0]["loss"] if rows else None,
        "loss_last": rows[-1]["loss"] if rows else None,
        "clips_per_s": clips_per_s,
        "world_size": world_size,
        "global_batch": batch,
        "nonfinite_skipped": state.nonfinite_skipped,
        "bad_samples": state.bad_samples,
        "interrupted": interrupted,
        "checkpoint": str(run.latest_checkpoint()),
        "run_dir": str(run.path.resolve()),
        "tracking_uri": uri,
        "mlflow_run_id": mlflow_run_id,
    }


def _finish(run: RunDir, summary: dict[str, Any], rows: list[dict[str, Any]], tracker: Tracker) -> None:
    """Rank 0: summary.json and the loss plot, then the MLflow run's end state."""
    try:
        run.summary.write_text(json.dumps(summary, indent=1))
        tracker.log_artifact(run.summary)
        if rows:
            tracker.log_artifact(plot_losses(rows, run.losses_plot))
    except BaseException as err:
        tracker.finish(end_status(err))
        raise
    # A stopped run is KILLED in MLflow until a resume (a requeued job) sets it RUNNING again.
    tracker.finish("KILLED" if summary["interrupted"] else "FINISHED")


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in (
        (axes[0], ["loss"], "total"),
        (axes[1], ["loss_video", "loss_audio"], "reconstruction"),
        (axes[2], ["loss_contrastive"], "contrastive (sum over layers)"),
    ):
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
