"""The data layer end to end on a few real clips: synth -> prepare -> loader, plus the pieces."""
from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import av
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
import webdataset as wds

from hicmae_dist.config import DataConfig, ModelConfig
from hicmae_dist.data import audio, loader, video
from hicmae_dist.data.prepare import find_clips, prepare_shards
from hicmae_dist.data.synth import write_corpus
from tests.support import require

NUM_SYNTH = 6
WAV_BESIDE = "id09995/wavbeside0/00001"  # silent mp4 + a 44.1 kHz stereo wav beside it: resampled
NUM_GOOD = NUM_SYNTH + 1
BAD = {  # key -> how prepare must describe it
    "id09990/truncated00/00001": "too short",  # the first 20 kB of a good mp4
    "id09991/noaudio0000/00001": "no readable audio",
    "id09992/twoseconds0/00001": "too short",  # 2 s < the 2.56 s window
    "id09993/garbage0000/00001": "unreadable video",
    "id09994/shortaudio0/00001": "ends before the video",  # 1 s wav beside a 3.2 s mp4
}


@pytest.fixture(autouse=True)
def one_thread():
    """Decode in-process with one thread, as a DataLoader worker does (and fast on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The synthetic clips plus hand-made odd ones: BAD and WAV_BESIDE (neither in labels.csv)."""
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    root = tmp_path_factory.mktemp("data") / "corpus"
    write_corpus(root, NUM_SYNTH, num_classes=3, seed=1, workers=2, progress=False)
    good = str(next(root.glob("dev/mp4/*/*/*.mp4")))
    path = {key: root / "dev" / "mp4" / f"{key}.mp4" for key in [*BAD, WAV_BESIDE]}
    for p in path.values():
        p.parent.mkdir(parents=True)
    path["id09990/truncated00/00001"].write_bytes(Path(good).read_bytes()[:20_000])
    _ffmpeg("-i", good, "-an", "-c", "copy", str(path["id09991/noaudio0000/00001"]))
    _ffmpeg("-i", good, "-t", "2", "-c", "copy", str(path["id09992/twoseconds0/00001"]))
    path["id09993/garbage0000/00001"].write_bytes(random.Random(0).randbytes(5000))
    for key, wav_args in (("id09994/shortaudio0/00001", ["-t", "1"]), (WAV_BESIDE, ["-ar", "44100", "-ac", "2"])):
        _ffmpeg("-i", good, "-an", "-c", "copy", str(path[key]))
        _ffmpeg("-i", good, "-vn", *wav_args, str(path[key].with_suffix(".wav")))
    return root


