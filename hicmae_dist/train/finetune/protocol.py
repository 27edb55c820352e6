"""The evaluation protocol: every fold of a k-fold / leave-one-session-out split in its own
run directory and MLflow run (nested under one protocol run), then the table of per-fold
results with mean and std per metric."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hicmae_dist import comm
from hicmae_dist.config import Config
from hicmae_dist.data.downstream import count_folds, load_fold, split_class_names
from hicmae_dist.models.convert import Converted
from hicmae_dist.tracking import Tracker, end_status
from hicmae_dist.train.finetune.fold import finetune_fold, write_json_atomic
from hicmae_dist.train.finetune.task import Task, resolve_task
from hicmae_dist.train.rundir import RunDir
from hicmae_dist.train.runtime import tracking_uri_of

log = logging.getLogger(__name__)


def protocol_task(cfg: Config, split_root: Path, fold: int) -> Task:
    """The task, with the class names of the release's class csv when the splits are its datafiles."""
    return resolve_task(cfg, split_class_names(split_root, fold, cfg.finetune.label_csv))


def run_protocol(
    cfg: Config,
    split_root: Path,
    folds: list[int],
    run_dir: Path,
    *,
    pretrained: Converted | None,
    resume: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Every fold in run_dir/foldNN (done folds skipped), then the table (summary())."""
    dist_env = comm.init_distributed()
    rank0 = dist_env.rank == 0
    task = protocol_task(cfg, split_root, folds[0])
    run = RunDir(run_dir).create()
    available = count_folds(split_root)
    if available and max(folds) > available:
        raise FileNotFoundError(f"{split_root}: {available} split directories, fold {max(folds)} asked for")
    uri = tracking_uri_of(cfg, run.path, tracking_uri)
    saved = json.loads(run.protocol.read_text()) if run.protocol.exists() else {}
    parent = Tracker(
        rank0 and cfg.tracking.enabled,
        uri,
        cfg.tracking.experiment,
        run.path,
        run_name=cfg.tracking.run_name or run.name,
        run_id=saved.get("mlflow_run_id"),
        system_metrics_s=0,
    )
    per_fold = {}
    try:  # from here on every way out ends the protocol run
        if rank0 and not saved:
            parent.set_tags({"protocol": f"{len(folds)} folds", "dataset": cfg.finetune.dataset or "custom"})
            parent.log_params({**cfg.flat(), "folds": ",".join(map(str, folds)), "splits": str(split_root)})
            write_json_atomic(run.protocol, {"mlflow_run_id": parent.run_id, "folds": folds, "splits": str(split_root)})
        for fold in folds:
            fold_dir = run.fold(fold)
            done = fold_dir.results
            if done.exists():
                log.info("fold %d: done before (%s)", fold, done)
                per_fold[fold] = json.loads(done.read_text())
                continue
            splits, how = load_fold(
                split_root,
                fold,
                regression=task.regression,
                val_fraction=cfg.finetune.val_fraction,
                subject=task.subject,
                seed=cfg.train.seed,
                label_csv=cfg.finetune.label_csv,
            )
            log.info("fold %d: validation split: %s", fold, how)
            fold_cfg = dataclasses.replace(
                cfg,
                train=dataclasses.replace(cfg.train),
                tracking=dataclasses.replace(cfg.tracking, run_name=f"{run.name}/{fold_dir.name}"),
            )
            result = finetune_fold(
                fold_cfg,
                splits,
                fold_dir.path,
                pretrained=pretrained,
                task=task,
                resume=resume,
                tracking_uri=uri,
                parent_run_id=parent.run_id,
                tags={"fold": str(fold)},
                val_split=how,
                progress=progress,
                allow_config_change=allow_config_change,
            )
            if result.get("interrupted"):
                parent.finish("KILLED")
                return {
                    "interrupted": result["interrupted"],
                    "fold": fold,
                    "run_dir": str(run.path),
                    "mlflow_run_id": parent.run_id,
                    "tracking_uri": uri,
                }
            per_fold[fold] = result
    except BaseException as err:
        parent.finish(end_status(err))
        raise
    summary = summarize(per_fold, task)
    summary.update(run_dir=str(run.path.resolve()), tracking_uri=uri, mlflow_run_id=parent.run_id)
    if rank0:
        _report(run, summary, task, parent)
    return summary


def _report(run: RunDir, summary: dict[str, Any], task: Task, parent: Tracker) -> None:
    """Rank 0: results.md and summary.json, their means and stds to the protocol run, FINISHED."""
    run.results_table.write_text(format_table(summary, task) + "\n")
    write_json_atomic(run.summary, summary)
    parent.log_metrics(
        0,
        {
            f"{which}_{k}_{stat}": v
            for which in summary["selections"]
            for k, s in summary[which].items()
            for stat, v in s.items()
            if stat in ("mean", "std")
        },
    )
    parent.log_artifact(run.results_table)
    parent.log_artifact(run.summary)
    parent.finish("FINISHED")


def summarize(per_fold: dict[int, dict], task: Task) -> dict[str, Any]:
    """Per metric and selection (last / best / averaged, each per eval mode: the folds' results'
    "selections"): the per-fold values, their mean and std (population std, as a spread over the
    folds; 0 for one fold)."""
    first = per_fold[min(per_fold)]
    out: dict[str, Any] = {
        "folds": sorted(per_fold),
        "select_metric": task.select_metric,
        "best_epochs": [per_fold[f]["best_epoch"] for f in sorted(per_fold)],
        "selections": first.get("selections", ["last", "best"]),
    }  # older results: these two
    if "averaged_epochs" in first:
        out["averaged_epochs"] = first["averaged_epochs"]
    for which in out["selections"]:
        keys = [k for k in per_fold[min(per_fold)][which] if k != "confusion"]
        out[which] = {}
        for k in keys:
            values = [per_fold[f][which][k] for f in sorted(per_fold)]
            out[which][k] = {"per_fold": values, "mean": float(np.mean(values)), "std": float(np.std(values))}
    return out


def format_table(summary: dict[str, Any], task: Task) -> str:
    """Markdown: one row per fold and selection, mean and std rows; metrics in percent as the
    papers print them, with the paper's figure when the dataset preset has one."""
    metrics = [m for m in task.report if m in summary["last"]]
    if task.regression:
        metrics += [f"ccc_{n}" for n in task.names if f"ccc_{n}" in summary["last"]]
    head = "| selection | fold | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for which in summary.get("selections", ["last", "best"]):
        label = _selection_label(which, summary)
        for i, fold in enumerate(summary["folds"]):
            vals = " | ".join(f"{100 * summary[which][m]['per_fold'][i]:.2f}" for m in metrics)
            lines.append(f"| {label} | {fold} | {vals} |")
        mean = " | ".join(
            f"**{100 * summary[which][m]['mean']:.2f} ± {100 * summary[which][m]['std']:.2f}**" for m in metrics
        )
        lines.append(f"| {label} | mean ± std | {mean} |")
    if task.paper:
        lines.append(
            f"| paper ({task.paper_model or 'HiCMAE-B'}) | | "
            + " | ".join(f"{task.paper[m]:.2f}" if m in task.paper else "" for m in metrics)
            + " |"
        )
    lines.append(f"\nbest epochs per fold (on validation, never on test): {summary['best_epochs']}")
    return "\n".join(lines)


def _selection_label(which: str, summary: dict[str, Any]) -> str:
    """ "best_audio_missing_video" -> "best val uar, audio_missing_video mode"."""
    weights, _, mode = which.partition("_")
    label = {
        "last": "last epoch",
        "best": f"best val {summary['select_metric']}",
        "averaged": "epochs {}-{} averaged".format(*summary.get("averaged_epochs", ("?", "?"))),
    }[weights]
    return f"{label}, {mode} mode" if mode else label
