"""`hicmae-dist submit`: a pretraining run as a Slurm job through submitit.

The job's shape comes from a cluster preset (YAML in slurm/clusters/, chosen with --cluster)
with command-line flags on top; the run's config is resolved and validated here, on the
submitting host, and travels inside the job (see launch/job.py), so a preset file edited
while the job waits or is requeued cannot change a running experiment.

    shape = resolve_shape(load_cluster("local"), {"nodes": 2})
    params = slurm_parameters(shape, job_name="hicmae-a", comment="hicmae-dist /runs/a")
    print(sbatch_script(params, log_dir))       # what `--dry-run` prints
    job = submit_job(TrainJob(...), shape, params, log_dir)

One Slurm task per GPU (--ntasks-per-node = --gpus-per-node); a CPU job (gpus 0) runs
--tasks-per-node tasks over gloo. Every job gets `--signal=USR2@<delay>` and `--requeue`: the
callable checkpoints and requeues itself on that signal (launch/job.py).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hicmae_dist.config import ConfigError

# srun: a rank that dies takes its step down instead of leaving the others blocked in a
# collective until the time limit.
SRUN_ARGS = ["--kill-on-bad-exit=1"]
PRESET_ENV = "HICMAE_DIST_CLUSTERS"  # extra directories of cluster presets, ':'-separated


def cluster_dirs() -> list[Path]:
    """Where --cluster NAME is looked up, first match wins: $HICMAE_DIST_CLUSTERS,
    ~/.config/hicmae-dist/clusters, then the repository's slurm/clusters."""
    dirs = [Path(d) for d in os.environ.get(PRESET_ENV, "").split(":") if d]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    dirs.append(config_home / "hicmae-dist" / "clusters")
    dirs.append(Path(__file__).resolve().parents[2] / "slurm" / "clusters")
    return dirs


def list_clusters() -> list[str]:
    return sorted({p.stem for d in cluster_dirs() if d.is_dir() for p in d.glob("*.yaml")})


@dataclass
class JobShape:
    """Everything about the Slurm allocation; field names are the `submit` flags'."""

    nodes: int = 1
    gpus_per_node: int = 0  # > 0: one task per GPU, NCCL; 0: a CPU job over gloo
    tasks_per_node: int = 1  # CPU jobs only (a GPU job has gpus_per_node tasks per node)
    cpus_per_task: int = 1
    mem: str | None = None  # per node, Slurm syntax: 16G, 500M, 0 = all of it
    time: int = 60  # minutes (flags and presets also take Slurm syntax: 1:30:00, 2-00:00:00)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # USR2 this many seconds before the time limit
    max_timeouts: int = 3  # time-limit requeues; preemptions always requeue
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options
    setup: list[str] = field(default_factory=list)  # shell lines run before srun
    env: dict[str, str] = field(default_factory=dict)  # exported before srun
    description: str = ""

    @property
    def tasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


