"""`hicmae-dist submit`'s work: resolve the run's config and the job's shape on the submitting
host, check the run dir (a checkpoint to resume, no other job on it), then describe the job
(`--dry-run`) or submit it and record it in the job registry.

    plan = plan_submission(args)           # raises ConfigError on a bad config, shape or run dir
    print(dry_run_text(plan), end="")      # or:
    job_id = submit_planned(plan)          # SubmitError when sbatch refuses
    print(submitted_text(plan, job_id))
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hicmae_dist.config import Config, ConfigError, load_config
from hicmae_dist.launch import submit as slurm
from hicmae_dist.tracking import run_uri
from hicmae_dist.train.rundir import RunDir

_SHAPE_FLAGS = (
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "mem",
    "time",
    "partition",
    "account",
    "qos",
    "constraint",
    "signal_delay_s",
    "max_timeouts",
)


@dataclass
class Submission:
    """Everything decided before sbatch: `args` are `hicmae-dist submit`'s parsed options."""

    args: argparse.Namespace
    cfg: Config
    overrides: list[str]
    finetune: dict | None  # the job's finetune spec; None: a pretraining job
    run_dir: Path
    log_dir: Path
    job_name: str
    shape: slurm.JobShape
    params: dict[str, Any]
    tracking_uri: str
    mlflow_run: str  # which MLflow run the job writes, in words


def plan_submission(args: argparse.Namespace) -> Submission:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.shards={Path(args.data).resolve()}")
    if args.dataset:
        overrides.append(f"finetune.dataset={args.dataset}")
    cfg = load_config(args.preset, overrides)
    finetune = _submit_finetune(args) if args.splits else None
    if not cfg.data.shards and not args.dry_run and finetune is None:
        raise ConfigError("data.shards is empty: pass --data DIR (a directory of .tar shards)")
    run_dir = Path(args.run_dir).resolve()
    shape = _job_shape(args)
    job_name = args.job_name or f"hicmae-{run_dir.name}"
    log_dir = Path(args.log_dir).resolve() if args.log_dir else RunDir(run_dir).slurm_logs
    params = slurm.slurm_parameters(shape, job_name=job_name, comment=f"hicmae-dist {run_dir}")
    uri = run_uri(args.tracking_uri, cfg.tracking.uri, run_dir)
    resumes = _checkpoint_run(run_dir, cfg, args.resume)
    mlflow_run = (
        f"continues run {resumes[1]} (checkpoint {resumes[0]})"
        if resumes
        else "a new run, created when the job starts (`hicmae-dist jobs` shows its id)"
    )
    return Submission(args, cfg, overrides, finetune, run_dir, log_dir, job_name, shape, params, uri, mlflow_run)


def _job_shape(args: argparse.Namespace) -> slurm.JobShape:
    """The --cluster preset with the shape flags on top; a GPU job runs one task per GPU."""
    flags = {k: getattr(args, k) for k in _SHAPE_FLAGS}
    flags["sbatch"] = args.sbatch or None
    shape = slurm.resolve_shape(slurm.load_cluster(args.cluster), flags)
    if shape.gpus_per_node and args.tasks_per_node not in (None, shape.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {shape.gpus_per_node}: "
            f"a GPU job runs one task per GPU (--gpus-per-node 0 for a CPU job)"
        )
    return shape


def dry_run_text(plan: Submission) -> str:
    """The sbatch script submitit would submit, then what the job will do, one `#` line each."""
    cfg, finetune, preset = plan.cfg, plan.finetune, plan.args.preset
    lines = [f"# job:      {slurm.shape_summary(plan.shape)}"]
    if finetune:
        lines.append(
            f"# finetune: preset {preset}, hash {cfg.hash(finetune=True)}, folds {finetune['folds']} of "
            f"{finetune['splits']}, from {finetune['pretrained'] or 'scratch'}"
        )
    else:
        lines.append(
            f"# config:   preset {preset}, hash {cfg.hash()}, {cfg.train.steps} steps, "
            f"data {cfg.data.shards or '(not set: --data)'}"
        )
    lines += [
        f"# run dir:  {plan.run_dir}",
        f"# logs:     {plan.log_dir}/<job id>/<job id>_<rank>_log.out|.err",
        f"# mlflow:   {plan.tracking_uri} (experiment {cfg.tracking.experiment}): {plan.mlflow_run}",
    ]
    return slurm.sbatch_script(plan.params, plan.log_dir) + "\n".join(lines) + "\n"


