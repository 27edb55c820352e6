"""Downstream readers: the synthetic fine-tuning set, annotation files, folds and the fine-tuning
sampling for HiCMAE and CAV-MAE."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hicmae_dist.config import ModelConfig, load_config
from hicmae_dist.data import downstream as ds
from hicmae_dist.data.synth import write_downstream


@pytest.fixture(scope="module")
def finetune_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream") / "set"
    summary = write_downstream(out, 6, num_classes=3, folds=3, seed=0, duration_s=2.8, workers=2, progress=False)
    assert summary["clips"] == 6 and summary["subjects"] == 3 and summary["frames_per_clip"] == 70
    return out


def test_synthetic_set_and_folds(finetune_set):
    labels = {}
    for line in (finetune_set / "labels.csv").read_text().splitlines()[1:]:
        clip, subject, label = line.split(",")
        labels[clip] = int(label)
    seen_test = []
    for fold in (1, 2, 3):
        files = ds.fold_files(finetune_set / "splits", fold)
        split = {name: ds.read_annotations(path) for name, path in files.items()}
        subjects = {name: {item.frame_dir.parent.name for item in items} for name, items in split.items()}
        assert not (
            subjects["train"] & subjects["val"]
            or subjects["train"] & subjects["test"]
            or subjects["val"] & subjects["test"]
        )  # subject-independent
        assert sum(map(len, split.values())) == 6
        for item in split["train"]:
            assert item.frame_dir.is_absolute() and len(ds.list_frames(item.frame_dir)) == 70
            assert item.label == (labels[f"{item.frame_dir.parent.name}/{item.frame_dir.name}"],)
            assert ds.read_wav(item.wav_path).shape == (round(2.8 * 16000),)
        seen_test += [i.frame_dir for i in split["test"]]
    assert len(seen_test) == len(set(seen_test)) == 6  # every clip tested exactly once over the folds
    with pytest.raises(FileNotFoundError, match="split04"):
        ds.fold_files(finetune_set / "splits", 4)


def test_annotation_format(tmp_path):
    (tmp_path / "a.csv").write_text("frames/x audio/x.wav 3\n/abs/y /abs/y.wav 1\n\n")
    items = ds.read_annotations(tmp_path / "a.csv")
    assert items[0].frame_dir == tmp_path / "frames/x" and items[1].wav_path == Path("/abs/y.wav")
    assert [i.label for i in items] == [(3,), (1,)]
    (tmp_path / "r.csv").write_text("f w.wav 0.5 -1 2\n")
    (item,) = ds.read_annotations(tmp_path / "r.csv", root="/data")
    assert item.label == (0.5, -1.0, 2.0) and item.frame_dir == Path("/data/f")
    ds.write_annotations(tmp_path / "out" / "b.csv", items + [item])
    back = ds.read_annotations(tmp_path / "out" / "b.csv", regression=True)
    assert [b.label for b in back] == [(3.0,), (1.0,), (0.5, -1.0, 2.0)]
    (tmp_path / "bad.csv").write_text("only_two fields\n")
    with pytest.raises(ValueError, match="bad.csv:1"):
        ds.read_annotations(tmp_path / "bad.csv")


def test_videomae_sampling():
    # a short clip: 40 // 4 = 10 indices over the clip, then the last frame repeated (VideoMAE's quirk)
    assert ds.videomae_indices(40, 16, 4, None) == [0, 4, 8, 13, 17, 22, 26, 31, 35, 39] + [39] * 6
    long = ds.videomae_indices(200, 16, 4, None)  # the centre 64-frame span
    assert long[0] == (64 + 200) // 2 - 64 and len(long) == 16 and long[-1] - long[0] <= 63
    rng = random.Random(0)
    for _ in range(50):
        idx = ds.videomae_indices(200, 16, 4, rng)
        assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < 200 and idx[-1] - idx[0] <= 63
    views = ds.test_views(100, 16, 4, 2)  # 25 frames at stride 4: chunks at 0 and 9
    assert views[0] == list(range(0, 64, 4)) and views[1] == list(range(36, 100, 4))
    assert ds.test_views(20, 16, 4, 2)[0] == [0, 4, 8, 12, 16] + [16] * 11  # padded with the last
    assert ds.short_side_box(300, 200, 160, 0.0) == (0.0, 0.0, 200.0, 200.0)
    assert ds.short_side_box(300, 200, 160, 1.0) == (80 * 1.25, 0.0, 200.0, 200.0)
    for _ in range(20):
        left, top, w, h = ds.random_resized_box(224, 224, rng)
        assert 0 <= left and left + w <= 224 and 0 <= top and top + h <= 224


def test_hicmae_finetune_items(finetune_set):
    files = ds.fold_files(finetune_set / "splits", 1)
    m = ModelConfig()
    train = ds.DownstreamDataset(files["train"], m, "train", seed=1)
    a, b = train[0], train[0]
    assert a["video"].shape == (3, 16, 160, 160) and a["audio"].shape == (1, 256, 128)
    assert a["label"].dtype == torch.int64 and a["label"].dim() == 0
    assert torch.equal(a["video"], b["video"])  # seeded by (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[0]["video"], a["video"])
    val = ds.DownstreamDataset(files["val"], m, "val")[0]
    assert val["video"].shape == (3, 16, 160, 160) and torch.isfinite(val["audio"]).all()
    test = ds.DownstreamDataset(files["test"], m, "test", test_num_segment=2, test_num_crop=2)[0]
    assert test["video"].shape == (4, 3, 16, 160, 160) and test["audio"].shape == (4, 1, 256, 128)
    # square frames: the 2 crops of a chunk coincide; the 2 chunks (frames 0-63 and 6-69) differ
    assert torch.equal(test["video"][0], test["video"][1]) and not torch.equal(test["video"][0], test["video"][2])
    assert not torch.equal(test["audio"][0], test["audio"][2])
    loader = ds.make_finetune_loader(files["train"], m, "train", batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 3, 16, 160, 160) and batch["label"].shape == (2,)


def test_cavmae_finetune_and_regression(finetune_set, tmp_path):
    files = ds.fold_files(finetune_set / "splits", 1)
    m = load_config("cavmae-base-vox2").model
    train = ds.DownstreamDataset(files["train"], m, "train")[0]
    assert train["video"].shape == (3, 224, 224) and train["audio"].shape == (1, 1024, 128)
    test = ds.DownstreamDataset(files["test"], m, "test")[0]
    assert test["video"].shape == (10, 3, 224, 224) and test["audio"].shape == (10, 1, 1024, 128)
    val = ds.DownstreamDataset(files["val"], m, "val")[0]
    assert val["video"].shape == (3, 224, 224)

    out = write_downstream(tmp_path / "reg", 3, num_classes=3, folds=3, duration_s=2.8, regression=True, progress=False)
    item = ds.DownstreamDataset(ds.fold_files(out["splits"], 1)["test"], ModelConfig(), "val")[0]
    assert item["label"].dtype == torch.float32 and item["label"].shape == (2,)
    assert np.all(np.abs(item["label"].numpy()) < 1.5)


def test_draft_decode_of_large_frames(tmp_path):
    """Frames much larger than the input are decoded at a reduced JPEG scale; the result stays
    close to a full decode and resize."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (10, 10, 3)).astype(np.uint8))
    small.resize((640, 640), Image.BICUBIC).save(tmp_path / "f.jpg", quality=95)  # 640 px, smooth like a face
    fast = ds.load_crop(tmp_path / "f.jpg", (0, 0, 640, 640), 160)
    full = np.asarray(Image.open(tmp_path / "f.jpg").convert("RGB").resize((160, 160), Image.BILINEAR))
    assert fast.shape == (160, 160, 3) and np.abs(fast.astype(int) - full.astype(int)).mean() < 2


def test_synth_refuses_a_fold_count_before_writing_any_clip(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(ValueError, match="k >= 3, got 2"):
        write_downstream(out, 8, folds=2, workers=1, progress=False)
    assert not out.exists()  # nothing rendered, nothing written
