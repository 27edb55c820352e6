"""Retrieval as the CAV-MAE paper reports it: R@k and median rank on a constructed case of known
ranks, the seeded subset, and `eval retrieval` on a CAV-MAE model over synthetic clips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hicmae_dist.data import downstream as ds
from hicmae_dist.eval.metrics import retrieval
from hicmae_dist.train.probe import PAPER_SUBSETS, retrieval_subset


def test_recall_and_median_rank_on_known_ranks():
    """Query i's match placed at rank RANKS[i] among 12 items (rows: video queries); the columns
    (audio queries) get other known ranks from the same matrix."""
    ranks = np.array([1, 1, 2, 3, 5, 6, 10, 11, 12, 4, 1, 7])
    n = len(ranks)
    sim = np.zeros((n, n))
    for i, r in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        sim[i, others] = np.arange(n - 1, 0, -1)  # n-1, ..., 1: distinct
        sim[i, i] = n - r + 0.5  # exactly r - 1 of them above it
    out = retrieval(torch.from_numpy(sim))
    assert out["a2b_r@1"] == pytest.approx(3 / 12) and out["a2b_r@5"] == pytest.approx(7 / 12)
    assert out["a2b_r@10"] == pytest.approx(10 / 12) and out["a2b_median_rank"] == 4.5
    col_ranks = (sim >= np.diag(sim)[None, :]).sum(axis=0)  # the same definition, counted by hand
    assert out["b2a_r@1"] == pytest.approx((col_ranks <= 1).mean())
    assert out["b2a_median_rank"] == float(np.median(col_ranks))


def _items(n: int) -> list[ds.DownstreamItem]:
    return [ds.DownstreamItem(Path(f"/f/{i}"), Path(f"/a/{i}.wav"), (i % 3,)) for i in range(n)]


def test_subset_is_seeded_ordered_and_of_the_asked_size():
    items = _items(50)
    a, b, c = retrieval_subset(items, 20, seed=3), retrieval_subset(items, 20, seed=3), retrieval_subset(items, 20, 4)
    assert a == b and a != c and len(a) == len(c) == 20 and len(set(a)) == 20
    assert [items.index(x) for x in a] == sorted(items.index(x) for x in a)  # file order kept
    assert retrieval_subset(items, None) == items and PAPER_SUBSETS == {"audioset": 1725, "vggsound": 1545}
    with pytest.raises(ValueError, match="subset of 51 clips: the annotations hold 50"):
        retrieval_subset(items, 51)


def test_cavmae_retrieval_cli_on_a_seeded_subset(cli_env, tmp_path):
    """A narrow CAV-MAE (our weights file) over 12 synthetic clips, 8 drawn with seed 1: the
    features of the release's forward_feat (tests/models/test_cavmae.py checks them), both
    directions."""
    from hicmae_dist.data.synth import write_downstream
    from hicmae_dist.models.cavmae.config import CAVMAEConfig
    from hicmae_dist.models.cavmae.model import CAVMAEPretrain
    from hicmae_dist.models.convert import Converted, ours_file_payload

    write_downstream(tmp_path / "set", 12, num_classes=4, num_subjects=6, folds=3, seed=3, workers=2, progress=False)
    clips = tmp_path / "clips.csv"  # every clip once: the three folds' test splits
    ds.write_annotations(
        clips,
        sum((ds.read_annotations(tmp_path / "set" / "splits" / f"split0{f}" / "test.csv") for f in (1, 2, 3)), []),
    )
    cfg = CAVMAEConfig(
        width=64,
        heads=2,
        modality_depth=1,
        shared_depth=1,
        decoder_width=32,
        decoder_heads=2,
        decoder_depth=1,
        num_frames=1,
        image_size=224,
        audio_frames=1024,
    )
    torch.manual_seed(0)
    weights = tmp_path / "cav.pth"
    torch.save(ours_file_payload(Converted("cavmae", "pretrain", cfg, None, CAVMAEPretrain(cfg).state_dict())), weights)
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "hicmae_dist.cli",
        "eval",
        "retrieval",
        "--weights",
        str(weights),
        "--annotations",
        str(clips),
        "--subset",
        "8",
        "--seed",
        "1",
        "--no-progress",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(ds.read_annotations(clips)) == 12
    assert (result["clips"], result["subset"], result["subset_seed"], result["subset_of"]) == (8, 8, 1, "custom")
    for direction in ("video_to_audio", "audio_to_video"):
        r1, r5, r10 = (result[f"{direction}_r@{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 == 1.0  # 8 clips: every match within the top 10
        assert 1.0 <= result[f"{direction}_median_rank"] <= 8.0