@pytest.fixture(scope="module")
def labels(corpus) -> dict[str, int]:
    with open(corpus / "labels.csv", newline="") as f:
        return {row["key"]: int(row["label"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards(corpus, out, shard_size_mb=0.2, progress=False)  # one clip (~270 kB) per shard
    return out


def _cfg(**data) -> tuple[DataConfig, ModelConfig]:
    return DataConfig(**{"batch_size": 3, "num_workers": 0, "shuffle_buffer": 4, **data}), ModelConfig()


def _take(shards_dir: Path, batches: int, data_cfg: DataConfig, model_cfg: ModelConfig, **kw) -> list[dict]:
    it = iter(loader.make_pretrain_loader(shards_dir, data_cfg, model_cfg, **kw))
    return [next(it) for _ in range(batches)]


def test_corpus_is_real_mp4_in_the_official_layout(corpus, labels):
    assert len(labels) == NUM_SYNTH and set(labels.values()) == {0, 1, 2}
    for key in labels:
        speaker, vid, clip = key.split("/")
        assert speaker.startswith("id") and len(speaker) == 7 and len(vid) == 11 and len(clip) == 5
        with av.open(str(corpus / "dev" / "mp4" / f"{key}.mp4")) as container:
            v, a = container.streams.video[0], container.streams.audio[0]
            assert (v.codec_context.name, v.width, v.height, v.average_rate) == ("h264", 224, 224, 25)
            assert (a.codec_context.name, a.sample_rate, a.channels) == ("aac", 16000, 1)
            assert v.frames == 80  # 3.2 s
        with av.open(str(corpus / "dev" / "aac" / f"{key}.m4a")) as container:
            (a,) = container.streams
            assert (a.type, a.codec_context.name, a.sample_rate) == ("audio", "aac", 16000)
    assert not list(corpus.rglob("*.part"))


def test_synth_is_reproducible(tmp_path):
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")

    def files(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    kw = dict(num_classes=2, duration_s=2.8, progress=False)
    a = write_corpus(tmp_path / "a", 1, seed=7, **kw)
    b = write_corpus(tmp_path / "b", 1, seed=7, **kw)
    c = write_corpus(tmp_path / "c", 1, seed=8, **kw)
    assert {k: v for k, v in a.items() if k not in ("out_dir", "labels")} == \
           {k: v for k, v in b.items() if k not in ("out_dir", "labels")}
    assert files(tmp_path / "a") == files(tmp_path / "b")  # labels.csv and every media byte
    assert (tmp_path / "a/labels.csv").read_text() != (tmp_path / "c/labels.csv").read_text()


def test_prepare_skips_bad_clips_and_writes_the_rest(corpus, shards, labels):
    clips = {c.key: c for c in find_clips(corpus)}
    assert clips.keys() == set(labels) | set(BAD) | {WAV_BESIDE}
    assert clips[next(iter(labels))].audio_path.suffix == ".m4a"  # from the aac tree
    assert clips[WAV_BESIDE].audio_path.suffix == ".wav"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["clips"] == NUM_GOOD and manifest["speakers"] == 3 and manifest["labelled"]
    assert manifest["num_skipped"] == len(BAD)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    for key, expected in BAD.items():
        assert expected in reasons[key], (key, reasons[key])
    assert manifest["frames"] == NUM_GOOD * 20  # 80 frames, one in 4 kept
    assert manifest["seconds"] == pytest.approx(NUM_GOOD * 3.2, abs=0.5)
    tars = sorted(shards.glob("shard-*.tar"))
    assert [s["shard"] for s in manifest["shards"]] == [t.name for t in tars]
    assert manifest["bytes"] == sum(t.stat().st_size for t in tars)
    assert not list(shards.glob("*.tmp"))

    stored = {}
    for sample in wds.tarfile_samples([{"url": str(t)} for t in tars]):
        meta = json.loads(sample["json"])
        stored[meta["key"]] = meta
        assert (meta["fps"], meta["num_frames"], meta["frame_stride"]) == (25.0, 20, 4)
        assert len(sample["pcm"]) == 2 * meta["num_samples"]
        assert meta["num_samples"] == pytest.approx(3.2 * 16000, abs=1100)  # AAC frame padding
        assert meta["sample_rate"] == 16000  # WAV_BESIDE's 44.1 kHz stereo resampled to mono
        first = video.decode_jpegs(sample["jpgs"], meta["frame_bytes"], range(1))
        assert first.shape == (1, 3, 160, 160)
    assert {k: m["label"] for k, m in stored.items()} == {**labels, WAV_BESIDE: -1}


def test_prepare_resumes_without_redoing_clips(corpus, tmp_path):
    out = tmp_path / "shards"
    first = prepare_shards(corpus, out, shard_size_mb=100, limit=3, progress=False)
    assert first["clips"] == 3
    (out / "shard-000001.tar.tmp").write_bytes(b"left over by a crash")
    second = prepare_shards(corpus, out, shard_size_mb=100, progress=False)
    assert second["clips"] == NUM_GOOD and [s["clips"] for s in second["shards"]] == [3, NUM_GOOD - 3]
    keys = [name.split(".")[0] for t in sorted(out.glob("shard-*.tar"))
            for name in tarfile.open(t).getnames()]
    assert len(keys) == 3 * NUM_GOOD and len(set(keys)) == NUM_GOOD  # 3 members per clip, no repeats
    assert not list(out.glob("*.tmp"))


def test_loader_batches(shards, labels):
    data_cfg, model_cfg = _cfg()
    for batch in _take(shards, 2, data_cfg, model_cfg):
        assert batch["video"].shape == (3, 3, 16, 160, 160) and batch["video"].dtype == torch.float32
        assert batch["audio"].shape == (3, 1, 256, 128) and batch["audio"].dtype == torch.float32
        assert batch["video_mask"].shape == (3, 800) and batch["video_mask"].dtype == torch.bool
        assert batch["audio_mask"].shape == (3, 128) and batch["audio_mask"].dtype == torch.bool
        assert ((~batch["video_mask"]).sum(1) == 80).all() and ((~batch["audio_mask"]).sum(1) == 26).all()
        # one spatial mask repeated over the 8 temporal slices
        tubes = batch["video_mask"].view(3, 8, 100)
        assert (tubes == tubes[:, :1]).all()
        lo = min((0 - m) / s for m, s in zip(video.IMAGENET_MEAN, video.IMAGENET_STD))
        hi = max((1 - m) / s for m, s in zip(video.IMAGENET_MEAN, video.IMAGENET_STD))
        assert lo - 1e-4 <= batch["video"].min() and batch["video"].max() <= hi + 1e-4
        assert batch["video"].std() > 0.1 and torch.isfinite(batch["audio"]).all()
        assert -3 < batch["audio"].min() < batch["audio"].max() < 3 and batch["audio"].std() > 0.1
        assert batch["label"].dtype == torch.int64
        assert batch["label"].tolist() == [labels.get(k, -1) for k in batch["key"]]


def test_loader_streams_are_seeded_and_split(shards):
    data_cfg, model_cfg = _cfg(multiscale_crop=True, roll_augment=True)

    def keys(batches: list[dict]) -> list[str]:
        return [k for b in batches for k in b["key"]]

    a, b = _take(shards, 2, data_cfg, model_cfg, seed=3), _take(shards, 2, data_cfg, model_cfg, seed=3)
    assert keys(a) == keys(b)
    for x, y in zip(a, b):
        for name in ("video", "audio", "video_mask", "audio_mask"):
            assert torch.equal(x[name], y[name])
    c = _take(shards, 2, data_cfg, model_cfg, seed=4)
    assert keys(c) != keys(a) or not torch.equal(c[0]["video_mask"], a[0]["video_mask"])

    # one clip per shard, 2 ranks: each rank reads its own shards
    rank0 = set(keys(_take(shards, 4, data_cfg, model_cfg, rank=0, world_size=2)))
    rank1 = set(keys(_take(shards, 4, data_cfg, model_cfg, rank=1, world_size=2)))
    assert rank0 and rank1 and not rank0 & rank1


def test_loader_in_a_worker_process(shards):
    data_cfg, model_cfg = _cfg(num_workers=1)
    (batch,) = _take(shards, 1, data_cfg, model_cfg)
    assert batch["video"].shape == (3, 3, 16, 160, 160) and len(batch["key"]) == 3


def test_audio_window_follows_the_sampled_frames(shards):
    """The fbank is that of the 2.56 s of audio under the 16 sampled frames."""
    data_cfg, model_cfg = _cfg(multiscale_crop=False, gain_augment=False)
    sample = next(iter(wds.tarfile_samples([{"url": str(next(shards.glob("shard-*.tar")))}])))
    stream = loader._PretrainStream([], data_cfg, model_cfg, 0, 1, 0)
    for seed in range(3):
        clip = stream._decode(sample, random.Random(seed), torch.Generator())
        start = video.sample_start(20, 16, random.Random(seed))  # the loader's first draw
        first = start * 4 * 16000 // 25  # stored frame i is source frame 4i at 25 fps
        wave = audio.from_pcm16(sample["pcm"])[:, first:first + 40960]
        assert torch.equal(clip["audio"][0], audio.fbank(wave))
        frames = video.decode_jpegs(sample["jpgs"], json.loads(sample["json"])["frame_bytes"],
                                    range(start, start + 16))
        assert torch.equal(clip["video"], video.to_model_input(frames, None, 160))


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})


def test_bad_samples_are_skipped_then_fatal_past_the_limit(shards, tmp_path, monkeypatch, caplog):
    samples = list(wds.tarfile_samples([{"url": str(t)} for t in sorted(shards.glob("shard-*.tar"))[:2]]))
    corrupt = dict(samples[0], jpgs=b"not a jpeg")
    _write_shard(tmp_path / "shard-000000.tar", samples[1:] + [corrupt])
    shutil.copy(shards / "manifest.json", tmp_path)
    monkeypatch.setattr(loader, "MIN_READS_BEFORE_BAD_CHECK", 20)

    # one good clip and the corrupt one: half the reads fail; under a limit of 0.6 it runs on
    data_cfg, model_cfg = _cfg(max_bad_fraction=0.6, batch_size=2)
    for batch in _take(tmp_path, 6, data_cfg, model_cfg):
        assert samples[0]["__key__"] not in batch["key"]
    assert "skipping sample " + samples[0]["__key__"] in caplog.text

    data_cfg, model_cfg = _cfg(max_bad_fraction=0.1, batch_size=2)
    with pytest.raises(loader.BadDataError, match="max_bad_fraction=0.1"):
        _take(tmp_path, 20, data_cfg, model_cfg)


def test_truncated_shard_is_skipped(shards, tmp_path, caplog):
    tars = sorted(shards.glob("shard-*.tar"))
    shutil.copy(tars[0], tmp_path / tars[0].name)
    data = tars[1].read_bytes()
    (tmp_path / tars[1].name).write_bytes(data[: len(data) // 2])
    data_cfg, model_cfg = _cfg(max_bad_fraction=1.0, batch_size=2)
    _take(tmp_path, 3, data_cfg, model_cfg)
    assert "skipping the rest of a shard" in caplog.text and tars[1].name in caplog.text


def test_fbank_matches_kaldi():
    gen = torch.Generator().manual_seed(0)
    for samples in (30_000, 60_000):  # padded to 256 frames, cut to 256 frames
        wave = 0.1 * torch.randn(1, samples, generator=gen) + 0.05
        ref = kaldi.fbank(wave - wave.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
                          window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        ref = torch.cat([ref, torch.zeros(max(0, 256 - ref.shape[0]), 128)])[:256]
        ref = (ref + 4.2677393) / (2 * 4.5689974)
        out = audio.fbank(wave)
        assert out.shape == (256, 128) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_audio_augmentations():
    rng = random.Random(0)
    wave = torch.arange(1000, dtype=torch.float32).view(1, 1000)
    gains = [float(audio.random_gain(wave, rng)[0, 1]) for _ in range(200)]
    assert 0.5 < min(gains) < 1.0 < max(gains) < 1.5
    shifts = {int(torch.argmin(audio.random_roll(wave, rng))) for _ in range(50)}
    assert len(shifts) > 40  # a real roll along time, not the release's no-op
    pcm = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 32767 / 32768]])
    assert torch.equal(audio.from_pcm16(audio.to_pcm16(pcm)), pcm)


def test_multiscale_crop_boxes():
    rng = random.Random(0)
    boxes = {video.multiscale_crop_box(160, rng) for _ in range(5000)}
    sides = [160, 140, 120, 105]
    pairs = {(h, w) for _, _, h, w in boxes}
    assert pairs == {(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1}
    for top, left, h, w in boxes:
        assert 0 <= top <= 160 - h and 0 <= left <= 160 - w
    assert len({(t, l) for t, l, h, w in boxes if (h, w) == (120, 105)}) == 13
    frames = torch.randint(0, 256, (16, 3, 160, 160), dtype=torch.uint8)
    out = video.to_model_input(frames, (10, 20, 120, 105), 160)
    assert out.shape == (3, 16, 160, 160) and out.dtype == torch.float32
    # no crop: exactly the normalised stored pixels
    ref = (frames.float() / 255 - torch.tensor(video.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(video.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(video.to_model_input(frames, None, 160), ref.permute(1, 0, 2, 3))
