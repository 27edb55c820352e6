"""The pretraining loader: WebDataset shards -> an infinite stream of masked batches.

Per DataLoader worker (or in-process with num_workers=0), all decoding happens in the worker:

    shards, resampled with replacement (seeded by seed, rank and worker)
      -> tar samples (undecoded bytes) -> shuffle buffer
      -> decode: 16 consecutive stored frames from a random start (= stride 4 in the source),
         multi-scale crop, normalise; the audio under those frames (2.56 s), gain / roll, fbank;
         tube mask and random mask
      -> batches of data.batch_size (whole batches only)

Batch: video float32 (B, 3, 16, 160, 160), audio float32 (B, 1, 256, 128), video_mask bool
(B, 800) and audio_mask bool (B, 128) (True = masked), label int64 (B,) (-1 unknown), key list[str].

A sample or shard that cannot be read is logged and skipped; a worker stops the run with
BadDataError once more than data.max_bad_fraction of what it has read was bad.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hicmae_dist.config import DataConfig, ModelConfig
from hicmae_dist.data import audio, video
from hicmae_dist.masking import random_mask, tube_mask

log = logging.getLogger(__name__)

MIN_READS_BEFORE_BAD_CHECK = 200  # judge the bad fraction on a sample big enough to mean something


class BadDataError(RuntimeError):
    """More unreadable samples than data.max_bad_fraction allows."""


def make_pretrain_loader(shards_dir: str | Path, data_cfg: DataConfig, model_cfg: ModelConfig, *,
                         rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
    """An infinite iterable of pretraining batches (module docstring) for one rank.

    The same (seed, rank, world_size, num_workers) gives the same stream; another seed gives
    another stream (the trainer passes a new seed on resume). Batches are pinned when CUDA is
    available.
    """
    shards_dir = Path(shards_dir)
    shards = sorted(str(p) for p in shards_dir.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar files in {shards_dir}; write them with prepare_shards "
                                f"(`hicmae-dist prepare`)")
    _check_manifest(shards_dir / "manifest.json", model_cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    stream = _PretrainStream(shards, data_cfg, model_cfg, rank, world_size, seed)
    return DataLoader(stream, batch_size=None, num_workers=data_cfg.num_workers,
                      pin_memory=torch.cuda.is_available())


def _check_manifest(path: Path, model_cfg: ModelConfig) -> None:
    """Shards made for another input size are a setup error, not bad samples."""
    if not path.exists():  # shards made elsewhere; per-sample checks still apply
        return
    manifest = json.loads(path.read_text())
    stored = (manifest.get("image_size"), manifest.get("frame_stride"))
    if stored != (model_cfg.image_size, video.FRAME_STRIDE):
        raise ValueError(f"{path}: the shards hold {stored[0]}px frames at stride {stored[1]}, the model "
                         f"expects {model_cfg.image_size}px at stride {video.FRAME_STRIDE}; re-run "
                         f"prepare_shards with image_size={model_cfg.image_size}")


def _slot_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, worker) draws from.

    With a shard per slot or more, each (rank, worker) slot gets its own round-robin share, so
    no clip is read by two ranks or two workers at once (no duplicate in a global batch). With
    fewer, the ranks still split when they can, otherwise every slot reads every shard; their
    seeds differ, so their streams still do.
    """
    slots = world_size * num_workers
    if len(shards) >= slots:
        return shards[rank * num_workers + worker::slots]
    if len(shards) >= world_size:
        return shards[rank::world_size]
    return shards


