"""Fine-tuning and its evaluation protocol (SPEC.md 1 'Fine-tuning model', SPEC.md 2 'Fine-tune').

    finetune_fold   one fold: the DeepSpeed engine over the training split, validation every
                    `finetune.eval_every` epochs, the best validation epoch's weights kept, then
                    the test split evaluated once with the last and once with the selected
                    weights (multi-view: probabilities averaged over chunks x crops)
    run_protocol    every fold of a k-fold / leave-one-session-out protocol in its own run
                    directory and MLflow run (nested under one protocol run), then the table of
                    per-fold results with mean and std per metric

Unlike the releases (which pick the best epoch on the test fold), the selecting split is never
the test split: val.csv when the fold has one, else subjects carved from training
(data.downstream.load_fold), checked disjoint from test clip by clip.

Checkpoints are the pretraining ones (atomic, `--resume auto`, RNG per rank) and carry the
epoch and the position inside it, so a killed fold resumes at the batch it stopped at; a fold
whose results.json exists is done and skipped. Evaluation runs on rank 0 (ZeRO 0-2 keep the
whole model on every rank; stage 3 is refused: fine-tuning models fit one GPU).
"""
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
import torch.nn.functional as F
from tqdm import tqdm

from hicmae_dist import comm
from hicmae_dist.config import Config, ConfigError, ModelConfig
from hicmae_dist.data.downstream import (DEFAULT_SUBJECT, DownstreamDataset, DownstreamItem, count_folds, load_fold,
                                         subject_of)
from hicmae_dist.eval import metrics as M
from hicmae_dist.eval.datasets import DatasetPreset, get_dataset
from hicmae_dist.models import build_finetune_model, get_spec
from hicmae_dist.models.convert import Converted
from hicmae_dist.tracking import Tracker, default_uri, end_status
from hicmae_dist.train.checkpoint import latest_tag, resume_checkpoint, save_checkpoint
from hicmae_dist.train.engine import build_engine, global_batch, set_lr
from hicmae_dist.train.pretrain import (ResumeError, clear_stop, open_tracker, restore, seed_everything,
                                        stop_reason, stop_requested)
from hicmae_dist.train.progress import Progress
from hicmae_dist.train.schedule import lr_at
from hicmae_dist.train.step import train_step

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
BEST_WEIGHTS = "best.pth"


# --- what the fold trains: task, model, pretrained weights ------------------------------------------

@dataclass(frozen=True)
class Task:
    kind: str  # "classification" | "regression"
    num_outputs: int
    names: tuple[str, ...]  # class names or regression dimensions
    select_metric: str  # validation metric that picks the epoch (higher is better)
    report: tuple[str, ...]  # metrics of the results table
    subject: str | None  # subject-id pattern for carving validation
    paper: dict[str, float]

    @property
    def regression(self) -> bool:
        return self.kind == "regression"


def resolve_task(cfg: Config) -> Task:
    """From the dataset preset (finetune.dataset) or finetune.task / num_outputs."""
    ft = cfg.finetune
    preset: DatasetPreset | None = get_dataset(ft.dataset) if ft.dataset else None
    kind = preset.task if preset else ft.task
    names = (preset.classes if kind == "classification" else preset.dimensions) if preset else ()
    num = ft.num_outputs or len(names)
    if num < 1:
        raise ConfigError("finetune.num_outputs: expected the number of classes (or regression dimensions) "
                          "when finetune.dataset is not set")
    if names and num != len(names):
        raise ConfigError(f"finetune.num_outputs: {num}, but dataset {ft.dataset} has {len(names)}")
    names = names or tuple(str(i) if kind == "classification" else f"d{i}" for i in range(num))
    report = preset.metrics if preset else (("uar", "war", "weighted_f1") if kind == "classification"
                                            else ("ccc", "pcc"))
    select = ft.select_metric or report[0]
    return Task(kind, num, tuple(names), select, tuple(report), preset.subject if preset else DEFAULT_SUBJECT,
                dict(preset.paper) if preset else {})


