"""`hicmae-dist bench data --quick`: every row, the goal and the capacity arithmetic, and the
release path's clip against the loader's for the same clip, start and crop."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil

import pytest
import torch

from hicmae_dist.cli import main
from tests.support import require


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run through the CLI, its work directory kept: (table, results, work dir)."""
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    work, out = tmp_path_factory.mktemp("bench-data"), io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "bench",
                    "data",
                    "--quick",
                    "--clips",
                    "4",
                    "--batches",
                    "2",
                    "--batch-size",
                    "2",
                    "--work-dir",
                    str(work),
                    "--out",
                    str(work / "out"),
                ]
            )
            == 0
        )
    table = out.getvalue()
    assert (work / "out" / "results.md").read_text() == table.rpartition("\nresults: ")[0] + "\n"
    return table, json.loads((work / "out" / "results.json").read_text()), work


def test_every_row(quick):
    table, result, _ = quick
    for section in ("## prepare", "## loader", "## device", "## profile", "## capacity", "goal: HiCMAE >= 300"):
        assert section in table
    rows = [("release", "wav", 0)] + [
        (path, form, w)
        for path in ("float", "uint8")
        for form, workers in (("wave", (0, 1, 2)), ("fbank", (0,)))
        for w in workers
    ]
    rows += [("jpeg", "wave", 0), ("jpeg", "fbank", 0)]  # the workers' side of decode_on=cuda
    assert [(r["arch"], r["path"], r["audio"], r["workers"]) for r in result["loader"]] == [
        (arch, *row) for arch in ("hicmae", "cavmae") for row in rows
    ]
    assert [r["workers"] for r in result["prepare"]] == [1, 2, 2, 2, 2]
    for row in result["loader"]:
        assert row["clips_per_cpu_s"] > 0 if row["workers"] == 0 else row["clips_per_s_per_worker"] > 0
    for row in result["prepare"]:
        assert row["clips_per_s"] > 0 and row["clips_per_s_per_worker"] > 0
    assert [(d["arch"], d["device"]) for d in result["device"]][:2] == [("hicmae", "cpu"), ("cavmae", "cpu")]
    assert all(d["clips_per_s"] > 0 for d in result["device"])
    for arch in ("hicmae", "cavmae"):
        prof = result["profile"][arch]
        assert set(prof) == {"release", "float", "uint8", "uint8, fbank"} and all(
            p["total_ms"] > 0 for p in prof.values()
        )
        assert "new batch memory" in prof["float"]["ms"] and "new batch memory" not in prof["uint8"]["ms"]
        assert "crop+resize" in prof["uint8"]["ms"] and "fbank+augment" in prof["uint8"]["ms"]
    assert set(result["profile"]["hicmae"]["release"]["ms"]) >= {"open mp4", "decode frames", "read wav", "fbank"}
    assert set(result["profile"]["cavmae"]["release"]["ms"]) >= {"jpeg decode", "read wav", "fbank+augment"}


def test_goal_follows_the_rows(quick):
    _, result, _ = quick
    g = result["goal"]
    main_rows = {
        r["path"] if r["audio"] in ("wave", "wav") else f"{r['path']}, {r['audio']}": r
        for r in result["loader"]
        if r["arch"] == "hicmae" and r["workers"] == 0
    }
    assert g["target_clips_per_core"] == 300 and g["target_vs_release"] == 13
    assert g["hicmae_clips_per_core"] == main_rows[g["path"]]["clips_per_cpu_s"] > 0
    assert g["release_clips_per_core"] == main_rows["release"]["clips_per_cpu_s"] > 0
    assert g["vs_release"] == pytest.approx(g["hicmae_clips_per_core"] / g["release_clips_per_core"], abs=0.01)
    assert g["met"] == (g["hicmae_clips_per_core"] >= 300 and g["vs_release"] >= 13) and g["limited_by"]
    gpu = g["gpu_decode"]
    assert gpu["hicmae_clips_per_core"] == main_rows["jpeg, fbank"]["clips_per_cpu_s"] > 0
    assert gpu["vs_release"] == pytest.approx(gpu["hicmae_clips_per_core"] / g["release_clips_per_core"], abs=0.01)


