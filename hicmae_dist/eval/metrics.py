"""Evaluation metrics on numpy arrays or torch tensors (any device, any float dtype).

Classification: y_true (N,) ints, y_pred (N,) ints or scores (N, K) (argmax taken).
Regression: x, y (N,) or (N, D) for D dimensions (per-dimension results).
Every statistic uses population (1/n) moments, as in Lin's CCC:

    ccc = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)

The degenerate cases are defined, not NaN: PCC with a constant input is 0 (no linear relation
can be measured); CCC is 0 when one input is constant and the other is not, 1 when both are
the same constant; a class absent from y_true is left out of UAR and of weighted F1 (weight 0),
and a class never predicted has recall 0 where it occurs.

Multi-label: y_true (N, K) in {0, 1}, scores (N, K) (sigmoid probabilities or logits: both
metrics depend on the ranking only). mAP averages the per-class average precision over the
classes with a positive in y_true; macro AUC over the classes with both a positive and a
negative. The others are left out and counted (`unscored_classes`), where the release's
calculate_stats keeps them in its means (AP 0 or NaN, AUC -1); on AudioSet's eval set every
class has positives, so the figures agree there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _np(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = _np(y_true).astype(np.int64).reshape(-1)
    p = _np(y_pred)
    p = p.argmax(axis=-1) if p.ndim == 2 else p.astype(np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} labels, y_pred {p.shape[0]}")
    if t.size == 0:
        raise ValueError("no samples")
    return t, p


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    t, p = _labels(y_true, y_pred)
    k = num_classes or int(max(t.max(), p.max())) + 1
    if t.min() < 0 or p.min() < 0 or t.max() >= k or p.max() >= k:
        raise ValueError(f"labels must be in [0, {k}), got true {t.min()}..{t.max()}, predicted {p.min()}..{p.max()}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def war(y_true, y_pred) -> float:
    """Weighted average recall = accuracy."""
    t, p = _labels(y_true, y_pred)
    return float((t == p).mean())


def uar(y_true, y_pred) -> float:
    """Unweighted average recall: mean over the classes present in y_true of their recall."""
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


def per_class_f1(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K,) F1 per class; 0 where precision + recall is 0."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def weighted_f1(y_true, y_pred) -> float:
    """F1 per class averaged with the class frequencies in y_true as weights."""
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    return float((per_class_f1(y_true, y_pred, cm.shape[0]) * support).sum() / support.sum())


def macro_f1(y_true, y_pred) -> float:
    """F1 averaged over the classes present in y_true."""
    cm = confusion_matrix(y_true, y_pred)
    return float(per_class_f1(y_true, y_pred, cm.shape[0])[cm.sum(axis=1) > 0].mean())


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = _np(x, np.float64), _np(y, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x {a.shape} and y {b.shape} differ in shape")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"expected (N,) or (N, D) with N >= 2, got {a.shape}")
    return a, b


def _squeeze(v: np.ndarray, x) -> float | np.ndarray:
    return float(v[0]) if _np(x).ndim == 1 else v


def pcc(x, y) -> float | np.ndarray:
    """Pearson correlation per dimension (a float for 1-D inputs); 0 where an input is constant."""
    a, b = _pairs(x, y)
    da, db = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((da**2).mean(0) * (db**2).mean(0))
    return _squeeze(np.divide((da * db).mean(0), denom, out=np.zeros(a.shape[1]), where=denom > 0), x)


def ccc(x, y) -> float | np.ndarray:
    """Lin's concordance correlation per dimension (a float for 1-D inputs), population moments."""
    a, b = _pairs(x, y)
    ma, mb = a.mean(0), b.mean(0)
    cov = ((a - ma) * (b - mb)).mean(0)
    denom = a.var(0) + b.var(0) + (ma - mb) ** 2
    # denom 0: both constant and equal, perfect agreement
    return _squeeze(np.divide(2 * cov, denom, out=np.ones(a.shape[1]), where=denom > 0), x)