class _BadCounter:
    """Counts a worker's reads; raises BadDataError when the bad fraction passes the limit."""

    def __init__(self, max_fraction: float, where: str):
        self.max_fraction, self.where = max_fraction, where
        self.reads = self.bad = 0

    def ok(self) -> None:
        self.reads += 1
        self._check(None)

    def skip(self, what: str, exn: BaseException) -> None:
        self.reads += 1
        self.bad += 1
        log.warning("skipping %s (%s): %s: %s [%d bad of %d reads]", what, self.where,
                    type(exn).__name__, exn, self.bad, self.reads)
        self._check(f"{what}: {exn}")

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler for unreadable or truncated shards: skip the rest of the shard."""
        self.skip("the rest of a shard", exn)
        return True

    def _check(self, last: str | None) -> None:
        if self.reads >= MIN_READS_BEFORE_BAD_CHECK and self.bad > self.max_fraction * self.reads:
            raise BadDataError(
                f"{self.bad} of {self.reads} reads were unreadable ({self.bad / self.reads:.1%}) on "
                f"{self.where}, more than data.max_bad_fraction={self.max_fraction}"
                + (f"; last: {last}" if last else "") + "; see the warnings above for each one")


class _PretrainStream(IterableDataset):
    def __init__(self, shards: list[str], data_cfg: DataConfig, model_cfg: ModelConfig,
                 rank: int, world_size: int, seed: int):
        self.shards, self.data_cfg, self.model_cfg = shards, data_cfg, model_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # One random stream per (seed, rank, worker) drives everything: shard draws, shuffle,
        # augmentation; the masks take a torch generator seeded from it.
        rng = random.Random(f"hicmae-dist/{self.seed}/{self.rank}/{worker}")
        masks = torch.Generator().manual_seed(rng.getrandbits(63))
        bad = _BadCounter(self.data_cfg.max_bad_fraction, f"rank {self.rank} worker {worker}")
        shards = _slot_shards(self.shards, self.rank, self.world_size, worker, num_workers)
        urls = ({"url": rng.choice(shards)} for _ in itertools.count())  # resampled, endless
        samples = wds.tarfile_samples(urls, handler=bad.shard_error)
        buffer = self.data_cfg.shuffle_buffer
        samples = wds.shuffle(buffer, initial=buffer, rng=rng)(samples)  # undecoded bytes
        clips = self._decoded(samples, rng, masks, bad)
        yield from wds.batched(self.data_cfg.batch_size, collation_fn=_collate, partial=False)(clips)

    def _decoded(self, samples, rng: random.Random, masks: torch.Generator, bad: _BadCounter):
        for sample in samples:
            try:
                clip = self._decode(sample, rng, masks)
            except Exception as exn:  # a corrupt sample must not end the run on its own
                bad.skip(f"sample {sample.get('__key__')} of {sample.get('__url__')}", exn)
                continue
            bad.ok()
            yield clip

    def _decode(self, sample: dict, rng: random.Random, masks: torch.Generator) -> dict:
        m, d = self.model_cfg, self.data_cfg
        meta = json.loads(sample["json"])
        if meta["sample_rate"] != audio.SAMPLE_RATE:
            raise ValueError(f"audio at {meta['sample_rate']} Hz, expected {audio.SAMPLE_RATE}")

        start = video.sample_start(meta["num_frames"], m.num_frames, rng)
        frames = video.decode_jpegs(sample["jpgs"], meta["frame_bytes"],
                                    range(start, start + m.num_frames))  # (16, 3, 160, 160) uint8
        box = video.multiscale_crop_box(frames.shape[-1], rng) if d.multiscale_crop else None
        clip_video = video.to_model_input(frames, box, m.image_size)  # (3, 16, 160, 160)

        # The audio under those frames: stored frame i is source frame i * frame_stride.
        seconds_per_stored = meta["frame_stride"] / meta["fps"]
        first = round(start * seconds_per_stored * audio.SAMPLE_RATE)
        length = round(m.num_frames * seconds_per_stored * audio.SAMPLE_RATE)  # 40960 = 2.56 s
        wave = audio.from_pcm16(sample["pcm"][2 * first:2 * (first + length)])  # (1, <= 40960)
        if d.gain_augment:
            wave = audio.random_gain(wave, rng)
        if d.roll_augment:
            wave = audio.random_roll(wave, rng)
        clip_audio = audio.fbank(wave, m.audio_frames, m.mel_bins).unsqueeze(0)  # (1, 256, 128)

        spatial = (m.image_size // m.patch) ** 2
        return {
            "video": clip_video,
            "audio": clip_audio,
            "video_mask": tube_mask(m.num_frames // m.tubelet, spatial, m.video_mask_ratio, masks),  # (800,)
            "audio_mask": random_mask((m.audio_frames // m.patch) * (m.mel_bins // m.patch),
                                      m.audio_mask_ratio, masks),  # (128,)
            "label": meta.get("label", -1),
            "key": meta["key"],
        }


def _collate(clips: list[dict]) -> dict:
    batch = {name: torch.stack([c[name] for c in clips])
             for name in ("video", "audio", "video_mask", "audio_mask")}
    batch["label"] = torch.tensor([c["label"] for c in clips], dtype=torch.int64)
    batch["key"] = [c["key"] for c in clips]
    return batch
