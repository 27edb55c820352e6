"""Multi-label fine-tuning end to end through the CLI: the two-minute pretraining fine-tuned on a
synthetic multi-label set in the CAV-MAE release's JSON layout, with balanced sampling, against
the label-frequency baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hicmae_dist.data import downstream as ds
from hicmae_dist.data.synth import write_downstream
from hicmae_dist.eval import metrics as M

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


@pytest.fixture(scope="module")
def multilabel_set(tmp_path_factory) -> Path:
    """72 clips of 1-3 of 5 classes from 18 subjects in 6 folds (48 train / 12 val / 12 test):
    with 24 training clips the tiny model does not learn five detectors in a few epochs."""
    out = tmp_path_factory.mktemp("multilabel") / "set"
    write_downstream(
        out,
        72,
        num_classes=5,
        num_subjects=18,
        folds=6,
        seed=1,
        duration_s=2.8,
        multilabel=True,
        workers=2,
        progress=False,
    )
    return out


def _frequency_baseline(splits: dict[str, list[ds.DownstreamItem]], k: int) -> float:
    """Test mAP of scoring every clip with the classes' training frequencies: each class's AP is
    then its positive rate in test (all scores tie)."""

    def multi_hot(items):
        y = np.zeros((len(items), k))
        for row, item in enumerate(items):
            y[row, list(item.label)] = 1
        return y

    train, test = multi_hot(splits["train"]), multi_hot(splits["test"])
    return M.multilabel_metrics(test, np.tile(train.mean(0), (len(test), 1)))["map"]


def test_multilabel_finetune_beats_the_label_frequency_baseline(two_minute_run, multilabel_set, cli_env, tmp_path):
    """Fold 1, 6 epochs of 12 steps (batch 4; one LR for the whole model, no label smoothing: the
    set is small). Measured: test mAP 0.70 (AUC 0.73) against the baseline's 0.4."""
    run_dir, r = two_minute_run
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ft"
    cmd = [
        "finetune",
        "--preset",
        "finetune-tiny-cpu",
        "--pretrained",
        str(run_dir),
        "--splits",
        str(multilabel_set / "splits"),
        "--run-dir",
        str(out),
        "--no-progress",
        "finetune.task=multilabel",
        "finetune.balanced_sampling=true",
        "finetune.epochs=6",
        "finetune.test_num_segment=1",
        "data.batch_size=4",
        "finetune.layer_decay=1.0",
        "train.base_lr=6.4e-2",
        "finetune.label_smoothing=0",
        "data.num_workers=0",
    ]
    p = subprocess.run(CLI + cmd, capture_output=True, text=True, env=cli_env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "fold01" / "results.json").read_text())
    assert result["select_metric"] == "map" and result["load_report"]["loaded"] > 100
    assert "balanced sampling: clip weights" in p.stderr
    baseline = _frequency_baseline(ds.load_fold(multilabel_set / "splits", 1)[0], 5)
    assert 0.2 < baseline < 0.6
    assert result["best"]["map"] > baseline + 0.15, (result["best"], baseline)
    assert result["last"]["auc"] > 0.6
    rows = (out / "fold01" / "predictions_last.csv").read_text().splitlines()[1:]
    probs = np.array([[float(x) for x in row.split(",")[2].split()] for row in rows])
    assert probs.shape == (12, 5) and ((probs > 0) & (probs < 1)).all()  # sigmoids, not a softmax
    assert not np.allclose(probs.sum(1), 1.0)
    assert "| selection | fold | map | auc |" in (out / "results.md").read_text()
