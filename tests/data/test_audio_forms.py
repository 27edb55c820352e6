"""The two stored audio forms (prepare --audio-form, data.audio_form): the fbank form gives the
wave form's audio within float16 rounding, gain as a log shift, the form check, resume, bad samples."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from hicmae_dist.config import ConfigError, DataConfig, ModelConfig
from hicmae_dist.data import audio, loader
from hicmae_dist.data.prepare import prepare_shards
from hicmae_dist.data.shards import ShardReader, TarShardWriter, load_index
from tests.data.conftest import NUM_GOOD

# float16 keeps 11 bits: |log-mel| < 16 rounds by <= 2^-8, i.e. 4.3e-4 after HiCMAE's / (2 * 4.569)
# and 8.7e-4 after CAV-MAE's / 4.4849 (measured: 4.4e-4 and 8.9e-4 max; fp32 rounding adds ~4e-5)
HICMAE_BOUND, CAVMAE_BOUND = 5e-4, 1e-3
HICMAE_FLOOR = (audio.LOG_FLOOR - audio.FBANK_MEAN) / (2 * audio.FBANK_STD)


def _cfg(**data) -> tuple[DataConfig, ModelConfig]:
    return DataConfig(**{"batch_size": 3, "num_workers": 0, "shuffle_buffer": 4, **data}), ModelConfig()


def _take(shards_dir: Path, batches: int, data_cfg: DataConfig, **kw) -> list[dict]:
    it = iter(loader.make_pretrain_loader(shards_dir, data_cfg, ModelConfig(), **kw))
    return [next(it) for _ in range(batches)]


def _samples(shards_dir: Path) -> dict[str, dict]:
    indexes = [load_index(p) for p in sorted(shards_dir.glob("shard-*.tar"))]
    reader = ShardReader(indexes)
    samples = [reader.read(n, i) for n, index in enumerate(indexes) for i in range(len(index))]
    return {s["__key__"]: {k: v for k, v in s.items() if k != "__url__"} for s in samples}


def _assert_close_but_floor(
    wave_form: torch.Tensor, fbank_form: torch.Tensor, bound: float, divisor: float, floor: float | None
) -> None:
    """Within float16 rounding, except (a few) entries with 0 < power < eps at gain m > 1: the
    fbank form keeps those at the floor, the waveform path has them up to 2 ln m above it."""
    diff = (wave_form - fbank_form).abs()
    off = diff > bound
    assert off.float().mean() < 1e-3
    assert torch.all(diff[off] <= 2 * math.log(1.5) / divisor + bound)
    if floor is not None:
        assert torch.all(fbank_form[off] == floor)


def test_prepare_stores_the_clip_fbank_of_the_wave_forms_pcm(shards, fbank_shards):
    manifest = json.loads((fbank_shards / "manifest.json").read_text())
    wave_manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["form"]["audio_form"] == "fbank" and wave_manifest["form"]["audio_form"] == "wave"
    # the estimate counts the fbank's bytes (fbank_bytes), fewer than the PCM's
    assert manifest["full_set_estimate"]["bytes_per_second"] < wave_manifest["full_set_estimate"]["bytes_per_second"]
    wave, fb = _samples(shards), _samples(fbank_shards)
    assert wave.keys() == fb.keys() and len(fb) == NUM_GOOD
    for key, sample in fb.items():
        assert "pcm" not in sample and set(sample) == {"__key__", "jpgs", "fbank", "json"}
        meta = json.loads(sample["json"])
        assert meta["audio_form"] == "fbank" and meta["mel_bins"] == 128
        expected = audio.to_fbank16(audio.clip_fbank(audio.from_pcm16(wave[key]["pcm"])))
        assert sample["fbank"] == expected  # the same numbers the wave form stores, as float16
        assert len(sample["fbank"]) == 2 * 128 * audio.num_fbank_frames(meta["num_samples"])
        assert len(sample["fbank"]) < len(wave[key]["pcm"])  # 25.6 kB/s against 32 kB/s
    index = json.loads((fbank_shards / "shard-000000.json").read_text())
    assert index["fbank_bytes"] > 0 and "pcm_bytes" not in index


def test_fbank_form_batches_equal_the_wave_forms(shards, fbank_shards):
    """Same seed, same shards layout: the same windows, gains and masks; audio within the bound."""
    data_cfg, fb_cfg = _cfg(gain_augment=True)[0], _cfg(gain_augment=True, audio_form="fbank")[0]
    for a, b in zip(_take(shards, 3, data_cfg, seed=5), _take(fbank_shards, 3, fb_cfg, seed=5)):
        assert a["key"] == b["key"] and a["bad_samples"] == b["bad_samples"] == 0
        for name in ("video", "video_mask", "audio_mask", "start_frame", "crop"):
            assert torch.equal(a[name], b[name]), name
        assert a["audio"].shape == b["audio"].shape == (3, 1, 256, 128)
        assert torch.equal(a["audio"][..., 254:, :], b["audio"][..., 254:, :])  # 254 frames, then 2 zero rows
        _assert_close_but_floor(a["audio"], b["audio"], HICMAE_BOUND, 2 * audio.FBANK_STD, HICMAE_FLOOR)
        assert not torch.equal(a["audio"], b["audio"])  # really the other path


def test_cavmae_audio_of_the_fbank_form(shards, fbank_shards):
    """The first 10.24 s (here the whole 3.2 s clip, then zero rows), gain, noise and roll."""
    wave, fb = _samples(shards), _samples(fbank_shards)
    floor = (audio.LOG_FLOOR - audio.CAVMAE_FBANK_MEAN) / audio.CAVMAE_FBANK_STD
    for n, key in enumerate(sorted(wave)):
        for noise_roll in (False, True):
            out = {}
            for form, sample in (("wave", wave[key]), ("fbank", fb[key])):
                out[form] = audio.cavmae_audio_into(
                    torch.empty(1024, 128),
                    sample,
                    json.loads(sample["json"]),
                    form,
                    gain=True,
                    noise_roll=noise_roll,
                    rng=random.Random(n),
                    generator=torch.Generator().manual_seed(n),
                )
            _assert_close_but_floor(
                out["wave"], out["fbank"], CAVMAE_BOUND, audio.CAVMAE_FBANK_STD, None if noise_roll else floor
            )
            if not noise_roll:  # zero rows after the clip's frames, as the wave path pads
                frames = audio.num_fbank_frames(json.loads(fb[key]["json"])["num_samples"])
                assert torch.all(out["fbank"][frames:] == -audio.CAVMAE_FBANK_MEAN / audio.CAVMAE_FBANK_STD)
                assert not torch.any(out["fbank"][frames - 1] == -audio.CAVMAE_FBANK_MEAN / audio.CAVMAE_FBANK_STD)


def test_gain_is_a_log_shift_with_the_floor():
    """White noise with a digitally silent stretch: the gain as + 2 ln m equals the gain on the
    waveform everywhere, the silent frames (power 0) and the empty mel bins included, for m < 1
    and m > 1; a bare shift without the floor rule would move the silent frames."""
    gen = torch.Generator().manual_seed(0)
    wave = (0.1 * torch.randn(1, 80_000, generator=gen)).clamp(-1, 1)
    wave[:, 20_000:40_000] = 0
    sample = {"fbank": audio.to_fbank16(audio.clip_fbank(wave)), "pcm": audio.to_pcm16(wave)}
    meta = {"num_samples": 80_000, "mel_bins": 128}
    seeds = {audio.gain_factor(random.Random(s)) > 1: s for s in range(20)}
    assert set(seeds) == {False, True}
    for seed in seeds.values():
        out = {}
        for form in ("wave", "fbank"):
            out[form] = audio.hicmae_audio_into(
                torch.empty(256, 128),
                sample,
                meta,
                form,
                2560 * 5,
                40960,
                gain=True,
                roll=False,
                rng=random.Random(seed),
            )
        assert (out["wave"] - out["fbank"]).abs().max() < HICMAE_BOUND
        silent = out["wave"][(20_000 - 2560 * 5) // 160 + 3 : (40_000 - 2560 * 5) // 160 - 3]
        assert silent.numel() and torch.all(silent == HICMAE_FLOOR)  # the floor, whatever the gain
        m = audio.gain_factor(random.Random(seed))
        loud = out["wave"][-60:-2, 10:] * (2 * audio.FBANK_STD) + audio.FBANK_MEAN
        plain = audio.hicmae_audio_into(
            torch.empty(256, 128),
            sample,
            meta,
            "wave",
            2560 * 5,
            40960,
            gain=False,
            roll=False,
            rng=random.Random(seed),
        )
        plain_loud = plain[-60:-2, 10:] * (2 * audio.FBANK_STD) + audio.FBANK_MEAN
        assert torch.allclose(loud, plain_loud + 2 * math.log(m), atol=1e-4)  # the shift, on the waveform path


def test_audio_form_mismatch_and_roll_are_refused(shards, fbank_shards):
    with pytest.raises(loader.BadDataError, match=r"fbank_shards.*'fbank' audio form.*--audio-form wave"):
        loader.make_pretrain_loader(fbank_shards, *_cfg())
    with pytest.raises(loader.BadDataError, match=r"'wave' audio form.*prepare --audio-form fbank"):
        loader.make_pretrain_loader(shards, *_cfg(audio_form="fbank"))
    with pytest.raises(ConfigError, match="data.roll_augment=true"):
        loader.make_pretrain_loader(fbank_shards, *_cfg(audio_form="fbank", roll_augment=True))
    with pytest.raises(ConfigError, match="data.audio_form: expected 'wave' or 'fbank'"):
        DataConfig(audio_form="mel").validate()


def test_fbank_form_resumes_exactly(fbank_shards):
    data_cfg, _ = _cfg(batch_size=2, audio_form="fbank")
    fresh = _take(fbank_shards, 5, data_cfg, seed=2)
    resumed = _take(fbank_shards, 2, data_cfg, seed=2, start_batch=3)
    for a, b in zip(fresh[3:], resumed):
        assert a["key"] == b["key"] and a["index"] == b["index"]
        for name in ("video", "audio", "video_mask", "audio_mask"):
            assert torch.equal(a[name], b[name]), name


def test_bad_fbank_samples_are_replaced_and_counted(fbank_shards, tmp_path, caplog):
    samples = list(_samples(fbank_shards).values())
    cut = dict(samples[0], fbank=samples[0]["fbank"][:-256])  # a frame short
    no_fbank = {k: v for k, v in samples[1].items() if k != "fbank"}
    for n, group in enumerate([[cut, samples[2], samples[3]], [no_fbank, samples[4], samples[5]]]):
        path = tmp_path / f"shard-{n:06d}.tar"
        with TarShardWriter(path) as w:
            for s in group:
                w.write(s)
        path.with_suffix(".json").write_text(json.dumps({"boundaries": w.boundaries, "keys": w.keys}))
    shutil.copy(fbank_shards / "manifest.json", tmp_path)
    data_cfg, _ = _cfg(batch_size=6, audio_form="fbank", max_bad_fraction=0.5)
    ld = loader.make_pretrain_loader(tmp_path, data_cfg, ModelConfig())
    it = iter(ld)
    batches = [next(it) for _ in range(3)]
    bad_keys = {samples[0]["__key__"], samples[1]["__key__"]}
    for batch in batches:
        assert not bad_keys & set(batch["key"]) and batch["audio"].shape[0] == 6
        assert torch.isfinite(batch["audio"]).all()
    assert ld.stats()["bad_samples"] == sum(b["bad_samples"] for b in batches) > 0
    assert "the stored fbank has 81152 bytes (317 frames), 51200 samples make 318 frames" in caplog.text
    assert "has no .fbank member" in caplog.text and "--audio-form fbank" in caplog.text


def test_prepare_refuses_to_resume_into_another_audio_form(corpus, tmp_path):
    out = tmp_path / "out"
    prepare_shards(corpus, out, speakers=["id00000"], limit=1, audio_form="fbank", progress=False)
    with pytest.raises(ValueError, match="audio_form"):
        prepare_shards(corpus, out, speakers=["id00000"], limit=1, progress=False)
