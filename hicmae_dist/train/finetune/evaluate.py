"""Evaluation of a fine-tuned model: predictions over a split (multi-view averaged), their
metrics, and the test pass with the last, the validation-selected and the averaged weights, in
the training mode and the requested CAV-MAE eval modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hicmae_dist.config import Config
from hicmae_dist.eval import metrics as M
from hicmae_dist.train.finetune.sampling import make_loader
from hicmae_dist.train.finetune.task import Task
from hicmae_dist.train.rundir import RunDir


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader,
    task: Task,
    device,
    dtype,
    progress: bool = False,
    desc: str = "eval",
    mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(targets, outputs, keys) over a val/test loader: class probabilities (N, K) (softmax, or
    per-class sigmoids for a multi-label task) or regression outputs (N, D), averaged over the
    views of multi-view (test) samples (the release averages the sigmoids of its 10 frames).
    mode: a CAV-MAE mode other than the model's own (None: its own)."""
    was_training = model.training
    model.eval()
    targets, outputs, keys = [], [], []
    for b in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        video, audio = b["video"], b["audio"]
        multi = audio.dim() == 5  # (B, V, 1, T, F): test views
        if multi:
            n, views = video.shape[:2]
            video, audio = video.flatten(0, 1), audio.flatten(0, 1)
        inputs = (video.to(device, dtype), audio.to(device, dtype))
        out = (model(*inputs) if mode is None else model(*inputs, mode)).float()
        out = out if task.regression else out.sigmoid() if task.multilabel else out.softmax(dim=-1)
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
    if task.multilabel:
        return M.multilabel_metrics(targets, outputs)
    return M.classification_metrics(targets, outputs)


def test_pass(
    model: torch.nn.Module,
    dataset,
    cfg: Config,
    task: Task,
    run: RunDir,
    device,
    dtype,
    best_epoch: int,
    best_score: float,
    progress: bool,
) -> dict[str, Any]:
    """The test split with each set of weights: the last, the validation-selected ones
    (run.best_weights, of epoch best_epoch) and with finetune.weight_average the averaged ones
    (run.averaged_weights); each in the training mode, then in every finetune.eval_modes mode.
    out[selection] per pass, selections listed in out["selections"]: "last", "best", "averaged",
    with "_<mode>" appended for an eval mode (e.g. "best_audio_missing_video")."""
    ft = cfg.finetune
    loader = make_loader(dataset, cfg, batch_size=max(1, cfg.data.batch_size // max(1, dataset.num_views)))
    out: dict[str, Any] = {
        "best_epoch": best_epoch,
        "best_val": best_score,
        "select_metric": task.select_metric,
        "test_views": dataset.num_views,
        "selections": [],
    }
    weights = {"last": None, "best": run.best_weights}
    if ft.weight_average:
        weights["averaged"] = run.averaged_weights
        out["averaged_epochs"] = list(ft.weight_average)
    modes = [None] + [m for m in ft.eval_modes if m != ft.mode]  # the training mode's pass is the plain one
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for which, path in weights.items():
        if path is not None:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        for mode in modes:
            name = which if mode is None else f"{which}_{mode}"
            t, o, keys = predict(model, loader, task, device, dtype, progress, desc=f"test ({name})", mode=mode)
            out[name] = score(t, o, task)
            if task.kind == "classification":
                cm = M.confusion_matrix(t, o, task.num_outputs)
                out[name]["confusion"] = cm.tolist()
                title = f"{run.name} test, {which} weights" + (f", {mode} mode" if mode else "")
                M.plot_confusion(cm, task.names, run.confusion_plot(name), title)
            write_predictions(run.predictions(name), keys, t, o)
            out["selections"].append(name)
    model.load_state_dict(last)
    return out


def write_predictions(path: Path, keys: list[str], targets: np.ndarray, outputs: np.ndarray) -> None:
    lines = ["key,target,output"]
    for k, t, o in zip(keys, targets, outputs):
        lines.append(f"{k},{' '.join(f'{x:.6g}' for x in np.atleast_1d(t))},{' '.join(f'{x:.6g}' for x in o)}")
    path.write_text("\n".join(lines) + "\n")
