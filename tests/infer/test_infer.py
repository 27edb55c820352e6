"""embed / predict on video files: the fine-tuning evaluation's preprocessing, its predictions
reproduced, odd videos reported, faces tracked."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hicmae_dist
from hicmae_dist.data import downstream as ds
from tests.infer.conftest import ffmpeg, lossless_video, read_wav
from tests.support import CAVMAE_TINY_MODEL

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny HiCMAE fine-tuning model (random, seeded) in our weights format."""
    from hicmae_dist.config import load_config
    from hicmae_dist.models import build_finetune_model
    from hicmae_dist.models.convert import Converted, ours_file_payload

    cfg = load_config("finetune-tiny-cpu").model
    torch.manual_seed(0)
    net = build_finetune_model(cfg, 4)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(ours_file_payload(Converted("hicmae", "finetune", cfg, 4, net.state_dict())), path)
    return path


def test_embed_equals_the_evaluation_path(downstream, tiny_weights, tmp_path):
    """A synthetic clip as a lossless video: embed's windows are the fine-tuning test pass's
    chunks (2 segments of its 80 frames: frames 0, 4 .. 60 and 16 .. 76), and the features of
    both are the same, from the file, from preprocess on your own tensors, by hop or segments."""
    item = ds.read_annotations(downstream / "splits" / "split01" / "test.csv")[0]
    path = lossless_video(item.frame_dir, item.wav_path, tmp_path / "clip.mkv")
    model = hicmae_dist.load(tiny_weights, device="cpu")
    reference = ds.DownstreamDataset([item], model.cfg, "test", test_num_segment=2, test_num_crop=1)[0]
    with torch.no_grad():
        expected = model.net.features(reference["video"], reference["audio"])  # (2, 4C)
        expected_v, expected_a = model.net.retrieval_features(reference["video"], reference["audio"])
    by_segments = model.embed(path, segments=2)
    by_hop = model.embed(path, hop_s=0.64)
    assert by_segments.status == "ok" and by_segments.start_s.tolist() == [0.0, 0.64]
    for result in (by_segments, by_hop):
        torch.testing.assert_close(result.outputs["fusion"], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.pooled["fusion"], expected.mean(0), atol=1e-5, rtol=0)
    encoders = model.embed(path, segments=2, feature="encoders")
    torch.testing.assert_close(encoders.outputs["video"], expected_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoders.outputs["audio"], expected_a, atol=1e-5, rtol=0)
    # your own tensors: the JPEG frames and the wav, as decoded by the dataset
    from PIL import Image

    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in ds.list_frames(item.frame_dir)])
    video, audio, starts = model.preprocess(frames, read_wav(item.wav_path), segments=2)
    assert torch.equal(video[:, 0], reference["video"]) and torch.equal(audio[:, 0], reference["audio"])
    assert starts.tolist() == [0.0, 0.64]
    # the .npz form: the window rows, then the video row (the mean)
    from hicmae_dist.infer.output import write_embeddings

    write_embeddings([by_segments], tmp_path / "e.npz")
    npz = np.load(tmp_path / "e.npz")
    assert npz["level"].tolist() == ["window", "window", "video"] and npz["start_s"].tolist() == [0.0, 0.64, 0.0]
    np.testing.assert_allclose(npz["fusion"], torch.cat([expected, expected.mean(0, keepdim=True)]).numpy(), atol=1e-5)


def test_cavmae_embed_equals_its_ten_frame_test_views(downstream, tmp_path):
    """CAV-MAE (narrow, random): a 3.2 s clip is one padded 10.24 s window whose 10 frames and
    fbank are the test pass's 10 views; features and probabilities equal the evaluation path's."""
    from hicmae_dist.config import load_config
    from hicmae_dist.infer.model import InferenceModel, Loaded
    from hicmae_dist.models import build_finetune_model
    from hicmae_dist.train.finetune.task import Task

    cfg = load_config("finetune-cavmae", CAVMAE_TINY_MODEL).model
    torch.manual_seed(0)
    net = build_finetune_model(cfg, 3)
    model = InferenceModel(
        Loaded(net, cfg, Task("classification", 3, ("a", "b", "c"), "", (), None, {}), "test"), "cpu"
    )
    item = ds.read_annotations(downstream / "splits" / "split02" / "test.csv")[0]
    path = lossless_video(item.frame_dir, item.wav_path, tmp_path / "clip.mkv")
    reference = ds.DownstreamDataset([item], cfg, "test")[0]  # (10, 3, 224, 224), (10, 1, 1024, 128)
    with torch.no_grad():
        expected_v, expected_a = net.retrieval_features(reference["video"], reference["audio"])
        expected_p = net(reference["video"], reference["audio"]).softmax(-1).mean(0)
    embedded = model.embed(path, feature="encoders")
    assert embedded.status == "padded" and embedded.window_status == ["padded"]
    torch.testing.assert_close(embedded.pooled["video"], expected_v.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedded.pooled["audio"], expected_a.mean(0), atol=1e-5, rtol=0)
    predicted = model.predict(path)
    assert predicted.names == ("a", "b", "c")
    torch.testing.assert_close(predicted.pooled["output"], expected_p, atol=1e-5, rtol=0)
    from hicmae_dist.infer.output import write_predictions

    write_predictions([predicted], tmp_path / "p.json", predicted.names, regression=False)
    (video,) = json.loads((tmp_path / "p.json").read_text())["videos"]
    assert video["predicted"] == "abc"[int(expected_p.argmax())] and video["status"] == "padded"
    assert video["windows"][0]["end_s"] == pytest.approx(3.2) and "shorter than one 10.24 s" in video["problems"][0]


