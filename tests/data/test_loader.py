"""The pretraining loader on real shards: batches, equality with an independent decode, exact resume,
rank/worker splits, bad samples and truncated shards, CAV-MAE inputs, the audio and video pieces."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

from hicmae_dist.config import DataConfig, ModelConfig, load_config
from hicmae_dist.data import audio, loader, video
from hicmae_dist.data.device import to_device
from hicmae_dist.data.prepare import prepare_shards
from hicmae_dist.data.shards import ShardReader, TarShardWriter, load_index
from tests.data.conftest import NUM_GOOD, WAV_BESIDE

TENSORS = ("video", "audio", "video_mask", "audio_mask", "label", "start_frame", "crop")
MEAN = torch.tensor(video.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(video.IMAGENET_STD).view(3, 1, 1)


def _cfg(**data) -> tuple[DataConfig, ModelConfig]:
    return DataConfig(**{"batch_size": 3, "num_workers": 0, "shuffle_buffer": 4, **data}), ModelConfig()


def _cavmae_model() -> ModelConfig:
    return load_config("cavmae-base-vox2").model


def _take(shards_dir: Path, batches: int, data_cfg: DataConfig, model_cfg: ModelConfig, **kw) -> list[dict]:
    """The batches as the model sees them (to_device: float video), copied out of the loader's
    reused buffers so that all of them can be held."""
    it = iter(loader.make_pretrain_loader(shards_dir, data_cfg, model_cfg, **kw))
    return [_kept(to_device(next(it), "cpu")) for _ in range(batches)]


def _kept(batch: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["index"] for x in a] == [y["index"] for y in b]
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["epoch"] == y["epoch"]
        for name in TENSORS:
            assert torch.equal(x[name], y[name]), (x["index"], name)


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """(3, ..., H, W) ImageNet-normalised -> grey levels in [0, 255]."""
    shape = (3,) + (1,) * (normalised.dim() - 1)
    return (normalised * STD.view(shape) + MEAN.view(shape)) * 255


def _source(corpus: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """An independent decode with PyAV: (frames (N, 224, 224, 3) uint8, audio (S,) float32)."""
    with av.open(str(corpus / "dev" / "mp4" / f"{key}.mp4")) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(corpus / "dev" / "aac" / f"{key}.m4a")) as c:
        wave = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]
    return frames, wave


def _stored_pcm(shards_dir: Path, key: str) -> torch.Tensor:
    indexes = [load_index(p) for p in sorted(shards_dir.glob("shard-*.tar"))]
    n, i = next((n, idx.keys.index(key)) for n, idx in enumerate(indexes) if key in idx.keys)
    return audio.from_pcm16(ShardReader(indexes).read(n, i)["pcm"])[0]


def _kaldi(wave: torch.Tensor, frames: int) -> torch.Tensor:
    """torchaudio's own fbank of the mean-subtracted waveform, padded or cut to `frames`."""
    feats = kaldi.fbank(
        (wave - wave.mean())[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    return torch.cat([feats, torch.zeros(max(0, frames - feats.shape[0]), 128)])[:frames]


def test_loader_batches(shards, labels):
    data_cfg, model_cfg = _cfg()
    batches = _take(shards, 3, data_cfg, model_cfg)
    assert [b["index"] for b in batches] == [0, 1, 2]
    for batch in batches:
        assert batch["video"].shape == (3, 3, 16, 160, 160) and batch["video"].dtype == torch.float32
        assert batch["audio"].shape == (3, 1, 256, 128) and batch["audio"].dtype == torch.float32
        assert batch["video_mask"].shape == (3, 800) and batch["video_mask"].dtype == torch.bool
        assert batch["audio_mask"].shape == (3, 128) and batch["audio_mask"].dtype == torch.bool
        assert ((~batch["video_mask"]).sum(1) == 80).all() and ((~batch["audio_mask"]).sum(1) == 26).all()
        tubes = batch["video_mask"].view(3, 8, 100)  # one spatial mask repeated over the 8 temporal slices
        assert (tubes == tubes[:, :1]).all()
        lo = min((0 - m) / s for m, s in zip(video.IMAGENET_MEAN, video.IMAGENET_STD))
        hi = max((1 - m) / s for m, s in zip(video.IMAGENET_MEAN, video.IMAGENET_STD))
        assert lo - 1e-4 <= batch["video"].min() and batch["video"].max() <= hi + 1e-4
        assert batch["video"].std() > 0.1 and torch.isfinite(batch["audio"]).all()
        assert -3 < batch["audio"].min() < batch["audio"].max() < 3 and batch["audio"].std() > 0.1
        assert batch["label"].dtype == torch.int64 and batch["bad_samples"] == 0
        assert batch["label"].tolist() == [labels.get(k, -1) for k in batch["key"]]
        assert (batch["start_frame"] % 4 == 0).all() and batch["start_frame"].max() <= 80 - 64
    ld = loader.make_pretrain_loader(shards, data_cfg, model_cfg)
    assert ld.batches_per_epoch == NUM_GOOD // 3
    it = iter(ld)
    next(it), next(it)
    assert ld.stats() == {
        "batches": 2,
        "samples": 6,
        "bad_samples": 0,
        "bad_fraction": 0.0,
        "next_batch": 2,
        "epoch": 1,
        "batches_per_epoch": 2,
    }


def test_loader_matches_an_independent_decode(corpus, shards):
    """Frames and fbank of each clip equal a PyAV decode of its mp4 / m4a over the same window:
    pixels within JPEG error, the stored PCM within one int16 step of PyAV's, and the fbank
    exactly torchaudio's on the stored PCM."""
    data_cfg, model_cfg = _cfg(multiscale_crop=True, gain_augment=False, batch_size=4)
    (batch,) = _take(shards, 1, data_cfg, model_cfg, seed=5)
    checked = 0
    for t, key in enumerate(batch["key"]):
        if key == WAV_BESIDE:
            continue  # no m4a (its wav is 44.1 kHz stereo: resampled by prepare)
        frames, wave = _source(corpus, key)
        start = int(batch["start_frame"][t])
        clip = (
            torch.from_numpy(frames[start : start + 64 : 4, 0:160, 32:192]).permute(0, 3, 1, 2).float()
        )  # the face crop
        top, left, h, w = batch["crop"][t].tolist()
        clip = F.interpolate(
            clip[..., top : top + h, left : left + w], size=(160, 160), mode="bilinear", align_corners=False
        )  # (16, 3, 160, 160)
        err = (_pixels(batch["video"][t]).permute(1, 0, 2, 3) - clip).abs()
        assert err.mean() < 4.0, (key, err.mean())  # JPEG q90 on noisy synthetic frames: ~2-3.5 grey levels

        stored = _stored_pcm(shards, key)
        pyav = torch.from_numpy(wave)
        assert stored.shape == pyav.shape
        steps = ((stored - pyav) * 32768).abs()
        assert steps.max() <= 1.0001 and (steps > 0.5).float().mean() < 0.01  # the int16 rounding, nothing else
        first = start * 16000 // 25  # source frame f starts at f / 25 s
        window = stored[first : first + 40960]
        expected = (_kaldi(window, 256) + 4.2677393) / (2 * 4.5689974)
        assert torch.equal(batch["audio"][t, 0], expected), key
        unquantised = (_kaldi(pyav[first : first + 40960], 256) + 4.2677393) / (2 * 4.5689974)
        assert (batch["audio"][t, 0] - unquantised).abs().mean() < 1e-3  # int16 rounding: ~1e-4, more in quiet bins
        checked += 1
    assert checked >= 3


def test_cavmae_inputs_match_an_independent_decode(corpus, cavmae_shards):
    data_cfg = DataConfig(
        batch_size=4, num_workers=0, shuffle_buffer=4, multiscale_crop=False, gain_augment=False, roll_augment=False
    )
    model_cfg = _cavmae_model()
    (batch,) = _take(cavmae_shards, 1, data_cfg, model_cfg, seed=2)
    assert batch["video"].shape == (4, 3, 224, 224) and batch["audio"].shape == (4, 1, 1024, 128)
    assert batch["video_mask"].shape == (4, 196) and batch["audio_mask"].shape == (4, 512)
    assert ((~batch["video_mask"]).sum(1) == 49).all() and ((~batch["audio_mask"]).sum(1) == 128).all()
    checked = 0
    for t, key in enumerate(batch["key"]):
        if key == WAV_BESIDE:
            continue
        frames, _ = _source(corpus, key)
        frame = int(batch["start_frame"][t])
        assert frame in video.cavmae_frame_indices(80)
        err = (_pixels(batch["video"][t]) - torch.from_numpy(frames[frame]).permute(2, 0, 1).float()).abs()
        assert err.mean() < 4.0
        expected = (_kaldi(_stored_pcm(cavmae_shards, key), 1024) + 5.081) / 4.4849
        assert torch.equal(batch["audio"][t, 0], expected)
        checked += 1
    assert checked >= 3
    # CAV-MAE's noise and roll: the same fbank, shifted in time, plus at most 0.1 of noise
    data_cfg.roll_augment = True
    (aug,) = _take(cavmae_shards, 1, data_cfg, model_cfg, seed=2)
    assert aug["key"] == batch["key"] and torch.equal(aug["video"], batch["video"])
    for t in range(4):
        a, b = aug["audio"][t, 0], batch["audio"][t, 0]
        fits = [
            s
            for s in range(-1024, 1024)
            if bool(((d := a[:, 0] - torch.roll(b[:, 0], s)) >= 0).all() and (d < 0.1).all())
        ]
        assert fits, t
        noise = a - torch.roll(b, fits[0], 0)
        assert 0 <= noise.min() and noise.max() < 0.1 and noise.std() > 0


def test_stored_form_is_checked(shards, cavmae_shards, corpus, tmp_path):
    data_cfg, model_cfg = _cfg()
    with pytest.raises(loader.BadDataError, match="--full-frame --frames ten"):
        loader.make_pretrain_loader(shards, data_cfg, _cavmae_model())
    with pytest.raises(loader.BadDataError, match="HiCMAE takes 16 frames in a row"):
        loader.make_pretrain_loader(cavmae_shards, data_cfg, model_cfg)
    with pytest.raises(loader.BadDataError, match="--image-size 192"):
        loader.make_pretrain_loader(shards, data_cfg, ModelConfig(image_size=192))
    # whole frames at stride 4 serve both models: HiCMAE gets its face crop cut by the loader
    full = tmp_path / "full"
    prepare_shards(corpus, full, full_frame=True, speakers=["id00000"], progress=False)
    data_cfg.multiscale_crop = False
    (batch,) = _take(full, 1, data_cfg, model_cfg)
    assert batch["video"].shape == (3, 3, 16, 160, 160)
    (cav,) = _take(full, 1, data_cfg, _cavmae_model())
    assert cav["video"].shape == (3, 3, 224, 224)


def test_exact_resume_with_two_workers(shards, monkeypatch):
    """A stream started at batch 3 is batches 3.. of the stream started at 0, bit for bit, with 2
    DataLoader workers (which take turns), across epoch boundaries; skipping decodes nothing."""
    data_cfg, model_cfg = _cfg(num_workers=2, batch_size=2, multiscale_crop=True, roll_augment=True)
    fresh = _take(shards, 8, data_cfg, model_cfg, seed=3)
    assert [b["epoch"] for b in fresh] == [0, 0, 0, 1, 1, 1, 2, 2]  # 7 clips, batch 2: 3 batches an epoch
    resumed = _take(shards, 5, data_cfg, model_cfg, seed=3, start_batch=3)
    _same(fresh[3:], resumed)
    _same(fresh[4:6], _take(shards, 2, data_cfg, model_cfg, seed=3, start_batch=4))  # the other worker first

    # in-process: the same stream shape with one worker, and skipping costs no decode
    data_cfg.num_workers = 0
    one = _take(shards, 6, data_cfg, model_cfg, seed=3)
    decoded = []
    original = loader.PretrainStream._decode_into
    monkeypatch.setattr(loader.PretrainStream, "_decode_into", lambda self, *a: decoded.append(1) or original(self, *a))
    _same(one[5:], _take(shards, 1, data_cfg, model_cfg, seed=3, start_batch=5))
    assert len(decoded) == 2  # one batch of 2, not 6
    monkeypatch.undo()
    ld = loader.make_pretrain_loader(shards, data_cfg, model_cfg, seed=3)
    _same(one[3:6], [_kept(to_device(b, "cpu")) for b in ld.epoch(1)])  # one epoch, as a finite pass
    other = _take(shards, 2, data_cfg, model_cfg, seed=4)
    assert [b["key"] for b in other] != [b["key"] for b in one[:2]] or not torch.equal(
        other[0]["video_mask"], one[0]["video_mask"]
    )


def test_two_nodes_two_workers_split_the_shards(shards):
    """world_size 2 x 2 workers: in each epoch the 4 (rank, worker) slots read disjoint shards,
    and a rank's stream resumed at a recorded batch continues it."""
    data_cfg, model_cfg = _cfg(num_workers=2, batch_size=1, shuffle_buffer=2)
    shard_of = {load_index(p).keys[0]: p.name for p in shards.glob("shard-*.tar")}  # one clip per shard
    streams = {
        r: loader.make_pretrain_loader(shards, data_cfg, model_cfg, rank=r, world_size=2, seed=1).stream for r in (0, 1)
    }
    for epoch in range(4):
        slots = [set(streams[r].epoch_shards(epoch, v)) for r in (0, 1) for v in (0, 1)]
        assert sum(map(len, slots)) == NUM_GOOD and set().union(*slots) == set(range(NUM_GOOD))
    per_epoch = streams[0].batches_per_epoch
    assert per_epoch == NUM_GOOD // 2
    read: dict[tuple[int, int, int], set] = {}
    for rank in (0, 1):
        batches = _take(shards, 2 * per_epoch, data_cfg, model_cfg, rank=rank, world_size=2, seed=1)
        for b in batches:
            read.setdefault((b["epoch"], rank, b["index"] % 2), set()).update(shard_of[k] for k in b["key"])
        resumed = _take(shards, 3, data_cfg, model_cfg, rank=rank, world_size=2, seed=1, start_batch=2)
        _same(batches[2:5], resumed)
    for epoch in (0, 1):
        slots = [s for (e, _, _), s in read.items() if e == epoch]
        assert len(slots) == 4
        assert sum(map(len, slots)) == len(set().union(*slots))  # no shard read by two slots


def _rewrite(path: Path, samples: list[dict]) -> Path:
    with TarShardWriter(path) as w:
        for s in samples:
            w.write(s)
    (path.with_suffix(".json")).write_text(json.dumps({"boundaries": w.boundaries, "keys": w.keys}))
    return path


def _samples(shards: Path) -> list[dict]:
    indexes = [load_index(p) for p in sorted(shards.glob("shard-*.tar"))]
    reader = ShardReader(indexes)
    return [{k: v for k, v in reader.read(n, 0).items() if k != "__url__"} for n in range(len(indexes))]


def test_bad_samples_are_replaced_counted_then_fatal_past_the_limit(shards, tmp_path, monkeypatch, caplog):
    samples = _samples(shards)
    corrupt = [dict(samples[0], jpgs=b"not a jpeg"), dict(samples[1], json=b"{not json")]
    for n, group in enumerate([[samples[2], corrupt[0], samples[3]], [samples[4], corrupt[1], samples[5]]]):
        _rewrite(tmp_path / f"shard-{n:06d}.tar", group)
    shutil.copy(shards / "manifest.json", tmp_path)
    monkeypatch.setattr(loader, "MIN_READS_BEFORE_BAD_CHECK", 20)
    bad_keys = {samples[0]["__key__"], samples[1]["__key__"]}

    # a third of the samples are corrupt: under a limit of 0.5 the run goes on, batches full
    data_cfg, model_cfg = _cfg(max_bad_fraction=0.5, batch_size=6)
    ld = loader.make_pretrain_loader(tmp_path, data_cfg, model_cfg)
    it = iter(ld)
    batches = [next(it) for _ in range(5)]
    for batch in batches:
        assert not bad_keys & set(batch["key"]) and len(batch["key"]) == 6
        assert batch["video"].shape[0] == 6 and torch.isfinite(batch["video"]).all()
    stats = ld.stats()
    assert stats["bad_samples"] == sum(b["bad_samples"] for b in batches) > 5
    assert stats["samples"] == 30 and 0.15 < stats["bad_fraction"] < 0.5
    assert "skipping " + samples[0]["__key__"] in caplog.text and "JSONDecodeError" in caplog.text

    data_cfg, model_cfg = _cfg(max_bad_fraction=0.1, batch_size=6)
    with pytest.raises(loader.BadDataError, match="max_bad_fraction=0.1"):
        _take(tmp_path, 20, data_cfg, model_cfg)


@pytest.mark.parametrize("indexed", [True, False], ids=["with-index", "scanned"])
def test_truncated_shard_is_skipped(shards, tmp_path, caplog, indexed):
    """A shard cut inside its third sample: its first two samples still serve, the rest is
    logged (and, with the index that says what is missing, counted bad); no other shard is
    touched."""
    samples = _samples(shards)
    cut = _rewrite(tmp_path / "shard-000000.tar", samples[:4])
    keep = load_index(cut).boundaries[3] - 100  # the third sample's json member is cut short
    cut.write_bytes(cut.read_bytes()[:keep])
    if not indexed:
        cut.with_suffix(".json").unlink()
    for n, s in enumerate(samples[4:], 1):
        _rewrite(tmp_path / f"shard-{n:06d}.tar", [s])
    data_cfg, model_cfg = _cfg(max_bad_fraction=1.0, batch_size=4, shuffle_buffer=2)
    ld = loader.make_pretrain_loader(tmp_path, data_cfg, model_cfg, seed=0)
    it = iter(ld)
    seen = {k for _ in range(8) for k in next(it)["key"]}
    lost = {samples[2]["__key__"], samples[3]["__key__"]}
    assert not seen & lost
    assert {s["__key__"] for s in samples} - lost <= seen  # nothing else lost
    assert ld.stats()["bad_samples"] > 0  # the cut sample (and, indexed, the missing one) each time drawn
    if indexed:
        assert "truncated shard" in caplog.text
    else:
        assert "KeyError: 'json'" in caplog.text and "shard-000000.tar is truncated" in caplog.text


def test_garbage_shard_is_skipped_and_named_at_set_up(shards, tmp_path, caplog):
    """500 kB of random bytes named like a shard (no index), and a good shard whose index is
    garbage: the first is left out with a warning naming it, the second is scanned instead;
    the stream reads the good shards only."""
    good = sorted(shards.glob("shard-*.tar"))
    for p in good:
        shutil.copy(p, tmp_path)
        shutil.copy(p.with_suffix(".json"), tmp_path)
    shutil.copy(shards / "manifest.json", tmp_path)
    (tmp_path / "shard-000900.tar").write_bytes(random.Random(0).randbytes(500_000))
    (tmp_path / good[0].with_suffix(".json").name).write_bytes(random.Random(1).randbytes(300))
    data_cfg, model_cfg = _cfg(batch_size=2, shuffle_buffer=2)
    with caplog.at_level("WARNING"):
        ld = loader.make_pretrain_loader(tmp_path, data_cfg, model_cfg)
    names = [Path(s.path).name for s in ld.stream.shards]
    assert names == [p.name for p in good]
    assert (
        f"1 of {len(good) + 1} shards hold no readable sample and are left out: shard-000900.tar "
        f"(not a readable tar: " in caplog.text
    )
    assert f"{good[0].with_suffix('.json').name}: unreadable index" in caplog.text
    it = iter(ld)
    batches = [next(it) for _ in range(ld.batches_per_epoch)]
    assert sum(b["bad_samples"] for b in batches) == 0 and len({k for b in batches for k in b["key"]}) > 1

    for p in good:  # nothing but garbage: an error that points at the warning
        (tmp_path / p.name).unlink()
    with pytest.raises(loader.BadDataError, match="none of the 1 shards .* holds a readable sample"):
        loader.make_pretrain_loader(tmp_path, data_cfg, model_cfg)


def test_missing_empty_or_raw_corpus_directory_says_what_to_do(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"shard directory {tmp_path / 'nope'} does not exist"):
        loader.find_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no shard-\*.tar files in .*; write them with `hicmae-dist prepare`"):
        loader.find_shards(tmp_path)
    (tmp_path / "train-0.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 other .tar files, e.g. train-0.tar"):
        loader.find_shards(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=rf"{corpus} holds media files \(dev/.*\), not shards: run "
        rf"`hicmae-dist prepare --src {corpus} --out SHARD_DIR` first",
    ):
        loader.make_pretrain_loader(corpus, *_cfg())


def test_truncated_shard_messages_give_the_byte_where_the_file_ends(shards, tmp_path):
    """A read past the end names the file's real size (not where the sample starts), the set-up
    notes an indexed shard that is shorter than its index, and a scan notices a cut that falls
    on a header (which tarfile takes for the end of the archive)."""
    samples = _samples(shards)[:4]
    path = _rewrite(tmp_path / "shard-000000.tar", samples)
    full = path.read_bytes()
    bounds = load_index(path).boundaries
    cut = bounds[2] + 700  # inside the third sample
    path.write_bytes(full[:cut])
    index = load_index(path)
    assert index.meta["short"].startswith(f"the file ends at byte {cut}, its index at {bounds[-1]}")
    reader = ShardReader([index])
    for i in (2, 3):  # the sample cut in two, and the one wholly past the end (a seek beyond the file)
        with pytest.raises(
            IOError, match=f"shard ends at byte {cut}, sample {i} needs bytes {bounds[i]}:{bounds[i + 1]}"
        ):
            reader.read(0, i)
    reader.close()

    path.with_suffix(".json").unlink()
    for at in (bounds[2], cut):  # on the third sample's first header, and inside it
        path.write_bytes(full[:at])
        scanned = load_index(path)
        assert len(scanned) == 2 and f"the file ends at byte {at}" in scanned.meta["truncated"], scanned.meta
    path.write_bytes(full)
    assert load_index(path).boundaries == bounds and "truncated" not in load_index(path).meta


def test_fbank_matches_kaldi():
    gen = torch.Generator().manual_seed(0)
    for samples in (400, 30_000, 60_000, 170_000):  # padded to 256 frames, cut to 256 frames
        wave = 0.1 * torch.randn(1, samples, generator=gen) + 0.05
        ref = (_kaldi(wave[0], 256) + 4.2677393) / (2 * 4.5689974)
        out = audio.fbank(wave)
        assert out.shape == (256, 128) and out.dtype == torch.float32
        assert torch.equal(out, ref)  # bit for bit: the same operations, cached
        cav = audio.cavmae_fbank_into(torch.empty(1024, 128), wave[0])
        assert torch.equal(cav, (_kaldi(wave[0], 1024) + 5.081) / 4.4849)
    with pytest.raises(ValueError, match="at least 400 samples"):
        audio.fbank(torch.zeros(1, 399))


def test_audio_augmentations():
    rng = random.Random(0)
    wave = torch.arange(1000, dtype=torch.float32).view(1, 1000)
    gains = [float(audio.random_gain(wave, rng)[0, 1]) for _ in range(200)]
    assert 0.5 < min(gains) < 1.0 < max(gains) < 1.5
    shifts = {int(torch.argmin(audio.random_roll(wave, rng))) for _ in range(50)}
    assert len(shifts) > 40  # a real roll along time, not the release's no-op
    pcm = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 32767 / 32768]])
    assert torch.equal(audio.from_pcm16(audio.to_pcm16(pcm)), pcm)
    feats = torch.arange(1024.0).view(1024, 1).repeat(1, 128)
    out = audio.cavmae_augment_(feats.clone(), random.Random(1), torch.Generator().manual_seed(0))
    shift = int(torch.argmin(out[:, 0]))  # where row 0 went
    noise = out - torch.roll(feats, shift, 0)
    assert 0 <= noise.min() and noise.max() < 0.1 and noise.std() > 0