def load_cluster(name: str | None) -> dict[str, Any]:
    """A cluster preset by name (see cluster_dirs) or path; None gives the built-in defaults."""
    if not name:
        return {}
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        for d in cluster_dirs():
            if (d / f"{name}.yaml").exists():
                path = d / f"{name}.yaml"
                break
        else:
            raise ConfigError(
                f"unknown cluster preset {name!r}; known: {', '.join(list_clusters()) or 'none'} "
                f"(looked in {', '.join(str(d) for d in cluster_dirs())})"
            )
    if not path.exists():
        raise ConfigError(f"cluster preset {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of job settings, got {type(raw).__name__}")
    known = {f.name for f in fields(JobShape)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return raw


def parse_time(value: Any) -> int:
    """Slurm's time syntax (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) or an int of minutes -> whole
    minutes, rounded up (Slurm's own resolution)."""
    if isinstance(value, bool):
        raise ConfigError(f"time: expected minutes or D-HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        minutes = math.ceil(value)
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
        if not m:
            raise ConfigError(f"time: expected minutes or Slurm's [D-]HH:MM:SS, got {value!r}")
        days, a, b, c = (int(x) if x else None for x in m.groups())
        if days is not None:  # D-H, D-H:M, D-H:M:S
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # H:M:S
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # M:S
            seconds = a * 60 + b
        else:  # M
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise ConfigError(f"time: at least 1 minute, got {value!r}")
    return minutes


def format_time(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def parse_mem(value: Any) -> str | None:
    if value is None or value == "":
        return None
    s = str(value).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", s)
    if not m:
        raise ConfigError(f"mem: expected a size such as 16G, 500M or 0 (the whole node), got {value!r}")
    number, unit = m.groups()
    if "." in number:  # Slurm takes integers only: 1.5G -> 1536M
        scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit]
        return f"{math.ceil(float(number) * scale)}M"
    return f"{number}{unit}"


def parse_sbatch(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`key=value` strings (or a preset's mapping) -> extra #SBATCH options; `key` alone or
    `key=true` is a bare flag (--exclusive); `key=false` removes an option a preset set."""
    out: dict[str, Any] = {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items or []:
            key, sep, value = item.partition("=")
            pairs.append((key, value if sep else True))
    for key, value in pairs:
        key = str(key).strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ConfigError(f"--sbatch {key!r}: expected an sbatch long option name, e.g. exclusive or mail-type=END")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out[key.replace("_", "-")] = False if value is None else value  # False: drop a preset's option
    return out


def resolve_shape(preset: dict[str, Any], flags: dict[str, Any]) -> JobShape:
    """Defaults, then the cluster preset, then the flags that were given (None = not given)."""
    merged: dict[str, Any] = {}
    for source in (preset, {k: v for k, v in flags.items() if v is not None}):
        for key, value in source.items():
            if key == "sbatch":
                merged["sbatch"] = {**merged.get("sbatch", {}), **parse_sbatch(value)}
            elif key == "env":
                merged["env"] = {**merged.get("env", {}), **{str(k): str(v) for k, v in (value or {}).items()}}
            else:
                merged[key] = value
    merged["sbatch"] = {k: v for k, v in merged.get("sbatch", {}).items() if v is not False}
    shape = JobShape()
    for key, value in merged.items():
        if key == "time":
            value = parse_time(value)
        elif key == "mem":
            value = parse_mem(value)
        elif key == "setup":
            value = [str(v) for v in value or []]
        elif key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s", "max_timeouts"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
        elif key in ("partition", "account", "qos", "constraint", "description") and value is not None:
            value = str(value)
        setattr(shape, key, value)
    for key, low in (
        ("nodes", 1),
        ("gpus_per_node", 0),
        ("tasks_per_node", 1),
        ("cpus_per_task", 1),
        ("signal_delay_s", 1),
        ("max_timeouts", 0),
    ):
        if getattr(shape, key) < low:
            raise ConfigError(f"{key}: expected >= {low}, got {getattr(shape, key)}")
    if shape.signal_delay_s >= shape.time * 60:
        raise ConfigError(
            f"signal_delay_s={shape.signal_delay_s} is not shorter than the time limit "
            f"({shape.time} min): the job would be signalled as soon as it starts"
        )
    return shape


def slurm_parameters(shape: JobShape, *, job_name: str, comment: str | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (the same dict feeds --dry-run and the real submit)."""
    setup = [f"export {k}={shlex.quote(v)}" for k, v in sorted(shape.env.items())] + list(shape.setup)
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": shape.nodes,
        "ntasks_per_node": shape.ntasks_per_node,
        "cpus_per_task": shape.cpus_per_task,
        "time": shape.time,  # minutes: submitit also times the job with it
        "signal_delay_s": shape.signal_delay_s,
        "srun_args": list(SRUN_ARGS),
        # --requeue: `scontrol requeue` from inside the job, preemption in REQUEUE mode and a
        # node failure all put the job back in the queue (some sites default to JobRequeue=0).
        "additional_parameters": {"requeue": True, **shape.sbatch},
    }
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(shape, key) is not None:
            params[key] = getattr(shape, key)
    if comment:
        params["comment"] = comment
    if setup:
        params["setup"] = setup
    return params


def job_folder(log_dir: Path) -> Path:
    """submitit's folder: one subdirectory per job id."""
    return Path(log_dir) / "%j"


def python_command() -> str:
    return shlex.quote(sys.executable)


def sbatch_script(params: dict[str, Any], log_dir: Path) -> str:
    """The sbatch file submitit writes for these parameters (needs neither Slurm nor data)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([python_command(), "-u -m submitit.core._submit", shlex.quote(str(job_folder(log_dir)))])
    return _make_sbatch_string(command=command, folder=job_folder(log_dir), **params)


def log_paths(log_dir: Path, job_id: str, tasks: int) -> dict[str, Path]:
    folder = Path(log_dir) / job_id
    paths = {"folder": folder, "stdout": folder / f"{job_id}_0_log.out", "stderr": folder / f"{job_id}_0_log.err"}
    if tasks > 1:
        paths["other ranks"] = folder / f"{job_id}_<rank>_log.out"
    return paths


class SubmitError(RuntimeError):
    """No Slurm here, or sbatch refused the job (its message says why)."""


def submit_job(job, shape: JobShape, params: dict[str, Any], log_dir: Path) -> str:
    """sbatch through submitit; returns the job id."""
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        executor = submitit.SlurmExecutor(
            folder=job_folder(log_dir), max_num_timeout=shape.max_timeouts, python=python_command()
        )
        executor.update_parameters(**params)
        return str(executor.submit(job).job_id)
    except (FailedJobError, FailedSubmissionError, OSError) as err:
        raise SubmitError(f"sbatch failed: {str(err).strip()}") from err
    except RuntimeError as err:  # submitit: 'Could not detect "srun"'
        raise SubmitError(f"{err} (no Slurm client on this host; --dry-run shows the script)") from err


def shape_summary(shape: JobShape) -> str:
    per_node = (
        f"{shape.gpus_per_node} GPU task(s)/node (nccl)"
        if shape.gpus_per_node
        else f"{shape.tasks_per_node} CPU task(s)/node (gloo)"
    )
    return (
        f"{shape.nodes} node(s) x {per_node} = {shape.tasks} rank(s), {shape.cpus_per_task} CPU(s)/task, "
        f"time {format_time(shape.time)}, USR2 {shape.signal_delay_s}s before the limit, "
        f"<= {shape.max_timeouts} time-limit requeue(s)"
    )


def as_dict(shape: JobShape) -> dict[str, Any]:
    return asdict(shape)
