"""One fold: the DeepSpeed engine over the training split, validation every finetune.eval_every
epochs (the best epoch's weights kept), then the test split once with the last, once with the
selected and (finetune.weight_average) once with the averaged weights, each in the training mode
and every finetune.eval_modes mode. finetune_fold() is the loop over epochs; FoldRun holds what its steps
share (train_epoch, validate, _finish)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hicmae_dist import comm
from hicmae_dist.config import Config, ConfigError, ModelConfig
from hicmae_dist.data.downstream import DownstreamDataset, DownstreamItem
from hicmae_dist.models.cavmae.model import CAVMAEFinetune
from hicmae_dist.models.convert import Converted
from hicmae_dist.tracking import Tracker, end_status
from hicmae_dist.train.checkpoint import resume_checkpoint, save_checkpoint
from hicmae_dist.train.engine import build_engine, global_batch
from hicmae_dist.train.finetune.averaging import keeps_for_average, write_average
from hicmae_dist.train.finetune.evaluate import predict, score, test_pass
from hicmae_dist.train.finetune.mixing import mix_batch
from hicmae_dist.train.finetune.sampling import EpochBatches, balanced_weights, make_loader
from hicmae_dist.train.finetune.task import Task, build_finetune, finetune_model_config, resolve_task, task_loss
from hicmae_dist.train.progress import Progress
from hicmae_dist.train.rundir import RunDir
from hicmae_dist.train.runtime import (
    check_attention_backend,
    clear_stop,
    compute_dtype,
    open_tracker,
    refuse_existing,
    restore,
    seed_everything,
    split_set_identity,
    stop_requested,
    why_stopped,
)
from hicmae_dist.train.step import scheduled_step

log = logging.getLogger(__name__)


@dataclass
class FoldState:
    """What a fine-tuning checkpoint carries besides weights and optimizer state."""

    step: int = 0
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # batches of it already trained
    best_epoch: int = -1
    best_score: float = -math.inf
    mlflow_run_id: str | None = None
    config_hash: str = ""
    world_size: int = 1
    nonfinite_skipped: int = 0
    data_id: str = ""  # split_set_identity: the split files the fold trains, selects and tests on
    data_splits: str = ""


@dataclass
class FoldRun:
    """One fold's moving parts, shared by its epochs, validation and test pass."""

    cfg: Config
    task: Task
    run: RunDir
    engine: Any  # the DeepSpeed engine
    state: FoldState
    datasets: dict[str, DownstreamDataset]
    tracker: Tracker
    reporter: Progress
    rank: int
    world_size: int
    batch: int  # global batch
    weights: torch.Tensor | None = None  # finetune.balanced_sampling's clip weights

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    @property
    def eval_bars(self) -> bool:  # evaluation bars only where the training bar is drawn
        return self.reporter.tty

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg.train)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def _broadcast_best(epoch: int, best: float, device) -> tuple[int, float]:
    """Rank 0 validates; every rank keeps the same selection state in its checkpoint."""
    epoch_f, best = comm.broadcast_values([epoch, best], src=0, device=device)
    return int(epoch_f), best


# --- set-up ----------------------------------------------------------------------------------------


def _classes(item: DownstreamItem, task: Task) -> tuple[int, ...]:
    """The classes of a clip: all its labels in a multi-label set, the first otherwise."""
    return tuple(item.label) if task.multilabel else tuple(item.label[:1])


def sampling_weights(train: list[DownstreamItem], task: Task) -> torch.Tensor:
    """finetune.balanced_sampling's clip weights (sampling.balanced_weights) of the training split."""
    multi_hot = np.zeros((len(train), task.num_outputs))
    for row, item in enumerate(train):
        multi_hot[row, list(_classes(item, task))] = 1.0
    return balanced_weights(multi_hot)