def test_multiscale_crop_and_fused_normalise():
    rng = random.Random(0)
    boxes = {video.multiscale_crop_box(160, rng) for _ in range(5000)}
    sides = [160, 140, 120, 105]
    pairs = {(h, w) for _, _, h, w in boxes}
    assert pairs == {(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1}
    for top, left, h, w in boxes:
        assert 0 <= top <= 160 - h and 0 <= left <= 160 - w
    assert len({(top, left) for top, left, h, w in boxes if (h, w) == (120, 105)}) == 13
    frames = torch.randint(0, 256, (16, 3, 160, 160), dtype=torch.uint8)
    ref = video.to_model_input(frames, (10, 20, 120, 105), 160)
    assert ref.shape == (3, 16, 160, 160) and ref.dtype == torch.float32
    fused = video.frames_into(torch.empty(3, 16, 160, 160), frames.permute(0, 2, 3, 1).contiguous(), (10, 20, 120, 105))
    assert (_pixels(fused) - _pixels(ref)).abs().max() < 1.01  # the resize kernels round differently
    # no crop: exactly the normalised stored pixels
    exact = (frames.float() / 255 - MEAN) / STD
    torch.testing.assert_close(video.to_model_input(frames, None, 160), exact.permute(1, 0, 2, 3))
    torch.testing.assert_close(
        video.frames_into(torch.empty(3, 16, 160, 160), frames.permute(0, 2, 3, 1), None), exact.permute(1, 0, 2, 3)
    )
    # the face crop of a whole 224 frame
    big = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    out = video.frames_into(torch.empty(3, 2, 160, 160), big, None, video.face_box(224, 160))
    torch.testing.assert_close(out, video.frames_into(torch.empty(3, 2, 160, 160), big[:, :160, 32:192], None))