def _test_videos(downstream: Path, split: Path, out: Path) -> tuple[list[str], list[int]]:
    """The split's clips as lossless videos named by clip, a CSV list of them; (ids, labels)."""
    items = ds.read_annotations(split)
    out.mkdir()
    rows = ["id,path"]
    for item in items:
        clip_id = f"{item.frame_dir.parent.name}_{item.frame_dir.name}"
        lossless_video(item.frame_dir, item.wav_path, out / f"{clip_id}.mkv")
        rows.append(f"{clip_id},{clip_id}.mkv")
    (out / "list.csv").write_text("\n".join(rows) + "\n")
    return [r.split(",")[0] for r in rows[1:]], [item.label[0] for item in items]


def test_predict_reproduces_the_folds_test_pass(finetuned, downstream, cli_env_infer, tmp_path):
    """`predict --segments 2` on the fold's test clips (as videos) gives the probabilities of the
    fold's test pass with its validation-selected weights (predictions_best.csv), so its accuracy."""
    ids, labels = _test_videos(downstream, downstream / "splits" / "split01" / "test.csv", tmp_path / "videos")
    out = tmp_path / "pred.csv"
    r = subprocess.run(
        CLI
        + [
            "predict",
            "--weights",
            str(finetuned),
            str(tmp_path / "videos" / "list.csv"),
            "--segments",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=cli_env_infer,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in csv.DictReader(out.open()) if row["level"] == "video"]
    assert [row["video_id"] for row in rows] == ids and all(row["status"] == "ok" for row in rows)
    names = [str(k) for k in range(4)]
    probs = np.array([[float(row[n]) for n in names] for row in rows])
    fold = finetuned / "fold01"
    expected = np.array(
        [
            [float(x) for x in line.split(",")[2].split()]
            for line in (fold / "predictions_best.csv").read_text().splitlines()[1:]
        ]
    )
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    accuracy = float(np.mean(probs.argmax(1) == np.array(labels)))
    assert accuracy == pytest.approx(json.loads((fold / "results.json").read_text())["best"]["war"])
    assert [row["predicted"] for row in rows] == [names[k] for k in probs.argmax(1)]


@pytest.fixture(scope="session")
def cli_env_infer() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["TQDM_DISABLE"] = "1"
    return env


def _odd_videos(root: Path) -> Path:
    """320x240 at 30 fps with 44.1 kHz stereo AAC (6 s), the same without audio, the same cut to
    its first 60 kB (moov in front: a readable part), cut without its index (unreadable), 1 s."""
    root.mkdir()
    src = [
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
    ]
    enc = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", "-shortest"]
    ffmpeg(*src, "-t", "6", *enc, "-movflags", "+faststart", str(root / "full.mp4"))
    ffmpeg(*src, "-t", "6", *enc, str(root / "tail_index.mp4"))
    ffmpeg("-i", str(root / "full.mp4"), "-an", "-c", "copy", str(root / "silent.mp4"))
    ffmpeg(*src, "-t", "1", *enc, str(root / "one_second.mp4"))
    (root / "truncated.mp4").write_bytes((root / "full.mp4").read_bytes()[:60_000])
    (root / "cut_index.mp4").write_bytes((root / "tail_index.mp4").read_bytes()[:30_000])
    (root / "tail_index.mp4").unlink()
    return root


def test_odd_videos_are_reported_and_the_rest_goes_on(tiny_weights, cli_env_infer, tmp_path):
    videos = _odd_videos(tmp_path / "videos")
    out = tmp_path / "emb.parquet"
    r = subprocess.run(
        CLI
        + [
            "embed",
            "--weights",
            str(tiny_weights),
            str(videos),
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "3",
        ],
        capture_output=True,
        text=True,
        env=cli_env_infer,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    video = {row["video_id"]: row for row in table if row["level"] == "video"}
    windows = {vid: [row for row in table if row["level"] == "window" and row["video_id"] == vid] for vid in video}
    assert {k: v["status"] for k, v in video.items()} == {
        "full": "ok",
        "silent": "no_audio",
        "one_second": "padded",
        "cut_index": "unreadable",
        "truncated": "padded,audio_cut",
    }
    # 6 s at 30 fps = 150 frames at 25 fps: two back-to-back 2.56 s windows
    assert [(w["start_s"], w["end_s"]) for w in windows["full"]] == [(0.0, 2.56), (2.56, 5.12)]
    assert len(video["full"]["fusion"]) == 256 and np.isfinite(video["full"]["fusion"]).all()
    np.testing.assert_allclose(video["full"]["fusion"], np.mean([w["fusion"] for w in windows["full"]], 0), atol=1e-6)
    assert [(w["start_s"], w["end_s"], w["status"]) for w in windows["one_second"]] == [(0.0, 1.0, "padded")]
    assert windows["silent"] == [] and video["silent"]["fusion"] is None
    # the cut file keeps what it holds: 2.47 s of video (61 frames at 25 fps), one padded window,
    # the audio up to its first broken packet (a problem line of its own)
    assert [(w["start_s"], w["end_s"], w["status"]) for w in windows["truncated"]] == [(0.0, 2.44, "padded")]
    problems = list(csv.DictReader((tmp_path / "emb.problems.csv").open()))
    kinds = {}
    for p in problems:
        kinds.setdefault(p["video_id"], []).append(p["kind"])
    assert kinds == {
        "silent": ["no_audio"],
        "one_second": ["padded"],
        "cut_index": ["unreadable"],
        "truncated": ["padded", "audio_cut"],
    }
    cut = [p["message"] for p in problems if p["video_id"] == "truncated" and p["kind"] == "audio_cut"]
    assert len(cut) == 1 and "audio track damaged after 2.3" in cut[0]
    messages = {p["video_id"]: p["message"] for p in problems if p["kind"] != "audio_cut"}
    assert "shorter than one 2.56 s window" in messages["one_second"] and "audio" in messages["silent"]
    assert "5 videos" in r.stdout


def test_predict_from_pretraining_weights_is_a_clear_error(tmp_path, capsys):
    from hicmae_dist.cli import main
    from hicmae_dist.config import load_config
    from hicmae_dist.models import build_model
    from hicmae_dist.models.convert import Converted, ours_file_payload

    cfg = load_config("tiny-cpu").model
    path = tmp_path / "pre.pth"
    torch.save(ours_file_payload(Converted("hicmae", "pretrain", cfg, None, build_model(cfg).state_dict())), path)
    (tmp_path / "a.mp4").write_bytes(b"")
    code = main(["predict", "--weights", str(path), str(tmp_path / "a.mp4"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "no head to predict with" in err and "Traceback" not in err
    # a bad --out suffix is named before anything is loaded
    code = main(["embed", "--weights", str(path), str(tmp_path / "a.mp4"), "--out", str(tmp_path / "e.csv")])
    assert code == 2 and ".parquet or .npz" in capsys.readouterr().err


def test_a_fold_fine_tuned_from_another_size_loads_by_its_shapes(tmp_path, caplog):
    """A fold's config.yaml holds the preset's model section even when the weights it fine-tuned
    were of another size: the loader reads the size from best.pth and says so (a wider tiny: its
    width; the authors' HiCMAE-T: the converter's whole inference)."""
    import dataclasses
    import logging

    from hicmae_dist.config import load_config
    from hicmae_dist.models import build_finetune_model

    cfg = load_config("finetune-tiny-cpu", ["finetune.num_outputs=4"])
    fold = tmp_path / "ft" / "fold01"
    fold.mkdir(parents=True)
    (fold / "config.yaml").write_text(cfg.to_yaml())
    torch.save(
        build_finetune_model(dataclasses.replace(cfg.model, width=128, heads=2), 4).state_dict(), fold / "best.pth"
    )
    with caplog.at_level(logging.WARNING):
        model = hicmae_dist.load(tmp_path / "ft", device="cpu")
    assert (model.cfg.width, model.cfg.heads, model.names) == (128, 2, ("0", "1", "2", "3"))
    assert "does not fit its weights" in caplog.text
    # an authors' HiCMAE-T fine-tune saved under the tiny preset's section: the converter's size
    from hicmae_dist.models.convert import to_ours
    from tests.models.test_convert import random_state

    authors = to_ours({"model": random_state("hicmae_finetune_tiny")})
    torch.save(authors.state_dict, fold / "best.pth")
    cfg = load_config("finetune-tiny-cpu", ["finetune.num_outputs=6"])
    (fold / "config.yaml").write_text(cfg.to_yaml())
    model = hicmae_dist.load(tmp_path / "ft", device="cpu")
    assert model.cfg == authors.cfg and model.cfg.width == 256 and len(model.names) == 6


def test_an_unexpected_error_is_that_videos_status(monkeypatch, tmp_path):
    from hicmae_dist.config import load_config
    from hicmae_dist.infer import run
    from hicmae_dist.infer.sources import VideoInput
    from hicmae_dist.infer.windows import Recipe

    path = tmp_path / "v.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=160x120:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=sample_rate=16000",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
        str(path),
    )

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "window_inputs", boom)
    prepared = run.prepare_clip(
        VideoInput("v", path),
        Recipe.of(load_config("finetune-tiny-cpu").model),
        {"hop": None, "segments": None, "crops": 1},
        None,
        "pad",
    )
    assert prepared.result.status == "failed" and prepared.video is None
    assert [(p.kind, p.message) for p in prepared.result.problems] == [("failed", "RuntimeError: boom")]