def _prepare(
    cfg: Config, splits: dict[str, list[DownstreamItem]], task: Task, pretrained: Converted | None, world_size: int
) -> tuple[dict[str, DownstreamDataset], ModelConfig, int]:
    """(datasets, model config, steps per epoch), after the checks; sets train.steps and
    train.warmup_steps from the epochs (whole global batches per epoch)."""
    ft = cfg.finetune
    if cfg.train.zero_stage == 3:
        raise ConfigError(
            "train.zero_stage: fine-tuning supports stages 0-2 (evaluation needs the whole model "
            "on rank 0; the fine-tuning models fit one GPU)"
        )
    if ft.balanced_sampling and task.regression:
        raise ConfigError("finetune.balanced_sampling: weights come from class counts; a regression task has none")
    mcfg = finetune_model_config(cfg, pretrained)
    _check_eval_modes(ft.eval_modes, mcfg.arch)
    datasets = {
        name: DownstreamDataset(
            items,
            mcfg,
            name,
            regression=task.regression,
            seed=cfg.train.seed,
            test_num_segment=ft.test_num_segment,
            test_num_crop=ft.test_num_crop,
            crop_scale=(ft.crop_scale_min, 1.0),
            multi_hot=task.num_outputs if task.multilabel else 0,
        )
        for name, items in splits.items()
    }
    batch = global_batch(cfg, world_size)
    steps_per_epoch = len(datasets["train"]) // batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.batch_size: {len(datasets['train'])} training clips make no whole global batch of "
            f"{batch}; lower data.batch_size"
        )
    if not task.regression:
        for name, items in splits.items():
            bad = next((i for i in items if not all(0 <= c < task.num_outputs for c in _classes(i, task))), None)
            if bad is not None:
                raise ValueError(
                    f"{name} clip {bad.frame_dir}: labels {bad.label} outside [0, {task.num_outputs}): "
                    f"finetune.num_outputs or the dataset preset does not match the split files"
                )
    cfg.train.steps = ft.epochs * steps_per_epoch
    cfg.train.warmup_steps = ft.warmup_epochs * steps_per_epoch
    if ft.lr_milestone_epochs:
        cfg.train.lr_milestones = [e * steps_per_epoch for e in ft.lr_milestone_epochs]
    cfg.validate()
    return datasets, mcfg, steps_per_epoch


def _check_eval_modes(modes: list[str], arch: str) -> None:
    if modes and arch != "cavmae":
        raise ConfigError(f"finetune.eval_modes {modes}: only CAV-MAE has test modes; this model is {arch}")
    unknown = [m for m in modes if m not in CAVMAEFinetune.MODES]
    if unknown:
        raise ConfigError(
            f"finetune.eval_modes: unknown mode(s) {unknown}; expected some of {', '.join(CAVMAEFinetune.MODES)}"
        )


def _save(fold: FoldRun) -> None:
    """Collective: the fold's checkpoint; those finetune.weight_average needs outlive the
    train.keep_checkpoints newest."""
    wa = fold.cfg.finetune.weight_average
    save_checkpoint(
        fold.engine,
        fold.run.path,
        fold.state.step,
        vars(fold.state),
        fold.cfg.train.keep_checkpoints,
        keep_also=keeps_for_average(wa) if wa else None,
    )


def _start(
    cfg: Config,
    task: Task,
    pretrained: Converted | None,
    splits: dict[str, list[DownstreamItem]],
    run: RunDir,
    resume: str,
    allow_config_change: bool,
    world_size: int,
):
    """(engine, state, load report): the model from the pretrained weights, or the fold's newest
    checkpoint that verifies, restored (refused when written on another config or other splits)."""
    seed_everything(cfg.train.seed)
    model, groups, load_report = build_finetune(cfg, task, pretrained)
    engine = build_engine(model, cfg, world_size, groups=groups)
    state = FoldState(config_hash=cfg.hash(finetune=True), world_size=world_size, **split_set_identity(splits))
    refuse_existing(run.path, resume)
    ckpt = resume_checkpoint(run.path)  # verified; removes what interrupted saves left
    if ckpt is not None:
        state = restore(engine, ckpt, state, run.path, allow_config_change)
        log.info("resumed from %s at epoch %d, batch %d", ckpt, state.epoch, state.batch_in_epoch)
    return engine, state, load_report