def test_capacity_follows_the_formula(quick):
    from hicmae_dist.models.info import model_config
    from hicmae_dist.models.macs import macs

    _, result, _ = quick
    rates = {
        (r["arch"], r["path"] if r["audio"] in ("wave", "wav") else f"{r['path']}, {r['audio']}"): r["clips_per_cpu_s"]
        for r in result["loader"]
        if r["workers"] == 0
    }
    assert [c["model"] for c in result["capacity"]] == ["hicmae-s", "hicmae-b", "cavmae-base"]
    for c in result["capacity"]:
        cfg = model_config(c["model"])
        flops = 6 * sum(macs(cfg, "pretrain").values())  # 3 x (2 FLOPs per MAC) x forward
        gpu = 0.4 * 989.4e12 / flops
        assert c["train_flops"] == flops and c["gpu_clips_per_s"] == pytest.approx(gpu, abs=0.1)
        assert set(c["cores_per_gpu"]) == {
            "release",
            "float",
            "uint8",
            "float, fbank",
            "uint8, fbank",
            "jpeg",
            "jpeg, fbank",
        }
        for path, cores in c["cores_per_gpu"].items():
            assert cores == pytest.approx(gpu / rates[cfg.arch, path], abs=0.1)
    s, b = result["capacity"][:2]
    assert s["cores_per_gpu"]["float"] > b["cores_per_gpu"]["float"]  # the smaller model eats clips faster


def test_release_clip_matches_the_loader(quick):
    """The same preprocessing decoded from the mp4 instead of stored JPEGs (q90): the video
    within JPEG error, the fbank equal where the windows agree (the release's is one frame longer,
    2.6 s, so its last two fbank frames are audio where ours are padding)."""
    from hicmae_dist.bench.data import ARCH_PRESETS, release_clip, release_wavs
    from hicmae_dist.config import DataConfig, load_config
    from hicmae_dist.data.device import to_device
    from hicmae_dist.data.loader import make_pretrain_loader

    _, _, work = quick
    m = load_config(ARCH_PRESETS["hicmae"]).model
    pairs = release_wavs(work / "corpus", work / "release-wav")
    data_cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=2, multiscale_crop=True, gain_augment=False)
    batch = to_device(next(iter(make_pretrain_loader(work / "shards-hicmae-wave-w1", data_cfg, m, seed=0))), "cpu")
    for t, key in enumerate(batch["key"]):
        box = tuple(batch["crop"][t].tolist())
        video, audio, ticks = release_clip(*pairs[key], m, random.Random(0), int(batch["start_frame"][t]), box)
        assert video.shape == batch["video"][t].shape and audio.shape == batch["audio"][t].shape
        assert (video - batch["video"][t]).abs().mean() < 0.1  # ~ 2 grey levels of JPEG error: 0.04
        assert torch.corrcoef(torch.stack([video.flatten(), batch["video"][t].flatten()]))[0, 1] > 0.99
        torch.testing.assert_close(audio[:, :254], batch["audio"][t][:, :254], rtol=0, atol=1e-3)
        assert len(ticks) == 7 and ticks == sorted(ticks)
    assert not torch.equal(video, release_clip(*pairs[key], m, random.Random(0), 0, (0, 0, 105, 105))[0])


def test_cavmae_release_clip_matches_the_loader(quick):
    """CAV-MAE's release reads one of the 10 frames as a JPEG of its own (q95) and the whole wav:
    the same frame within JPEG error, the same fbank (noise and roll off on both sides)."""
    from torchcodec.decoders import VideoDecoder

    from hicmae_dist.bench.data import ARCH_PRESETS, release_cavmae_clip, release_inputs
    from hicmae_dist.config import DataConfig, load_config
    from hicmae_dist.data import video as vid
    from hicmae_dist.data.device import to_device
    from hicmae_dist.data.loader import make_pretrain_loader

    _, _, work = quick
    m = load_config(ARCH_PRESETS["cavmae"]).model
    inputs = release_inputs(work / "corpus", work, "cavmae")
    data_cfg = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=2, gain_augment=False, roll_augment=False)
    batch = to_device(next(iter(make_pretrain_loader(work / "shards-cavmae-wave-w2", data_cfg, m, seed=0))), "cpu")
    for t, key in enumerate(batch["key"]):
        mp4 = work / "corpus" / "dev" / "mp4" / f"{key}.mp4"
        source = vid.cavmae_frame_indices(len(VideoDecoder(str(mp4))))
        pick = source.index(int(batch["start_frame"][t]))
        video, audio, _ = release_cavmae_clip(*inputs[key], m, random.Random(0), pick=pick, noise=False)
        assert video.shape == batch["video"][t].shape and audio.shape == batch["audio"][t].shape
        assert (video - batch["video"][t]).abs().mean() < 0.1
        torch.testing.assert_close(audio, batch["audio"][t], rtol=0, atol=1e-3)


def test_bench_parser_keeps_bench_model():
    from hicmae_dist.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "model", "hicmae-t"]).func.__name__ == "cmd_bench_model"
    assert parser.parse_args(["bench", "data", "--quick"]).func.__name__ == "cmd_bench_data"
