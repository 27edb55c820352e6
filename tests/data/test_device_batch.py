"""The uint8 batch contract: to_device gives the float batch of the path before it (bit for bit),
the JPEG-bytes batch (data.decode_on cuda) decoded by to_device's code with the CPU decoder, the
workers' reused buffers (identities, lifetimes under the trainer's use, resident memory)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from hicmae_dist.config import ConfigError, DataConfig, ModelConfig, load_config
from hicmae_dist.data import device, loader

TENSORS = ("audio", "video_mask", "audio_mask", "label", "start_frame", "crop")


def _batches(shards, data_cfg, model_cfg, n: int, **kw) -> list[dict]:
    """n batches, each copied as it arrives (so all can be held)."""
    it = iter(loader.make_pretrain_loader(shards, data_cfg, model_cfg, **kw))
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in next(it).items()} for _ in range(n)]


def _cfgs(arch: str) -> tuple[DataConfig, ModelConfig]:
    if arch == "cavmae":
        return (
            DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4, multiscale_crop=False, roll_augment=True),
            load_config("cavmae-base-vox2").model,
        )
    return DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4, multiscale_crop=True), ModelConfig()


@pytest.mark.parametrize("arch", ["hicmae", "cavmae"])
def test_uint8_batch_on_the_device_is_the_float_batch(arch, shards, cavmae_shards):
    """Same seed, same crops: to_device(uint8 batch) == the worker-normalised float batch, bit for
    bit (both resize on uint8: the float path always rounded its resize to grey levels)."""
    where = cavmae_shards if arch == "cavmae" else shards
    data_cfg, model_cfg = _cfgs(arch)
    u8 = _batches(where, data_cfg, model_cfg, 3, seed=7)
    ref = _batches(where, data_cfg, model_cfg, 3, seed=7, video_out="float")
    S = model_cfg.image_size
    for a, b in zip(u8, ref):
        assert a["video"].dtype == torch.uint8 and b["video"].dtype == torch.float32
        assert a["video"].shape == ((3, S, S, 3) if arch == "cavmae" else (3, 16, S, S, 3))
        x = device.to_device(a, "cpu", torch.float32)
        assert x["video"].shape == b["video"].shape and x["video"].is_contiguous()
        assert torch.equal(x["video"], b["video"]), a["index"]
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in TENSORS)
    assert len({int(c) for b in u8 for c in b["crop"][:, 2]}) > 1 or arch == "cavmae"  # crops were drawn
    half = device.to_device(u8[0], "cpu", torch.bfloat16)
    assert half["video"].dtype == half["audio"].dtype == torch.bfloat16
    assert half["video_mask"] is u8[0]["video_mask"]  # the masks stay on the host


@pytest.mark.parametrize("arch", ["hicmae", "cavmae"])
def test_jpeg_batch_decoded_by_to_device(arch, shards, cavmae_shards):
    """decode_on cuda's batch: the workers slice bytes; to_device's decode, face crop, box and
    resize (here with the CPU decoder: only the nvJPEG call differs on a GPU) give the uint8
    batch within one grey level (float resize rounded vs torch's uint8 kernel)."""
    where = cavmae_shards if arch == "cavmae" else shards
    data_cfg, model_cfg = _cfgs(arch)
    u8 = _batches(where, data_cfg, model_cfg, 2, seed=3)
    jp = _batches(where, data_cfg, model_cfg, 2, seed=3, video_out="jpeg")
    for a, j in zip(u8, jp):
        assert "video" not in j and j["jpeg"].dtype == torch.uint8 and j["jpeg"].dim() == 1
        frames = 1 if arch == "cavmae" else 16
        assert j["jpeg_offsets"].shape == ((3,) if arch == "cavmae" else (3, frames))
        assert int(j["jpeg_sizes"].sum()) == j["jpeg"].numel()  # back to back, nothing else
        assert j["key"] == a["key"] and all(torch.equal(a[k], j[k]) for k in TENSORS)
        got = device.decode_video(j, torch.device("cpu"))
        assert got.shape == a["video"].shape and got.dtype == torch.uint8
        diff = (got.int() - a["video"].int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.25, (diff.max(), diff.float().mean())
        if arch == "cavmae":  # no resize: the decoders' output itself
            assert torch.equal(got, a["video"])
        x = device.to_device(j, "cpu")["video"]
        assert torch.equal(x, device.normalise_video(got))


def test_jpeg_batch_from_whole_frames_and_bad_jpegs(corpus, tmp_path):
    """Whole 224 frames: the face crop is cut on the device; a truncated JPEG is a bad sample in
    the worker (replaced, counted), not a failed decode in the trainer."""
    from hicmae_dist.data.prepare import prepare_shards

    full = tmp_path / "full"
    prepare_shards(corpus, full, full_frame=True, speakers=["id00000"], progress=False)
    data_cfg, model_cfg = _cfgs("hicmae")
    (a,) = _batches(full, data_cfg, model_cfg, 1, seed=1)
    (j,) = _batches(full, data_cfg, model_cfg, 1, seed=1, video_out="jpeg")
    assert j["face"].tolist() == [[0, 32, 160, 160]] * 3
    assert (device.decode_video(j, torch.device("cpu")).int() - a["video"].int()).abs().max() <= 1
    with pytest.raises(ValueError, match="not a whole JPEG"):
        loader._checked_jpegs([torch.tensor([0xFF, 0xD8, 1, 2, 3], dtype=torch.uint8)])


def test_decode_on_cuda_needs_a_gpu(shards):
    with pytest.raises(ConfigError, match="data.decode_on"):
        DataConfig(decode_on="gpu").validate()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ConfigError, match="data.decode_on=cuda .* no CUDA device"):
        loader.make_pretrain_loader(shards, DataConfig(decode_on="cuda", num_workers=0), ModelConfig())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_worker_buffers_are_reused(shards):
    """12 batches from 2 workers: at most PREFETCH + HELD distinct video buffers per worker (the
    received storages are kept alive, so one shared segment maps to one storage); the float path
    allocates one per batch."""
    data_cfg = DataConfig(batch_size=1, num_workers=2, shuffle_buffer=2)
    for video_out, most in (("uint8", loader.PREFETCH + loader.HELD), ("float", 6)):
        it = iter(loader.make_pretrain_loader(shards, data_cfg, ModelConfig(), video_out=video_out))
        held = [next(it) for _ in range(12)]
        for w in (0, 1):
            ptrs = {_storage(b["video"]) for b in held if b["index"] % 2 == w}
            audio = {_storage(b["audio"]) for b in held if b["index"] % 2 == w}
            assert len(ptrs) == len(audio) == most, (video_out, w, len(ptrs), len(audio))
        del it


def _consume_like_the_trainer(shards, reference: list[dict], steps: int) -> int:
    """grad_accum 2: each micro-batch goes through to_device (no copy of audio on the CPU), and
    the previous one is still held while the next arrives; returns the batches whose values
    differed from the reference (batches copied on arrival)."""
    data_cfg = DataConfig(batch_size=1, num_workers=2, shuffle_buffer=2)
    it = iter(loader.make_pretrain_loader(shards, data_cfg, ModelConfig(), seed=2))
    wrong, previous = 0, None
    for n in range(steps * 2):
        b = next(it)
        time.sleep(0.03)  # the workers run ahead, into every buffer the loader lets them use
        for k, held in ((n, b), (n - 1, previous)):
            if held is not None:
                x = device.to_device(held, "cpu")
                wrong += not (
                    torch.equal(x["video"], reference[k]["video"]) and torch.equal(x["audio"], reference[k]["audio"])
                )
        previous = b
    return wrong


def test_held_batches_are_never_overwritten(shards, monkeypatch):
    """Values under the trainer's use equal a fresh-allocation run's, batch for batch; with a pool
    one batch too small for the consumer (HELD 0) the same consumer sees overwritten buffers."""
    data_cfg = DataConfig(batch_size=1, num_workers=2, shuffle_buffer=2)
    reference = _batches(shards, data_cfg, ModelConfig(), 12, seed=2, video_out="float")
    assert _consume_like_the_trainer(shards, reference, 6) == 0
    monkeypatch.setattr(loader, "HELD", 0)  # the workers fork after this: they see it
    assert _consume_like_the_trainer(shards, reference, 6) > 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _children() -> list[int]:
    me = os.getpid()
    kids = []
    for task in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{task}/children") as f:
            kids += [int(p) for p in f.read().split()]
    return kids


def test_worker_memory_does_not_grow(shards):
    """Resident memory of a 2-worker loader (main process + workers) between batch 50 and 200."""
    data_cfg = DataConfig(batch_size=1, num_workers=2, shuffle_buffer=2)
    it = iter(loader.make_pretrain_loader(shards, data_cfg, ModelConfig()))
    before = set(_children())
    rss = {}
    for n in range(1, 201):
        next(it)
        if n == 50:
            workers = [p for p in _children() if p not in before] or _children()
        if n in (50, 200):
            rss[n] = sum(_rss_kib(p) for p in [os.getpid(), *workers])
    assert len(workers) >= 2
    assert rss[200] < 1.3 * rss[50], rss


def test_jpeg_path_replaces_bad_samples(shards, tmp_path):
    """A sample whose JPEG bytes are garbage is caught in the worker on the jpeg path too (no
    decode there): replaced by a good one, counted; every batch then decodes."""
    import shutil

    from hicmae_dist.data.shards import ShardReader, TarShardWriter, load_index

    indexes = [load_index(p) for p in sorted(shards.glob("shard-*.tar"))]
    reader = ShardReader(indexes)
    samples = [{k: v for k, v in reader.read(n, 0).items() if k != "__url__"} for n in range(4)]
    reader.close()
    samples[1]["jpgs"] = b"\x00" * len(samples[1]["jpgs"])
    with TarShardWriter(tmp_path / "shard-000000.tar") as w:
        for s in samples:
            w.write(s)
    shutil.copy(shards / "manifest.json", tmp_path)
    data_cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=2, max_bad_fraction=1.0)
    it = iter(loader.make_pretrain_loader(tmp_path, data_cfg, ModelConfig(), video_out="jpeg"))
    for _ in range(2):
        b = next(it)
        assert b["bad_samples"] == 1 and samples[1]["__key__"] not in b["key"] and len(b["key"]) == 4
        assert device.decode_video(b, torch.device("cpu")).shape == (4, 16, 160, 160, 3)
