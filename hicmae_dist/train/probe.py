"""Frozen-encoder evaluations of pretrained weights: audio-visual retrieval and the linear probe.

Retrieval (docs/models.md, CAV-MAE fine-tuning): cosine similarity of mean-pooled single-modality features (HiCMAE: each
encoder's normalised last layer over all tokens; CAV-MAE: the shared block's audio / video
streams with their own norms and final norm_a / norm_v, mean-pooled, then L2-normalised: the
release's forward_feat and src/retrieval.py), R@1/5/10 and median rank in both directions, clip
i's video matching clip i's audio; optionally on a seeded random subset of the clips (the paper's
sizes: PAPER_SUBSETS).
Linear probe: the fine-tuning model's feature (HiCMAE: hierarchical feature fusion with the
initial uniform layer weights; CAV-MAE: the pooled fused tokens) from frozen pretrained
weights, standardised with the training split's statistics; a multinomial logistic regression
(classification) or ridge regression (regression) per L2 strength of a grid, the strength
chosen on the validation split, the test split evaluated once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hicmae_dist.data.downstream import DownstreamDataset, DownstreamItem
from hicmae_dist.eval import metrics as M
from hicmae_dist.models.convert import Converted
from hicmae_dist.train.finetune.evaluate import score
from hicmae_dist.train.finetune.task import Task, build_finetune
from hicmae_dist.train.runtime import seed_everything

log = logging.getLogger(__name__)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# CAV-MAE (ICLR 2023) retrieval subsets: 1,725 AudioSet eval clips and 1,545 VGGSound test clips
# (the paper's retrieval experiments; the release's src/retrieval.py reads them from
# audioset_eval_5_per_class_for_retrieval_cleaned.json and vgg_test_5_per_class_for_retrieval_cleaned.json,
# "5 samples per class" in its README, unreadable clips dropped; VGGSound: 309 x 5 = 1,545). Ours are
# drawn at random, not per class: the same size, not the same clips.
PAPER_SUBSETS = {"audioset": 1725, "vggsound": 1545}


@torch.no_grad()
def _features(
    fn, items: list[DownstreamItem], cfg, batch_size: int, regression: bool, desc: str, progress: bool, workers: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Run fn(video, audio) -> tensor or tuple of tensors over the clips (centre view)."""
    dataset = DownstreamDataset(items, cfg, "val", regression=regression)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    outs, labels = [], []
    for b in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        out = fn(b["video"], b["audio"])
        outs.append([o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))])
        labels.append(b["label"].numpy())
    return [np.concatenate(parts) for parts in zip(*outs)], np.concatenate(labels)


def retrieval_subset(items: list[DownstreamItem], size: int | None, seed: int = 0) -> list[DownstreamItem]:
    """`size` clips drawn without replacement by a seeded generator (the same seed, the same
    clips), in their file order; None: every clip."""
    if size is None:
        return items
    if not 1 <= size <= len(items):
        raise ValueError(f"retrieval subset of {size} clips: the annotations hold {len(items)}")
    picked = np.sort(np.random.default_rng(seed).choice(len(items), size, replace=False))
    return [items[i] for i in picked]


def retrieval_eval(
    weights: Converted, items: list[DownstreamItem], *, batch_size: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Video-to-audio (a2b: video queries) and audio-to-video (b2a) retrieval over the clips.
    Chance: R@1 = 1/N, median rank (N + 1) / 2."""
    log.info("retrieval over %d clips, %s features", len(items), weights.arch)
    model = weights.load_model().eval()
    (video, audio), _ = _features(
        model.retrieval_features, items, weights.cfg, batch_size, False, "retrieval features", progress
    )
    sim = F.normalize(torch.from_numpy(video), dim=-1) @ F.normalize(torch.from_numpy(audio), dim=-1).T
    out = M.retrieval(sim)
    renamed = {k.replace("a2b", "video_to_audio").replace("b2a", "audio_to_video"): v for k, v in out.items()}
    n = len(items)
    return {**renamed, "clips": n, "chance_r@1": 1 / n, "chance_median_rank": (n + 1) / 2}


def _fit(x: torch.Tensor, y: torch.Tensor, outputs: int, l2: float, regression: bool) -> torch.nn.Linear:
    """Full-batch L-BFGS on a linear layer: cross-entropy or MSE, plus l2 * |W|^2."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], outputs).double()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = layer(x)
        loss = F.mse_loss(out, y) if regression else F.cross_entropy(out, y)
        loss = loss + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def linear_probe(
    weights: Converted | None,
    splits: dict[str, list[DownstreamItem]],
    cfg,
    task: Task,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """The probe (module docstring) on splits train / val / test; weights None probes a
    randomly initialised encoder (the baseline a pretrained one must beat)."""
    seed_everything(cfg.train.seed)  # the random encoder (and head) the same on every call
    model, _, report = build_finetune(cfg, task, weights)
    model.eval()
    mcfg = model.cfg
    feats = {}
    for name in ("train", "val", "test"):
        (x,), y = _features(
            model.features, splits[name], mcfg, batch_size, task.regression, f"probe features ({name})", progress
        )
        feats[name] = (torch.from_numpy(x).double(), torch.from_numpy(y))
    mean, std = feats["train"][0].mean(0), feats["train"][0].std(0) + 1e-6
    xs = {k: (x - mean) / std for k, (x, _) in feats.items()}
    ys = {k: (y.double() if task.regression else y.long()) for k, (_, y) in feats.items()}
    trials = []
    for l2 in L2_GRID:
        layer = _fit(xs["train"], ys["train"], task.num_outputs, l2, task.regression)
        with torch.no_grad():
            val = score(ys["val"].numpy(), _outputs(layer, xs["val"], task), task)
        trials.append((val[task.select_metric], l2, layer, val))
        log.info("linear probe l2 %.0e: val %s %.4f", l2, task.select_metric, val[task.select_metric])
    best_score, l2, layer, val = max(trials, key=lambda t: (t[0], -t[1]))
    with torch.no_grad():
        test = score(ys["test"].numpy(), _outputs(layer, xs["test"], task), task)
    return {
        "l2": l2,
        "val": val,
        "test": test,
        "select_metric": task.select_metric,
        "features": int(xs["train"].shape[1]),
        "pretrained_tensors": report["loaded"],
        "clips": {k: len(v) for k, v in splits.items()},
    }


def _outputs(layer: torch.nn.Linear, x: torch.Tensor, task: Task) -> np.ndarray:
    out = layer(x)
    return (out if task.regression else out.softmax(-1)).numpy()