def average_precision(y_true, scores) -> float:
    """Area under the precision-recall curve of one class, as sklearn's average_precision_score
    (sum over positives of precision at their rank); NaN when there is no positive."""
    t, s = _np(y_true).astype(bool).reshape(-1), _np(scores, np.float64).reshape(-1)
    if not t.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    t, s = t[order], s[order]
    # ties: a threshold takes every sample with that score at once
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(t)[last_of_tie]
    seen = np.nonzero(last_of_tie)[0] + 1
    precision, recall = tp / seen, tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(y_true, scores) -> float:
    """mAP of multi-label targets (N, K) in {0, 1} against scores (N, K): the mean of the
    per-class average precision over the classes with at least one positive."""
    return multilabel_metrics(y_true, scores)["map"]


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve of one class (sklearn's roc_auc_score): the chance a random
    positive scores above a random negative, ties counting 1/2; NaN without both classes."""
    t, s = _np(y_true).astype(bool).reshape(-1), _np(scores, np.float64).reshape(-1)
    pos, neg = int(t.sum()), int((~t).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct score
    ranks = mid_rank[inverse]
    return float((ranks[t].sum() - pos * (pos + 1) / 2) / (pos * neg))  # Mann-Whitney U / (P N)


def multilabel_metrics(y_true, scores) -> dict[str, float]:
    """mAP and macro AUC of multi-label scores (module docstring), with the number of classes
    left out of them for want of a positive (map) or of a positive and a negative (auc)."""
    t, s = _np(y_true, np.float64), _np(scores, np.float64)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"expected y_true and scores of the same (N, K) shape, got {t.shape} and {s.shape}")
    t = t > 0.5
    aps = np.array([average_precision(t[:, k], s[:, k]) for k in range(t.shape[1])])
    aucs = np.array([roc_auc(t[:, k], s[:, k]) for k in range(t.shape[1])])
    if np.isnan(aps).all():
        raise ValueError("no class has a positive sample")
    auc = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")  # no class has both
    return {"map": float(np.nanmean(aps)), "auc": auc, "unscored_classes": int(np.isnan(aps).sum())}


def retrieval(similarity) -> dict[str, float]:
    """similarity (N, N): row i = query i of the first modality against every item of the
    second, item i the match. Returns R@1/5/10 (fraction of queries whose match ranks within k)
    and the median rank (1 = first) of the match, both directions: keys a2b_* (rows as
    queries) and b2a_* (columns as queries). Ties rank the match after the items it ties."""
    s = _np(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"expected a square (N, N) similarity matrix, got {s.shape}")
    out = {}
    for name, m in (("a2b", s), ("b2a", s.T)):
        ranks = (m >= np.diag(m)[:, None]).sum(axis=1)  # 1-based rank of the match
        for k in (1, 5, 10):
            out[f"{name}_r@{k}"] = float((ranks <= k).mean())
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def classification_metrics(y_true, probs) -> dict[str, float]:
    """UAR, WAR, weighted F1 and macro F1 of scores (N, K) (or predicted labels (N,))."""
    return {
        "uar": uar(y_true, probs),
        "war": war(y_true, probs),
        "weighted_f1": weighted_f1(y_true, probs),
        "macro_f1": macro_f1(y_true, probs),
    }


def regression_metrics(y_true, y_pred, names: Sequence[str] | None = None) -> dict[str, float]:
    """PCC, CCC and MSE per dimension (keys pcc_<name>, ccc_<name>, mse_<name>) and their means."""
    t, p = _pairs(y_true, y_pred)
    names = list(names) if names else [f"d{i}" for i in range(t.shape[1])]
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} dimension names for {t.shape[1]} dimensions")
    p_, c_, m_ = np.atleast_1d(pcc(t, p)), np.atleast_1d(ccc(t, p)), ((t - p) ** 2).mean(0)
    out = {}
    for i, n in enumerate(names):
        out.update({f"pcc_{n}": float(p_[i]), f"ccc_{n}": float(c_[i]), f"mse_{n}": float(m_[i])})
    out.update(pcc=float(p_.mean()), ccc=float(c_.mean()), mse=float(m_.mean()))
    return out


def plot_confusion(cm: np.ndarray, class_names: Sequence[str] | None, out: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (recall per true class) with the counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = cm.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * k, 1.0 + 0.5 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (colour: recall per true class)", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
