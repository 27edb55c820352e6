"""Metrics against values worked out by hand (or from their formula) in the test."""

import math

import numpy as np
import pytest
import torch

from hicmae_dist.eval import metrics as M


def test_hand_worked_confusion_uar_war_f1():
    # true 0 0 0 1 1 2 2 2 2 3 ; pred 0 1 0 1 1 2 0 2 2 0   (class 3 never predicted)
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    p = [0, 1, 0, 1, 1, 2, 0, 2, 2, 0]
    cm = M.confusion_matrix(y, p)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0], [1, 0, 0, 0]]
    assert M.war(y, p) == pytest.approx(7 / 10)
    assert M.uar(y, p) == pytest.approx((2 / 3 + 1 + 3 / 4 + 0) / 4)
    # F1 = 2tp / (2tp + fp + fn): class 0 tp 2 fp 2 fn 1; 1: 2, 1, 0; 2: 3, 0, 1; 3: 0, 0, 1
    f1 = [4 / 7, 4 / 5, 6 / 7, 0.0]
    assert M.per_class_f1(y, p).tolist() == pytest.approx(f1)
    assert M.weighted_f1(y, p) == pytest.approx((3 * f1[0] + 2 * f1[1] + 4 * f1[2] + 1 * f1[3]) / 10)
    assert M.macro_f1(y, p) == pytest.approx(sum(f1) / 4)


def test_scores_tensors_and_absent_classes():
    y = torch.tensor([2, 2, 0])
    scores = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05]], dtype=torch.bfloat16)
    assert M.war(y, scores) == pytest.approx(2 / 3)
    # class 1 absent from y_true: left out of UAR (recalls 1 and 1/2)
    assert M.uar(y, scores) == pytest.approx(0.75)
    assert M.confusion_matrix(y, scores, num_classes=4).shape == (4, 4)
    with pytest.raises(ValueError, match="3 labels, y_pred 2"):
        M.war(y, [0, 1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        M.confusion_matrix([0, 5], [0, 1], num_classes=2)


def test_pcc_and_ccc_from_their_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.6 * x + rng.normal(scale=0.5, size=50) + 0.3
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).sum() / 50  # population moments, as Lin
    vx, vy = ((x - mx) ** 2).sum() / 50, ((y - my) ** 2).sum() / 50
    assert M.ccc(x, y) == pytest.approx(2 * cov / (vx + vy + (mx - my) ** 2), rel=1e-12)
    assert M.pcc(x, y) == pytest.approx(cov / math.sqrt(vx * vy), rel=1e-12)
    # CCC punishes a shift and a scale PCC ignores
    assert M.pcc(x, 2 * x + 1) == pytest.approx(1.0) and M.ccc(x, 2 * x + 1) < 0.7
    xc = x - mx  # mirrored about a common mean: perfect discordance
    assert M.ccc(x, x) == pytest.approx(1.0) and M.ccc(xc, -xc) == pytest.approx(-1.0)
    # per dimension: (N, D) inputs give D values, as torch tensors too
    both = M.ccc(torch.tensor(np.stack([x, x], 1)), torch.tensor(np.stack([y, x], 1)))
    assert both.shape == (2,) and both[0] == pytest.approx(M.ccc(x, y)) and both[1] == pytest.approx(1.0)


def test_constant_predictions():
    y = np.array([0.1, 0.5, -0.3, 0.8])
    const = np.full(4, 0.2)
    assert M.pcc(y, const) == 0.0  # no linear relation measurable, not NaN
    assert M.ccc(y, const) == 0.0  # cov 0, denominator > 0
    assert M.ccc(const, const) == 1.0  # the same constant: perfect agreement
    assert M.ccc(const, const + 1) == 0.0
    reg = M.regression_metrics(np.stack([y, y], 1), np.stack([const, y], 1), ["valence", "arousal"])
    assert reg["ccc_valence"] == 0.0 and reg["ccc_arousal"] == pytest.approx(1.0)
    assert reg["ccc"] == pytest.approx(0.5) and reg["mse_arousal"] == 0.0


def test_average_precision_and_map():
    # ranks: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg) -> AP = (1/1 + 2/3) / 2
    assert M.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a positive and a negative counts both at once: precision 1/2 at recall 1
    assert M.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    t = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.2], [0.3, 0.9]])
    ap0 = (1 + 2 / 4) / 2  # positives at ranks 1 and 4
    ap1 = 1 / 2  # the one positive at rank 2
    assert M.mean_average_precision(t, s) == pytest.approx((ap0 + ap1) / 2)


def test_retrieval_ranks_both_directions():
    sim = np.array(
        [
            [0.9, 0.1, 0.5],
            [0.8, 0.2, 0.1],  # query 1's match (0.2) ranks 2nd
            [0.7, 0.6, 0.3],
        ]
    )  # query 2's match ranks 3rd
    r = M.retrieval(sim)
    assert r["a2b_r@1"] == pytest.approx(1 / 3) and r["a2b_r@5"] == 1.0 and r["a2b_median_rank"] == 2.0
    # columns as queries: col 0 match 0.9 first; col 1 match 0.2 (0.6, 0.2, 0.1) -> 2nd; col 2 0.3 -> 2nd
    assert r["b2a_r@1"] == pytest.approx(1 / 3) and r["b2a_median_rank"] == 2.0
    assert M.retrieval(np.ones((4, 4)))["a2b_r@1"] == 0.0  # ties rank the match last: no free hits


def test_confusion_png(tmp_path):
    out = M.plot_confusion(np.array([[3, 1], [0, 2]]), ["calm", "angry"], tmp_path / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_multilabel_map_and_auc_match_sklearn():
    """Random multi-label scores with ties (rounded) against sklearn's per-class average
    precision and ROC AUC; a class without positives and one without negatives are left out
    of the means they cannot enter, and counted."""
    rng = np.random.default_rng(0)
    t = (rng.random((40, 6)) < 0.3).astype(int)
    t[:, 4] = 0  # no positive: out of mAP and AUC
    t[:, 5] = 1  # no negative: in mAP (AP 1), out of AUC
    s = np.round(rng.random((40, 6)) + 0.5 * t, 1)  # ties on purpose
    m = M.multilabel_metrics(t, s)
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:  # the hand-computed case of test_average_precision_and_map still holds
        pytest.skip("sklearn not installed")
    aps = [average_precision_score(t[:, k], s[:, k]) for k in (0, 1, 2, 3, 5)]
    aucs = [roc_auc_score(t[:, k], s[:, k]) for k in (0, 1, 2, 3)]
    assert m["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert m["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["unscored_classes"] == 1 and M.mean_average_precision(t, s) == m["map"]
    # the hand-computed case: positive at 0.9 above negatives 0.5, 0.5 and a tie with a positive at 0.5
    assert M.roc_auc([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx((2 + 1.5) / 4)
