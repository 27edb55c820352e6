"""The Slurm job callable: pretrain (or fine-tune) in every task, checkpoint and requeue on USR2.

`hicmae-dist submit` pickles a TrainJob (the resolved config, the run dir, the requeue
budget) with submitit; `srun` starts one task per rank, each unpickles it and calls it.

USR2 (before the time limit, or on preemption) and SIGTERM become the trainer's stop request, not
submitit's requeue-inside-the-handler: all ranks agree to stop after the same step and save a
checkpoint together; then rank 0 asks Slurm why (PreemptTime set: preemption, which always
requeues; little time left: a time limit, requeued while fewer than `max_timeouts` were used;
SIGTERM alone never requeues) and requeues with `scontrol requeue`, or every rank raises
UncompletedJobError. The requeued job resumes the checkpoint and the same MLflow run. The steps
and why: docs/design.md, "Stopping: signals, and the Slurm job". Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit

log = logging.getLogger(__name__)
EVENTS_FILE = "events.jsonl"
# Slurm checks time limits about every 30 s and may send --signal up to a minute early
# (sbatch(1)): a USR2 with no more than signal_delay_s + this left is the time limit.
TIME_LIMIT_SLACK_S = 90
REQUEUE_EXIT_CODE = 3  # exit status of the tasks after a requeue (the job is already back in the queue)

_signals: dict[str, float] = {}  # signal name -> first arrival (time.time())
_request_stop = None  # the trainer's request_stop, once its module is imported


def _on_signal(num: int, frame: Any) -> None:
    # No import here: a signal that lands while the main thread imports the trainer (a minute
    # of torch/DeepSpeed imports at start-up) would meet a half-initialised module, and the
    # ImportError, raised in the main thread, can be swallowed by an import-time try/except of
    # a library (the stop is lost). The signal is recorded and replayed once the trainer is in.
    name = signal.Signals(num).name
    _signals.setdefault(name, time.time())
    if _request_stop is not None:
        _request_stop(name)


def install_signal_handlers() -> None:
    """USR2 (time limit, preemption) and SIGTERM (scancel, hard limit) -> the trainer's
    request_stop; replaces submitit's handlers (see the module docstring)."""
    global _request_stop
    _signals.clear()
    _request_stop = None
    sig = submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    signal.signal(sig, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def event(folder: Path, name: str, **fields: Any) -> None:
    """Append one line to the job's events file (rank 0 only)."""
    row = {"time": datetime.now().isoformat(timespec="seconds"), "event": name, **fields}
    with open(Path(folder) / EVENTS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_events(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / EVENTS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return rows


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict ({} when Slurm does not answer)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    info: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def classify_stop(job_id: str, signal_delay_s: int, signalled_at: float) -> tuple[str, str]:
    """Why Slurm sent USR2: ("preemption" | "timeout" | "signal", detail)."""
    info = scontrol_job(job_id)
    preempt, start = info.get("PreemptTime", "None"), info.get("StartTime", "")
    if preempt not in ("None", "Unknown", "") and preempt >= start:  # ISO times compare as strings
        return "preemption", f"preempted at {preempt}"
    end, limit = info.get("EndTime", ""), info.get("TimeLimit", "")
    if end and limit not in ("", "UNLIMITED", "Partition_Limit"):
        try:
            left = (datetime.fromisoformat(end) - datetime.fromtimestamp(signalled_at)).total_seconds()
        except ValueError:
            left = None
        if left is not None:
            if left <= signal_delay_s + TIME_LIMIT_SLACK_S:
                return "timeout", f"{max(left, 0):.0f}s before the {limit} limit"
            return "signal", f"USR2 with {left:.0f}s left of {limit}, not preempted (sent by hand?)"
    return "signal", "USR2 (Slurm gave no preemption or time-limit information)"


def decide(kind: str, detail: str, step: int, timeouts_used: int, max_timeouts: int) -> str:
    """Why the job stops here instead of requeueing ("" = requeue). kind: classify_stop's or
    "terminated" (SIGTERM only)."""
    if kind == "terminated":
        return f"stopped by {detail} at step {step}; checkpoint saved"
    if kind == "timeout" and timeouts_used >= max_timeouts:
        return (
            f"time limit ({detail}) with {timeouts_used} time-limit requeue(s) used of max_timeouts="
            f"{max_timeouts}; checkpoint at step {step}: resubmit with the same --run-dir to continue"
        )
    return ""  # preemption, USR2 by hand, or a time limit within the budget


class TrainJob(submitit.helpers.Checkpointable):
    """What one Slurm job runs, in every task. Picklable: plain data only. `finetune` = {"splits":
    dir, "folds": [1, ...], "pretrained": path or None} runs the fine-tuning protocol instead of
    pretraining (same signals, checkpoints and requeues; a requeued protocol skips done folds)."""

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: str,
        *,
        resume: str = "auto",
        tracking_uri: str | None = None,
        max_timeouts: int = 3,
        signal_delay_s: int = 120,
        finetune: dict[str, Any] | None = None,
    ):
        self.config = config  # Config.to_dict(), resolved and validated at submit time
        self.finetune = finetune
        self.run_dir = str(run_dir)
        self.resume = resume
        self.tracking_uri = tracking_uri
        self.max_timeouts = max_timeouts
        self.signal_delay_s = signal_delay_s
        self.timeouts = 0  # time-limit requeues used
        self.preemptions = 0  # preemption (and hand-sent USR2) requeues

    # ------------------------------------------------------------------ the job
    def __call__(self) -> dict[str, Any]:
        install_signal_handlers()  # first: from here on a signal waits for a step boundary
        if not logging.getLogger().handlers:  # the trainer's INFO lines into the task's log
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            logging.getLogger("submitit").propagate = False  # it has its own handler
        env = submitit.JobEnvironment()
        rank0 = env.global_rank == 0
        folder = env.paths.folder
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if rank0:
            event(
                folder,
                "start",
                attempt=restarts + 1,
                host=socket.gethostname(),
                tasks=env.num_tasks,
                nodes=env.num_nodes,
                timeouts=self.timeouts,
                preemptions=self.preemptions,
            )
        try:
            self._setup_environment(env, restarts)
            from hicmae_dist.config import config_from_dict
            from hicmae_dist.train.pretrain import pretrain
            from hicmae_dist.train.runtime import request_stop

            global _request_stop
            _request_stop = request_stop
            for name in list(_signals):  # arrived during the imports: stop after the first step
                request_stop(name)
            cfg = config_from_dict(self.config)
            resume = "auto" if restarts else self.resume
            if self.finetune:
                summary = self._finetune(cfg, resume)
            else:
                summary = pretrain(
                    cfg, Path(self.run_dir), resume=resume, tracking_uri=self.tracking_uri, progress=False
                )
            if summary["interrupted"] and not self.finetune and summary["steps"] >= cfg.train.steps:
                # stopped after the last step: that is a finished run
                self._finish_mlflow(summary)
                summary["interrupted"] = None
            if summary["interrupted"]:
                return self._stop_or_requeue(env, summary)
        except Exception as err:
            if rank0 and not isinstance(err, submitit.core.utils.UncompletedJobError):
                event(folder, "failed", error=f"{type(err).__name__}: {err}"[:2000])
            raise
        if rank0:
            import torch.distributed as dist

            backend = str(dist.get_backend()) if dist.is_initialized() else None
            event(
                folder,
                "finished",
                step=summary["steps"],
                world_size=summary["world_size"],
                backend=backend,
                mlflow_run_id=summary["mlflow_run_id"],
                tracking_uri=summary["tracking_uri"],
            )
        return summary

    # ------------------------------------------------------------------ pieces
    def _finetune(self, cfg, resume: str) -> dict[str, Any]:
        """run_protocol, its result in pretrain's summary keys (steps: where it stopped)."""
        import torch.distributed as dist

        from hicmae_dist.train.export import load_pretrained
        from hicmae_dist.train.finetune.protocol import run_protocol

        ft = self.finetune
        pretrained = load_pretrained(ft["pretrained"]) if ft.get("pretrained") else None
        out = run_protocol(
            cfg,
            Path(ft["splits"]),
            list(ft["folds"]),
            Path(self.run_dir),
            pretrained=pretrained,
            resume=resume,
            tracking_uri=self.tracking_uri,
            progress=False,
        )
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {
            **out,
            "interrupted": out.get("interrupted"),
            "world_size": world,
            "steps": f"fold {out['fold']}" if out.get("interrupted") else f"{len(ft['folds'])} folds",
            "mlflow_run_id": out.get("mlflow_run_id"),
            "tracking_uri": out.get("tracking_uri"),
        }

    def _setup_environment(self, env, restarts: int) -> None:
        """Caches, threads and torch.distributed's env:// variables from Slurm's environment."""
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hicmae-dist"
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
        os.environ.setdefault("TQDM_DISABLE", "1")
        # Rank, device and rendezvous (first node, a port per job and attempt) come from Slurm's
        # variables through comm.resolve_env, which the trainer's init_distributed calls again.
        import torch

        from hicmae_dist import comm

        dist_env = comm.resolve_env(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(int(cpus))  # not the whole node's cores in every rank
        log.info(
            "rank %d/%d (local %d) on %s, %s, master %s:%s, attempt %d",
            dist_env.rank,
            dist_env.world_size,
            dist_env.local_rank,
            socket.gethostname(),
            dist_env.device,
            dist_env.master_addr,
            dist_env.master_port,
            restarts + 1,
        )

    def _finish_mlflow(self, summary: dict[str, Any], status: str = "FINISHED") -> None:
        """Rank 0: the final status of the run the trainer stopped (KILLED): KILLED again for a
        requeue that will not come (a resubmit with the same run dir sets it RUNNING), FINISHED
        when the stop came after the last step."""
        if submitit.JobEnvironment().global_rank != 0 or not summary.get("mlflow_run_id"):
            return
        from hicmae_dist.tracking import finish_run

        # bounded; a tracking outage is a warning and the status waits for `hicmae-dist sync`
        finish_run(Path(self.run_dir), summary["tracking_uri"], summary["mlflow_run_id"], status)

    def _stop_or_requeue(self, env, summary: dict[str, Any]) -> dict[str, Any]:
        """After the trainer saved and returned on a stop request (module docstring, 3-5)."""
        from hicmae_dist import comm

        usr = submitit.JobEnvironment._usr_sig().name
        (got_usr,) = comm.agree([usr in _signals], comm.current_device())  # on any rank (else SIGTERM alone)
        rank0 = env.global_rank == 0
        step, folder = summary["steps"], env.paths.folder
        requeued = 0.0
        reason = ""
        if rank0:
            if got_usr:
                kind, detail = classify_stop(env.job_id, self.signal_delay_s, _signals.get(usr, time.time()))
            else:
                kind, detail = "terminated", "SIGTERM (scancel, scontrol requeue or the hard time limit)"
            reason = decide(kind, detail, step, self.timeouts, self.max_timeouts)
            if not reason:
                if kind == "timeout":
                    self.timeouts += 1
                else:
                    self.preemptions += 1
                try:
                    self._requeue(env)
                    requeued = 1.0
                    event(
                        folder,
                        "requeue",
                        kind=kind,
                        detail=detail,
                        step=step,
                        timeouts=self.timeouts,
                        preemptions=self.preemptions,
                    )
                    log.warning("%s (%s): checkpoint at step %d, job %s requeued", kind, detail, step, env.job_id)
                except (OSError, subprocess.SubprocessError) as err:
                    reason = f"{kind} at step {step}, but the requeue failed: {err}"
            if reason:
                event(folder, "stopped", kind=kind, detail=reason, step=step)
                self._finish_mlflow(summary, "KILLED")  # an outage is a warning (tracking.finish_run)
        (requeued,) = comm.broadcast_values([requeued], src=0, device=comm.current_device())  # rank 0 decided
        if requeued:
            # Slurm already holds the job for a restart and will SIGTERM us; leave first. Not
            # through submitit's result pickle: this attempt has no result.
            # (os._exit: no interpreter teardown that could wait on DataLoader workers or gloo.)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(REQUEUE_EXIT_CODE)
        raise submitit.core.utils.UncompletedJobError(reason or f"stopped at step {step} (see rank 0's log)")

    def _requeue(self, env) -> None:
        """Rank 0: this callable, with its new counters, back into submitit's pickle; then requeue."""
        from submitit.core.utils import DelayedSubmission, temporary_save_path

        pickle_path = env.paths.submitted_pickle
        timeout_min = DelayedSubmission.load(pickle_path)._timeout_min
        delayed = DelayedSubmission(self)
        # submitit's own countdown, for a signal that reaches its handler before ours is installed
        delayed.set_timeout(timeout_min, max(self.max_timeouts - self.timeouts, 0))
        with temporary_save_path(pickle_path) as tmp:
            delayed.dump(tmp)
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, capture_output=True, text=True, timeout=60)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's handler calls this only before __call__ took over the signals (nothing
        trained yet in this attempt): requeue as is."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
