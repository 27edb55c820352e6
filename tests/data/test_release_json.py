"""The CAV-MAE release's JSON datafiles and class csv (written by `synth --multilabel`), multi-hot
items, and the errors that name the bad entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hicmae_dist.config import load_config
from hicmae_dist.data import downstream as ds
from hicmae_dist.data.synth import write_downstream


@pytest.fixture(scope="module")
def release_set(tmp_path_factory) -> Path:
    """9 clips of 1-3 of 4 classes, 3 subjects, 3 folds (3 train / 3 val / 3 test)."""
    out = tmp_path_factory.mktemp("release") / "set"
    summary = write_downstream(
        out,
        9,
        num_classes=4,
        num_subjects=3,
        folds=3,
        seed=2,
        duration_s=2.6,
        multilabel=True,
        workers=2,
        progress=False,
    )
    assert summary["fold_sizes"][0] == {"train": 3, "val": 3, "test": 3} and 1 <= summary["labels_per_clip"] <= 3
    return out


def test_release_datafiles_read_into_multi_hot_items(release_set):
    splits, how = ds.load_fold(release_set / "splits", 1)
    assert how.endswith("split01/val.json") and {len(v) for v in splits.values()} == {3}
    entries = json.loads((release_set / "splits/split01/test.json").read_text())["data"]
    index, names = ds.read_label_csv(release_set / "splits" / ds.LABEL_CSV)
    item, entry = splits["test"][0], entries[0]
    assert item.label == tuple(sorted(index[m] for m in entry["labels"].split(",")))
    assert item.frames[7] == Path(entry["video_path"]) / "frame_7" / f"{entry['video_id']}.jpg"
    assert all(f.is_file() for f in item.frames) and len(item.frames) == 10
    assert ds.split_class_names(release_set / "splits", 1) == names and len(names) == 4

    m = load_config("cavmae-base-vox2").model
    test = ds.DownstreamDataset(splits["test"], m, "test", multi_hot=4)[0]
    assert test["video"].shape == (10, 3, 224, 224)  # the ten frames, each a test view
    assert test["label"].dtype == torch.float32 and test["label"].shape == (4,)
    assert test["label"].nonzero().flatten().tolist() == list(item.label)
    # the same set in our annotation format: all the label columns are the clip's classes
    ours = release_set / "ours.csv"
    ours.write_text(f"{item.frames[0].parent} {item.wav_path} {' '.join(map(str, item.label))}\n")
    assert ds.read_annotations(ours)[0].label == item.label


def _broken(release_set: Path, tmp_path: Path, change) -> Path:
    """A copy of split01 with the test file's entry 1 changed by `change(entry)`."""
    root = tmp_path / "splits"
    shutil.copytree(release_set / "splits", root)
    path = root / "split01" / "test.json"
    data = json.loads(path.read_text())
    change(data["data"][1])
    path.write_text(json.dumps(data))
    return root


def test_bad_entries_are_named(release_set, tmp_path):
    def no_wav(e):
        e["wav"] = "/nowhere/x.wav"

    root = _broken(release_set, tmp_path / "a", no_wav)
    with pytest.raises(FileNotFoundError, match=r"test.json: entry 1 \(video_id 'syn\d+'\): no wav at /nowhere/x.wav"):
        ds.load_fold(root, 1)

    partial = tmp_path / "frames"  # frame_0 .. frame_6 only
    for i in range(7):
        (partial / f"frame_{i}").mkdir(parents=True)

    def no_frames(e):
        e["video_path"] = str(partial)

    with pytest.raises(FileNotFoundError, match=r"entry 1 \(video_id 'syn\d+'\): no frame folder .*frames/frame_7"):
        ds.load_fold(_broken(release_set, tmp_path / "b", no_frames), 1)

    def unknown(e):
        e["labels"] = "/m/synth0,/m/nope"

    with pytest.raises(ValueError, match=r"entry 1 .*label id '/m/nope' is not in .*class_labels_indices.csv"):
        ds.load_fold(_broken(release_set, tmp_path / "c", unknown), 1)

    root = _broken(release_set, tmp_path / "d", lambda e: None)
    (root / ds.LABEL_CSV).unlink()
    with pytest.raises(FileNotFoundError, match="need class_labels_indices.csv"):
        ds.load_fold(root, 1)
    assert ds.load_fold(root, 1, label_csv=str(release_set / "splits" / ds.LABEL_CSV))[0]["test"]  # finetune.label_csv
    (root / "split01" / "test.csv").write_text("")
    with pytest.raises(ValueError, match="both .*test.csv and .*test.json; keep one"):
        ds.fold_files(root, 1)