def finetune_model_config(cfg: Config, pretrained: Converted | None) -> ModelConfig:
    """The architecture of the pretrained weights (or cfg.model from scratch) with this run's
    drop path (the execution settings are the run's: cfg.execution)."""
    if pretrained is None:
        return cfg.model
    return dataclasses.replace(pretrained.cfg, drop_path=cfg.model.drop_path)


# Fine-tune tensors the pretraining model does not have: initialised here, never loaded.
_FRESH = ("head.", "head_norm.", "video_layer_weights", "audio_layer_weights")


def load_encoder_weights(model: torch.nn.Module, pretrained: Converted) -> dict[str, int]:
    """Copy every tensor of `pretrained` the fine-tuning model has (same name and shape); the
    decoders are dropped, the head is left to its init. A head of another class count (from a
    fine-tuned checkpoint) is re-initialised. Raises if any backbone tensor stays unloaded."""
    own = model.state_dict()
    take = {k: v for k, v in pretrained.state_dict.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in take]
    backbone_missing = [k for k in missing if not k.startswith(_FRESH)]
    if backbone_missing:
        raise ValueError(f"the pretrained weights ({pretrained.arch} {pretrained.kind}) lack {len(backbone_missing)} "
                         f"backbone tensors of the fine-tuning model, e.g. {backbone_missing[:5]}: "
                         f"another architecture or size?")
    model.load_state_dict(take, strict=False)
    return {"loaded": len(take), "initialised": len(missing), "dropped": len(pretrained.state_dict) - len(take)}


def build_finetune(cfg: Config, task: Task, pretrained: Converted | None) -> tuple[torch.nn.Module, list[dict], dict]:
    """(model, optimiser groups, load report)."""
    mcfg = finetune_model_config(cfg, pretrained)
    spec = get_spec(mcfg.arch)
    model = build_finetune_model(mcfg, task.num_outputs, cfg.execution, **spec.finetune_kwargs(cfg.finetune))
    report = load_encoder_weights(model, pretrained) if pretrained is not None else {"loaded": 0}
    groups = spec.finetune_param_groups(model, cfg.train.weight_decay, cfg.finetune)
    return model, [g for g in groups if g["params"]], report


# --- mixing and losses ----------------------------------------------------------------------------------

def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off).scatter_(1, labels[:, None].cpu(), 1.0 - smoothing + off)


def _cut_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of area (1 - lam) h w centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mix_batch(video: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor, num_classes: int, ft, rng):
    """Mixup / CutMix (timm's 'batch' mode) with label smoothing, one lambda for both
    modalities: every clip is mixed with the clip at the mirrored batch position.

    video (B, 3, T, H, W) or (B, 3, H, W); audio (B, 1, T_a, F); labels (B,) int64.
    Mixup blends both inputs with lambda. CutMix pastes a spatial box into the video (every
    frame) and a time span of the same fraction into the audio (all mel bins: the fraction is
    exact to one frame, where a second box would be clipped differently). With
    ft.mix_video_only (the release) the audio is left alone. Returns (video, audio, soft
    targets (B, K)); the inputs are modified in place.
    """
    targets = smooth_one_hot(labels, num_classes, ft.label_smoothing)
    use_mixup, use_cutmix = ft.mixup > 0, ft.cutmix > 0
    if not (use_mixup or use_cutmix) or rng.random() >= ft.mix_prob:
        return video, audio, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < ft.switch_prob)
    lam = float(rng.beta(ft.cutmix, ft.cutmix) if cutmix else rng.beta(ft.mixup, ft.mixup))
    if cutmix:
        h, w = video.shape[-2:]
        y0, y1, x0, x1 = _cut_box(h, w, lam, rng)
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        if not ft.mix_video_only:
            frames = audio.shape[-2]
            span = round((1.0 - lam) * frames)
            start = int(rng.integers(0, frames - span + 1))
            audio[..., start:start + span, :] = audio.flip(0)[..., start:start + span, :]
    else:
        partner = video.flip(0)  # a copy, taken before the in-place blend
        video.mul_(lam).add_(partner, alpha=1.0 - lam)
        if not ft.mix_video_only:
            partner = audio.flip(0)
            audio.mul_(lam).add_(partner, alpha=1.0 - lam)
    return video, audio, lam * targets + (1.0 - lam) * targets.flip(0)


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Lin's CCC (population moments), averaged over the dimensions; (B, D) inputs."""
    pm, tm = pred.mean(0), target.mean(0)
    cov = ((pred - pm) * (target - tm)).mean(0)
    ccc = 2 * cov / (pred.var(0, unbiased=False) + target.var(0, unbiased=False) + (pm - tm) ** 2 + 1e-8)
    return 1.0 - ccc.mean()