def submit_planned(plan: Submission) -> str:
    """Submit the job (slurm.SubmitError when sbatch refuses) and record it; its id."""
    from hicmae_dist.launch.job import TrainJob
    from hicmae_dist.launch.jobs import Registry, active_job_for_run_dir

    args, cfg, run_dir, shape = plan.args, plan.cfg, plan.run_dir, plan.shape
    registry = Registry(args.registry)
    busy = active_job_for_run_dir(registry, run_dir)
    if busy:
        raise ConfigError(
            f"job {busy} is queued or running on {run_dir}; two jobs must not write one run dir "
            f"(`hicmae-dist cancel {busy}` first, or pick another --run-dir)"
        )
    shards = Path(cfg.data.shards)
    if plan.finetune is None and not any(shards.glob("shard-*.tar")):
        print(
            f"hicmae-dist submit: warning: no shard-*.tar in {shards} on this host; the job fails "
            f"unless its nodes see them there",
            file=sys.stderr,
        )
    job = TrainJob(
        cfg.to_dict(),
        str(run_dir),
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        max_timeouts=shape.max_timeouts,
        signal_delay_s=shape.signal_delay_s,
        finetune=plan.finetune,
    )
    job_id = slurm.submit_job(job, shape, plan.params, plan.log_dir)
    registry.add(
        {
            "job_id": job_id,
            "job_name": plan.job_name,
            "user": _user(),
            "submitted": datetime.now().isoformat(timespec="seconds"),
            "cluster": args.cluster,
            "preset": args.preset,
            "overrides": plan.overrides,
            "steps": cfg.train.steps,
            "run_dir": str(run_dir),
            "log_dir": str(plan.log_dir),
            "tracking_uri": plan.tracking_uri,
            "experiment": cfg.tracking.experiment,
            "run_name": cfg.tracking.run_name or run_dir.name,
            "nodes": shape.nodes,
            "tasks": shape.tasks,
            "gpus_per_node": shape.gpus_per_node,
        }
    )
    return job_id


def submitted_text(plan: Submission, job_id: str) -> str:
    paths = slurm.log_paths(plan.log_dir, job_id, plan.shape.tasks)
    lines = [
        f"submitted job {job_id} ({plan.job_name}): {slurm.shape_summary(plan.shape)}",
        f"  run dir   {plan.run_dir}",
        f"  stdout    {paths['stdout']}",
        f"  stderr    {paths['stderr']}",
    ]
    if "other ranks" in paths:
        lines.append(f"  ranks 1+  {paths['other ranks']}")
    lines += [
        f"  mlflow    {plan.tracking_uri} (experiment {plan.cfg.tracking.experiment}): {plan.mlflow_run}",
        f"  follow    hicmae-dist jobs {job_id}    cancel: hicmae-dist cancel {job_id}",
    ]
    return "\n".join(lines)


def _submit_finetune(args: argparse.Namespace) -> dict:
    """The job's finetune spec: paths resolved here (the nodes see the same file system)."""
    from hicmae_dist.data.downstream import select_folds  # torch: only a finetune job pays for it

    if bool(args.pretrained) == args.from_scratch:
        raise ConfigError("with --splits give --pretrained RUN_DIR|FILE or --from-scratch (one of the two)")
    splits = Path(args.splits).resolve()
    return {
        "splits": str(splits),
        "folds": select_folds(args.folds, splits),
        "pretrained": str(Path(args.pretrained).resolve()) if args.pretrained else None,
    }


def _user() -> str:
    import getpass

    return getpass.getuser()


def _checkpoint_run(run_dir: Path, cfg, resume: str) -> tuple[str, str | None] | None:
    """(checkpoint name, MLflow run id) when the job will resume; ConfigError when it cannot."""
    run = RunDir(run_dir)
    try:
        ckpt = run.latest_checkpoint()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    if ckpt is None:
        return None
    problem = run.refuse_existing(resume)
    if problem:
        raise ConfigError(problem)
    state = RunDir.read_state(ckpt)
    problem = run.config_change(ckpt, state, cfg.hash())
    if problem:
        raise ConfigError(f"{problem} - use a new --run-dir")
    return ckpt.name, state.get("mlflow_run_id")