def _open_run(
    cfg: Config,
    run: RunDir,
    tracking_uri: str | None,
    rank0: bool,
    state: FoldState,
    params: dict,
    tags: dict | None,
    parent_run_id: str | None,
) -> Tracker:
    """The fold's MLflow run (nested under the protocol's); a new one gets tags, params, config."""
    tracker, _ = open_tracker(cfg, run.path, tracking_uri, rank0, state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    if rank0:
        run.config.write_text(cfg.to_yaml())
        if state.step == 0:
            tracker.set_tags({**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
            tracker.log_params({**cfg.flat(), **params})
            tracker.log_artifact(run.config)
    return tracker


def _fold_params(splits: dict[str, list[DownstreamItem]], task: Task, load_report: dict, mcfg) -> dict[str, Any]:
    """The fold's MLflow params besides the config."""
    return {
        "task": task.kind,
        "num_outputs": task.num_outputs,
        "train_clips": len(splits["train"]),
        "val_clips": len(splits["val"]),
        "test_clips": len(splits["test"]),
        "pretrained_tensors": load_report["loaded"],
        "model_arch": mcfg.arch,
        "model_width": mcfg.width,
    }


# --- the epochs ------------------------------------------------------------------------------------


def _batch_source(fold: FoldRun, batches):
    """(next_batch, forward) for train_step over one epoch's batches: mixing on the host, then
    the copy and cast on the device. The mixing stream is a function of (seed, step, rank,
    micro-batch), so a resumed epoch mixes as the uninterrupted one would."""
    cfg, task, state, engine = fold.cfg, fold.task, fold.state, fold.engine
    k, device, dtype = cfg.train.grad_accum, engine.device, fold.dtype
    micro = 0

    def next_batch():
        nonlocal micro
        micro += 1
        state.batch_in_epoch += 1
        return micro - 1, next(batches)

    def forward(item):
        i, b = item
        rng = np.random.default_rng([cfg.train.seed, state.step, fold.rank] + ([i % k] if i % k else []))
        video, audio, label = b["video"], b["audio"], b["label"]
        if task.regression:
            target = label
        else:
            video, audio, target = mix_batch(video, audio, label, task.num_outputs, cfg.finetune, rng)
        out = engine(*(x.to(device, non_blocking=True).to(dtype) for x in (video, audio)))
        return {"loss": task_loss(out, target.to(device, non_blocking=True), task, cfg.finetune)}

    return next_batch, forward


def train_epoch(fold: FoldRun, epoch: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the epoch's history row, None), or (None, why) when a stop was requested (checkpoint saved)."""
    cfg, state, engine, k = fold.cfg, fold.state, fold.engine, fold.cfg.train.grad_accum
    fold.datasets["train"].set_epoch(epoch)
    # batch_in_epoch counts micro-batches: a resume skips them unread
    sampler = EpochBatches(
        len(fold.datasets["train"]),
        cfg.data.batch_size,
        fold.rank,
        fold.world_size,
        cfg.train.seed,
        epoch,
        state.batch_in_epoch,
        weights=fold.weights,
    )
    next_batch, forward = _batch_source(fold, iter(make_loader(fold.datasets["train"], cfg, batch_sampler=sampler)))
    # the epoch's and the log window's loss sums, on the device: read once per window
    epoch_loss, window_loss, epoch_n, window_n, start = 0.0, 0.0, 0, 0, time.perf_counter()
    for _ in range(len(sampler) // k):
        result, lr = scheduled_step(engine, cfg.train, state.step, fold.batch, next_batch, forward, stop_requested())
        if result.nonfinite:  # refused on every rank; the epoch goes on with the next batches
            state.nonfinite_skipped += 1
            log.warning("step %d: non-finite loss or gradient on some rank, batch skipped on all", state.step)
        else:
            epoch_loss, window_loss = epoch_loss + result.parts[0], window_loss + result.parts[0]
            epoch_n, window_n = epoch_n + 1, window_n + 1
        state.step += 1
        fold.reporter.update(1)
        if state.step % cfg.train.log_every == 0 and window_n:
            mean = float(window_loss / window_n)  # the window's one host read
            if fold.rank0:
                fold.tracker.log_metrics(state.step, {"train_loss": mean, "lr": lr})
            fold.reporter.window(state.step, {"train_loss": mean, "lr": lr})
            window_loss, window_n = 0.0, 0
        if result.stop:
            interrupted = why_stopped()
            _save(fold)
            log.warning("stopping in epoch %d at step %d (%s); checkpoint saved", epoch, state.step, interrupted)
            return None, interrupted
    return {
        "epoch": epoch,
        "step": state.step,
        "train_loss": float(epoch_loss / epoch_n) if epoch_n else None,
        "epoch_s": time.perf_counter() - start,
    }, None


def validate(fold: FoldRun, epoch: int, row: dict[str, Any]) -> None:
    """Rank 0, every eval_every epochs and after the last: the validation metrics into `row`,
    the weights kept when the selecting metric improves; the selection shared with every rank."""
    cfg, task, state, engine = fold.cfg, fold.task, fold.state, fold.engine
    ft = cfg.finetune
    last = epoch == ft.epochs - 1
    if fold.rank0 and ((epoch + 1) % ft.eval_every == 0 or last):
        t, o, _ = predict(
            engine.module,
            make_loader(fold.datasets["val"], cfg, batch_size=cfg.data.batch_size),
            task,
            engine.device,
            fold.dtype,
            fold.eval_bars,
            desc="val",
        )
        val = score(t, o, task)
        row.update({f"val_{k}": v for k, v in val.items()})
        if val[task.select_metric] > state.best_score:
            state.best_score, state.best_epoch = val[task.select_metric], epoch
            _save_weights(engine.module, fold.run.best_weights)
        fold.tracker.log_metrics(epoch + 1, {k: v for k, v in row.items() if v is not None and k != "epoch"})
        fold.tracker.flush()
        fold.reporter.window(state.step, {f"val_{task.select_metric}": val[task.select_metric]})
    state.best_epoch, state.best_score = _broadcast_best(state.best_epoch, state.best_score, engine.device)


def _finish(fold: FoldRun, history: list[dict[str, Any]], load_report: dict, val_split: str) -> dict[str, Any]:
    """Rank 0: the weight average (finetune.weight_average), the test pass, results.json, the
    confusion plots to MLflow; the run FINISHED."""
    ft, tracker, run = fold.cfg.finetune, fold.tracker, fold.run
    if ft.weight_average:
        write_average(run, ft.weight_average)
    results = test_pass(
        fold.engine.module,
        fold.datasets["test"],
        fold.cfg,
        fold.task,
        run,
        fold.engine.device,
        fold.dtype,
        fold.state.best_epoch,
        fold.state.best_score,
        fold.eval_bars,
    )
    results.update(
        fold_dir=str(run.path.resolve()),
        mlflow_run_id=tracker.run_id,
        load_report=load_report,
        val_split=val_split,
        epochs=ft.epochs,
        history=history,
    )
    tracker.log_metrics(
        ft.epochs,
        {
            f"test_{which}_{k}": v
            for which in results["selections"]
            for k, v in results[which].items()
            if k != "confusion"
        },
    )
    for png in run.confusion_plots():
        tracker.log_artifact(png)
    write_json_atomic(run.results, results)
    tracker.log_artifact(run.results)
    tracker.finish("FINISHED")
    return results


def finetune_fold(
    cfg: Config,
    splits: dict[str, list[DownstreamItem]],
    run_dir: Path,
    *,
    pretrained: Converted | None,
    task: Task | None = None,
    resume: str = "auto",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    val_split: str = "",
    progress: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Fine-tune on splits['train'], select on splits['val'], test on splits['test'] (module
    docstring). Returns the fold's results (also written to run_dir/results.json)."""
    dist_env = comm.init_distributed()
    rank0, ft = dist_env.rank == 0, cfg.finetune
    run = RunDir(run_dir).create()
    check_attention_backend(cfg.execution)  # before the engine set-up
    task = task or resolve_task(cfg)
    datasets, mcfg, steps_per_epoch = _prepare(cfg, splits, task, pretrained, dist_env.world_size)
    engine, state, load_report = _start(
        cfg, task, pretrained, splits, run, resume, allow_config_change, dist_env.world_size
    )
    # config.yaml and the params record the model trained (the pretrained weights' sizes); the hash
    # stays the requested config's, so runs written before this keep resuming
    tracker = _open_run(
        dataclasses.replace(cfg, model=mcfg),
        run,
        tracking_uri,
        rank0,
        state,
        _fold_params(splits, task, load_report, mcfg),
        tags,
        parent_run_id,
    )
    log.info(
        "fine-tuning %s (%s, %d outputs): %d train / %d val / %d test clips, %d epochs x %d steps, "
        "pretrained tensors loaded: %s",
        mcfg.arch,
        task.kind,
        task.num_outputs,
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        ft.epochs,
        steps_per_epoch,
        load_report,
    )
    history = json.loads(run.history.read_text()) if rank0 and run.history.exists() else []
    history = [h for h in history if h["epoch"] < state.epoch]  # epochs finished before the checkpoint
    reporter = Progress(cfg.train.steps, state.step, f"finetune {run.name}", enabled=rank0, bar=progress)
    weights = sampling_weights(splits["train"], task) if ft.balanced_sampling else None
    if weights is not None:
        log.info(
            "balanced sampling: clip weights %.3g .. %.3g, drawn with replacement each epoch",
            float(weights.min()),
            float(weights.max()),
        )
    fold = FoldRun(
        cfg,
        task,
        run,
        engine,
        state,
        datasets,
        tracker,
        reporter,
        dist_env.rank,
        dist_env.world_size,
        global_batch(cfg, dist_env.world_size),
        weights,
    )
    interrupted = None
    try:
        while state.epoch < ft.epochs and interrupted is None:
            row, interrupted = train_epoch(fold, state.epoch)
            if interrupted:
                break
            validate(fold, state.epoch, row)
            if rank0:
                history.append(row)
                run.history.write_text(json.dumps(history, indent=1))
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            _save(fold)
    except BaseException as err:
        tracker.finish(end_status(err))
        raise
    finally:
        clear_stop()
        reporter.close()
    if interrupted:
        tracker.finish("KILLED")  # a resume (a requeued job) sets it RUNNING again
        return {"interrupted": interrupted, "run_dir": str(run.path), "epoch": state.epoch}
    return _finish_agreed(fold, history, load_report, val_split)


def _finish_agreed(fold: FoldRun, history: list[dict[str, Any]], load_report: dict, val_split: str) -> dict[str, Any]:
    """_finish on rank 0, its outcome agreed by all ranks: a failure there (a missing checkpoint
    for the average, a full disk) ends every rank with an error instead of leaving the others
    waiting at a barrier until the collective timeout."""
    results, failure = {}, None
    if fold.rank0:
        try:
            results = _finish(fold, history, load_report, val_split)
        except Exception as err:  # raised below, after the other ranks have heard of it
            failure = err
    if comm.agree([failure is not None], fold.engine.device)[0]:
        if failure is not None:
            raise failure
        raise RuntimeError("rank 0 failed to finish the fold (its log says why)")
    return results