def task_loss(output: torch.Tensor, target: torch.Tensor, task: Task, ft) -> torch.Tensor:
    """Classification: cross-entropy against soft targets (B, K); regression: MSE or 1 - CCC."""
    if not task.regression:
        return torch.sum(-target * F.log_softmax(output.float(), dim=-1), dim=-1).mean()
    if ft.regression_loss == "ccc":
        return ccc_loss(output.float(), target)
    return F.mse_loss(output.float(), target)


# --- batches -------------------------------------------------------------------------------------

class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch for one rank: a permutation seeded by (seed, epoch), whole global
    batches only, rank r takes rows r, r + W, ... of each; `start` skips batches already
    trained (a resume inside an epoch), without reading them."""

    def __init__(self, size: int, batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.size, self.batch, self.rank, self.world = size, batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.size // (self.batch * self.world) - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        per_step = self.batch * self.world
        for b in range(self.start, self.size // per_step):
            rows = order[b * per_step:(b + 1) * per_step]
            yield rows[self.rank::self.world].tolist()


def _loader(dataset, cfg: Config, batch_sampler=None, batch_size: int = 1):
    """Training: batch_sampler (EpochBatches); evaluation: every clip in order."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(dataset, **batching, num_workers=cfg.data.num_workers,
                                       pin_memory=torch.cuda.is_available())


@torch.no_grad()
def predict(model: torch.nn.Module, loader, task: Task, device, dtype, progress: bool = False,
            desc: str = "eval") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(targets, outputs, keys) over a val/test loader: class probabilities (N, K) or regression
    outputs (N, D), averaged over the views of multi-view (test) samples."""
    was_training = model.training
    model.eval()
    targets, outputs, keys = [], [], []
    for b in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        video, audio = b["video"], b["audio"]
        multi = audio.dim() == 5  # (B, V, 1, T, F): test views
        if multi:
            n, views = video.shape[:2]
            video, audio = video.flatten(0, 1), audio.flatten(0, 1)
        out = model(video.to(device, dtype), audio.to(device, dtype)).float()
        out = out if task.regression else out.softmax(dim=-1)
        if multi:
            out = out.view(n, views, -1).mean(dim=1)
        outputs.append(out.cpu())
        targets.append(b["label"])
        keys += list(b["key"])
    model.train(was_training)
    return torch.cat(targets).numpy(), torch.cat(outputs).numpy(), keys


def score(targets: np.ndarray, outputs: np.ndarray, task: Task) -> dict[str, float]:
    if task.regression:
        return M.regression_metrics(targets, outputs, task.names)
    return M.classification_metrics(targets, outputs)


# --- one fold --------------------------------------------------------------------------------------------

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


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def finetune_fold(cfg: Config, splits: dict[str, list[DownstreamItem]], run_dir: Path, *,
                  pretrained: Converted | None, task: Task | None = None, resume: str = "auto",
                  tracking_uri: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                  val_split: str = "", progress: bool = True, allow_config_change: bool = False) -> dict[str, Any]:
    """Fine-tune on splits['train'], select on splits['val'], test on splits['test'] (module
    docstring). Returns the fold's results (also written to run_dir/results.json)."""
    dist_env = comm.init_distributed()
    rank0 = dist_env.rank == 0
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = task or resolve_task(cfg)
    ft = cfg.finetune
    if cfg.train.zero_stage == 3:
        raise ConfigError("train.zero_stage: fine-tuning supports stages 0-2 (evaluation needs the whole model "
                          "on rank 0; the fine-tuning models fit one GPU)")
    mcfg = finetune_model_config(cfg, pretrained)
    datasets = {name: DownstreamDataset(items, mcfg, name, regression=task.regression, seed=cfg.train.seed,
                                        test_num_segment=ft.test_num_segment, test_num_crop=ft.test_num_crop,
                                        crop_scale=(ft.crop_scale_min, 1.0))
                for name, items in splits.items()}
    batch = global_batch(cfg, dist_env.world_size)
    steps_per_epoch = len(datasets["train"]) // batch
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size: {len(datasets['train'])} training clips make no whole global batch of "
                          f"{batch}; lower data.batch_size")
    if not task.regression and any(not 0 <= i.label[0] < task.num_outputs for i in splits["train"]):
        raise ValueError(f"training labels outside [0, {task.num_outputs}): finetune.num_outputs or the dataset "
                         f"preset does not match the annotation files")
    cfg.train.steps = ft.epochs * steps_per_epoch
    cfg.train.warmup_steps = ft.warmup_epochs * steps_per_epoch
    cfg.validate()

    seed_everything(cfg.train.seed)
    model, groups, load_report = build_finetune(cfg, task, pretrained)
    engine = build_engine(model, cfg, dist_env.world_size, groups=groups)
    state = FoldState(config_hash=cfg.hash(finetune=True), world_size=dist_env.world_size)
    if resume == "never" and latest_tag(run_dir) is not None:
        raise ResumeError(f"{run_dir} already holds checkpoint {latest_tag(run_dir)}; use --resume auto or a new "
                          f"--run-dir")
    ckpt = resume_checkpoint(run_dir)  # verified; removes what interrupted saves left
    if ckpt is not None:
        state = restore(engine, ckpt, state, run_dir, allow_config_change)
        log.info("resumed from %s at epoch %d, batch %d", ckpt, state.epoch, state.batch_in_epoch)

    tracker, _ = open_tracker(cfg, run_dir, tracking_uri, rank0, state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    if rank0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if state.step == 0:
            tracker.set_tags({**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
            tracker.log_params({**cfg.flat(), "task": task.kind, "num_outputs": task.num_outputs,
                                "train_clips": len(splits["train"]), "val_clips": len(splits["val"]),
                                "test_clips": len(splits["test"]), "pretrained_tensors": load_report["loaded"],
                                "model_arch": mcfg.arch, "model_width": mcfg.width})
            tracker.log_artifact(run_dir / "config.yaml")
    log.info("fine-tuning %s (%s, %d outputs): %d train / %d val / %d test clips, %d epochs x %d steps, "
             "pretrained tensors loaded: %s", mcfg.arch, task.kind, task.num_outputs, len(splits["train"]),
             len(splits["val"]), len(splits["test"]), ft.epochs, steps_per_epoch, load_report)

    device = engine.device
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32
    history = json.loads((run_dir / "history.json").read_text()) if rank0 and (run_dir / "history.json").exists() \
        else []
    history = [h for h in history if h["epoch"] < state.epoch]  # epochs finished before the checkpoint
    reporter = Progress(cfg.train.steps, state.step, f"finetune {run_dir.name}", enabled=rank0, bar=progress)
    progress = reporter.tty  # evaluation bars only where the training bar is drawn
    k = cfg.train.grad_accum
    interrupted = None
    try:
        while state.epoch < ft.epochs and interrupted is None:
            epoch = state.epoch
            datasets["train"].set_epoch(epoch)
            # batch_in_epoch counts micro-batches: a resume skips them unread
            sampler = EpochBatches(len(datasets["train"]), cfg.data.batch_size, dist_env.rank,
                                   dist_env.world_size, cfg.train.seed, epoch, state.batch_in_epoch)
            batches = iter(_loader(datasets["train"], cfg, batch_sampler=sampler))
            # the epoch's and the log window's loss sums, on the device: read once per window
            epoch_loss, window_loss, epoch_n, window_n, start = 0.0, 0.0, 0, 0, time.perf_counter()
            micro = 0

            def next_batch():
                nonlocal micro
                micro += 1
                state.batch_in_epoch += 1
                return micro - 1, next(batches)

            def forward(item):
                i, b = item
                rng = np.random.default_rng([cfg.train.seed, state.step, dist_env.rank] + ([i % k] if i % k else []))
                video, audio, label = b["video"], b["audio"], b["label"]
                if task.regression:
                    target = label
                else:
                    video, audio, target = mix_batch(video, audio, label, task.num_outputs, ft, rng)
                out = engine(*(x.to(device, non_blocking=True).to(dtype) for x in (video, audio)))
                return {"loss": task_loss(out, target.to(device, non_blocking=True), task, ft)}

            for _ in range(len(sampler) // k):
                lr = lr_at(state.step, cfg.train, batch)
                set_lr(engine.optimizer, lr)
                result = train_step(engine, k, next_batch, forward, stop_requested(),
                                    check_gradients=not cfg.train.fp16)
                if result.nonfinite:  # refused on every rank; the epoch goes on with the next batches
                    state.nonfinite_skipped += 1
                    log.warning("step %d: non-finite loss or gradient on some rank, batch skipped on all", state.step)
                else:
                    epoch_loss, window_loss = epoch_loss + result.parts[0], window_loss + result.parts[0]
                    epoch_n, window_n = epoch_n + 1, window_n + 1
                state.step += 1
                reporter.update(1)
                if state.step % cfg.train.log_every == 0 and window_n:
                    mean = float(window_loss / window_n)  # the window's one host read
                    if rank0:
                        tracker.log_metrics(state.step, {"train_loss": mean, "lr": lr})
                    reporter.window(state.step, {"train_loss": mean, "lr": lr})
                    window_loss, window_n = 0.0, 0
                if result.stop:
                    interrupted = stop_reason() if stop_requested() else "stop requested on another rank"
                    save_checkpoint(engine, run_dir, state.step, vars(state), cfg.train.keep_checkpoints)
                    log.warning("stopping in epoch %d at step %d (%s); checkpoint saved", epoch, state.step,
                                interrupted)
                    break
            if interrupted:
                break
            row = {"epoch": epoch, "step": state.step, "train_loss": float(epoch_loss / epoch_n) if epoch_n else None,
                   "epoch_s": time.perf_counter() - start}
            last = epoch == ft.epochs - 1
            if rank0 and ((epoch + 1) % ft.eval_every == 0 or last):
                t, o, _ = predict(engine.module, _loader(datasets["val"], cfg, batch_size=cfg.data.batch_size), task,
                                  device, dtype, progress, desc="val")
                val = score(t, o, task)
                row.update({f"val_{k}": v for k, v in val.items()})
                if val[task.select_metric] > state.best_score:
                    state.best_score, state.best_epoch = val[task.select_metric], epoch
                    _save_weights(engine.module, run_dir / BEST_WEIGHTS)
                tracker.log_metrics(epoch + 1, {k: v for k, v in row.items() if v is not None and k != "epoch"})
                tracker.flush()
                reporter.window(state.step, {f"val_{task.select_metric}": val[task.select_metric]})
            state.best_epoch, state.best_score = _broadcast_best(state.best_epoch, state.best_score, device)
            if rank0:
                history.append(row)
                (run_dir / "history.json").write_text(json.dumps(history, indent=1))
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            save_checkpoint(engine, run_dir, state.step, vars(state), cfg.train.keep_checkpoints)
    except BaseException as err:
        tracker.finish(end_status(err))
        raise
    finally:
        clear_stop()
        reporter.close()
    if interrupted:
        tracker.finish("KILLED")  # a resume (a requeued job) sets it RUNNING again
        return {"interrupted": interrupted, "run_dir": str(run_dir), "epoch": state.epoch}

    results: dict[str, Any] = {}
    if rank0:
        results = _test(engine.module, datasets["test"], cfg, task, run_dir, device, dtype, state, progress)
        results.update(fold_dir=str(run_dir.resolve()), mlflow_run_id=tracker.run_id, load_report=load_report,
                       val_split=val_split, epochs=ft.epochs, history=history)
        tracker.log_metrics(ft.epochs, {f"test_{which}_{k}": v for which in ("last", "best")
                                        for k, v in results[which].items() if k != "confusion"})
        for png in sorted(run_dir.glob("confusion_*.png")):
            tracker.log_artifact(png)
        _atomic_json(run_dir / RESULTS_FILE, results)
        tracker.log_artifact(run_dir / RESULTS_FILE)
        tracker.finish("FINISHED")
    comm.barrier()
    return results


def _broadcast_best(epoch: int, best: float, device) -> tuple[int, float]:
    """Rank 0 validates; every rank keeps the same selection state in its checkpoint."""
    epoch_f, best = comm.broadcast_values([epoch, best], src=0, device=device)
    return int(epoch_f), best


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _test(model: torch.nn.Module, dataset, cfg: Config, task: Task, run_dir: Path, device, dtype,
          state: FoldState, progress: bool) -> dict[str, Any]:
    """The test split, once with the last weights, once with the validation-selected ones."""
    loader = _loader(dataset, cfg, batch_size=max(1, cfg.data.batch_size // max(1, dataset.num_views)))
    out: dict[str, Any] = {"best_epoch": state.best_epoch, "best_val": state.best_score,
                           "select_metric": task.select_metric, "test_views": dataset.num_views}
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for which in ("last", "best"):
        if which == "best":
            model.load_state_dict(torch.load(run_dir / BEST_WEIGHTS, map_location="cpu", weights_only=True))
        t, o, keys = predict(model, loader, task, device, dtype, progress, desc=f"test ({which})")
        out[which] = score(t, o, task)
        if not task.regression:
            cm = M.confusion_matrix(t, o, task.num_outputs)
            out[which]["confusion"] = cm.tolist()
            M.plot_confusion(cm, task.names, run_dir / f"confusion_{which}.png",
                             f"{run_dir.name} test, {which} epoch")
        _write_predictions(run_dir / f"predictions_{which}.csv", keys, t, o)
    model.load_state_dict(last)
    return out


def _write_predictions(path: Path, keys: list[str], targets: np.ndarray, outputs: np.ndarray) -> None:
    lines = ["key,target,output"]
    for k, t, o in zip(keys, targets, outputs):
        lines.append(f"{k},{' '.join(f'{x:.6g}' for x in np.atleast_1d(t))},{' '.join(f'{x:.6g}' for x in o)}")
    path.write_text("\n".join(lines) + "\n")


# --- the protocol --------------------------------------------------------------------------------

def run_protocol(cfg: Config, split_root: Path, folds: list[int], run_dir: Path, *, pretrained: Converted | None,
                 resume: str = "auto", tracking_uri: str | None = None, progress: bool = True,
                 allow_config_change: bool = False) -> dict[str, Any]:
    """Every fold in run_dir/foldNN (done folds skipped), then the table (summary())."""
    dist_env = comm.init_distributed()
    rank0 = dist_env.rank == 0
    task = resolve_task(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    available = count_folds(split_root)
    if available and max(folds) > available:
        raise FileNotFoundError(f"{split_root}: {available} split directories, fold {max(folds)} asked for")
    uri = tracking_uri or cfg.tracking.uri or default_uri(run_dir)
    protocol_file = run_dir / "protocol.json"
    saved = json.loads(protocol_file.read_text()) if protocol_file.exists() else {}
    parent = Tracker(rank0 and cfg.tracking.enabled, uri, cfg.tracking.experiment, run_dir,
                     run_name=cfg.tracking.run_name or run_dir.name, run_id=saved.get("mlflow_run_id"),
                     system_metrics_s=0)
    per_fold = {}
    try:  # from here on every way out ends the protocol run
        if rank0 and not saved:
            parent.set_tags({"protocol": f"{len(folds)} folds", "dataset": cfg.finetune.dataset or "custom"})
            parent.log_params({**cfg.flat(), "folds": ",".join(map(str, folds)), "splits": str(split_root)})
            _atomic_json(protocol_file, {"mlflow_run_id": parent.run_id, "folds": folds, "splits": str(split_root)})
        for fold in folds:
            fold_dir = run_dir / f"fold{fold:02d}"
            done = fold_dir / RESULTS_FILE
            if done.exists():
                log.info("fold %d: done before (%s)", fold, done)
                per_fold[fold] = json.loads(done.read_text())
                continue
            splits, how = load_fold(split_root, fold, regression=task.regression,
                                    val_fraction=cfg.finetune.val_fraction, subject=task.subject, seed=cfg.train.seed)
            log.info("fold %d: validation split: %s", fold, how)
            fold_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train),
                                           tracking=dataclasses.replace(cfg.tracking,
                                                                        run_name=f"{run_dir.name}/fold{fold:02d}"))
            result = finetune_fold(fold_cfg, splits, fold_dir, pretrained=pretrained, task=task, resume=resume,
                                   tracking_uri=uri, parent_run_id=parent.run_id, tags={"fold": str(fold)},
                                   val_split=how, progress=progress, allow_config_change=allow_config_change)
            if result.get("interrupted"):
                parent.finish("KILLED")
                return {"interrupted": result["interrupted"], "fold": fold, "run_dir": str(run_dir),
                        "mlflow_run_id": parent.run_id, "tracking_uri": uri}
            per_fold[fold] = result
    except BaseException as err:
        parent.finish(end_status(err))
        raise
    summary = summarize(per_fold, task)
    summary.update(run_dir=str(run_dir.resolve()), tracking_uri=uri, mlflow_run_id=parent.run_id)
    if rank0:
        table = format_table(summary, task)
        (run_dir / "results.md").write_text(table + "\n")
        _atomic_json(run_dir / "summary.json", summary)
        parent.log_metrics(0, {f"{which}_{k}_{stat}": v for which in ("last", "best")
                               for k, s in summary[which].items() for stat, v in s.items() if stat in ("mean", "std")})
        parent.log_artifact(run_dir / "results.md")
        parent.log_artifact(run_dir / "summary.json")
        parent.finish("FINISHED")
    return summary


def summarize(per_fold: dict[int, dict], task: Task) -> dict[str, Any]:
    """Per metric and selection (last / best): the per-fold values, their mean and std
    (population std, as a spread over the folds; 0 for one fold)."""
    out: dict[str, Any] = {"folds": sorted(per_fold), "select_metric": task.select_metric,
                           "best_epochs": [per_fold[f]["best_epoch"] for f in sorted(per_fold)]}
    for which in ("last", "best"):
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
    for which in ("last", "best"):
        label = "last epoch" if which == "last" else f"best val {summary['select_metric']}"
        for i, fold in enumerate(summary["folds"]):
            vals = " | ".join(f"{100 * summary[which][m]['per_fold'][i]:.2f}" for m in metrics)
            lines.append(f"| {label} | {fold} | {vals} |")
        mean = " | ".join(f"**{100 * summary[which][m]['mean']:.2f} ± {100 * summary[which][m]['std']:.2f}**"
                          for m in metrics)
        lines.append(f"| {label} | mean ± std | {mean} |")
    if task.paper:
        lines.append("| paper (HiCMAE-B) | | " + " | ".join(f"{task.paper[m]:.2f}" if m in task.paper else ""
                                                          for m in metrics) + " |")
    lines.append(f"\nbest epochs per fold (on validation, never on test): {summary['best_epochs']}")
    return "\n".join(lines)
