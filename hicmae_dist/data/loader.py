"""The pretraining loader: tar shards -> an endless, exactly resumable stream of masked batches.

    loader = make_pretrain_loader(shards, cfg.data, cfg.model, rank=r, world_size=w, seed=s,
                                  start_batch=step * grad_accum)
    for batch in loader: ...          # endless; batch["index"] is this rank's batch number
    for batch in loader.epoch(e): ... # or exactly one epoch's batches_per_epoch batches
    loader.stats()                    # batches, samples, bad samples: for the trainer's metrics

The stream is a pure function of (shards, seed, rank, world_size, data.num_workers,
data.batch_size, data.shuffle_buffer): batch k is the same tensors whichever batch the stream
started at, so a restarted job that passes start_batch=k neither repeats nor skips data. Shards
are dealt per epoch to the (rank, virtual worker) slots, samples pass a shuffle buffer undecoded,
and each is decoded late with random numbers of its own position; a bad sample is replaced within
its batch and counted (BadDataError past data.max_bad_fraction). The arithmetic, the resume and
the bad-sample rules: docs/design.md, "The loader's stream".

The batch (keys, dtypes, shapes for HiCMAE and CAV-MAE, decode_on, buffer lifetimes: how long a
batch stays valid): docs/data.md, "The batch".
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hicmae_dist.config import ConfigError, DataConfig, ModelConfig
from hicmae_dist.data import audio, video
from hicmae_dist.data.device import check_decode_on
from hicmae_dist.data.shards import ShardIndex, ShardReader, load_index
from hicmae_dist.masking import audio_structured_mask, mae_random_mask, random_mask, tube_mask

log = logging.getLogger(__name__)

MIN_READS_BEFORE_BAD_CHECK = 200  # judge the bad fraction on a sample big enough to mean something
MAX_BAD_LOGS = 20  # per worker: warnings for the first bad samples, then one in 100
PREFETCH = 2  # batches each DataLoader worker may run ahead (the DataLoader's prefetch_factor)
HELD = 2  # batches a consumer may hold at once (PretrainLoader docstring)
VIDEO_OUTS = ("uint8", "float", "jpeg")  # what the batch's video is: module docstring


class BadDataError(RuntimeError):
    """More unreadable samples than data.max_bad_fraction allows."""


def make_pretrain_loader(
    shards_dir: str | Path,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_batch: int = 0,
    video_out: str | None = None,
) -> PretrainLoader:
    """This rank's endless stream of pretraining batches (module docstring), from batch
    start_batch on: the stream with (seed, start_batch=k) yields exactly batches k, k+1, ... of
    the stream with (seed, start_batch=0), without decoding the batches before k.
    video_out: None = from data.decode_on ("uint8", or "jpeg" for "cuda", which needs a GPU);
    "float" is the path before the uint8 contract (module docstring)."""
    if video_out is None:
        check_decode_on(data_cfg)
        video_out = "jpeg" if data_cfg.decode_on == "cuda" else "uint8"
    if video_out not in VIDEO_OUTS:
        raise ValueError(f"video_out must be one of {VIDEO_OUTS}, got {video_out!r}")
    shards_dir = Path(shards_dir)
    paths = find_shards(shards_dir)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    indexes = [load_index(p) for p in paths]
    for index in indexes:
        if index.meta.get("truncated") and len(index):
            log.warning(
                "%s is truncated (no index beside it; a scan found %d samples, then: %s): what follows is lost",
                Path(index.path).name,
                len(index),
                index.meta["truncated"],
            )
        elif index.meta.get("short"):
            log.warning("%s: %s", Path(index.path).name, index.meta["short"])
    unusable = [i for i in indexes if len(i) == 0]
    if unusable:  # empty, or not a tar at all (random bytes, another format): named, then left out
        log.warning(
            "%d of %d shards hold no readable sample and are left out: %s",
            len(unusable),
            len(indexes),
            "; ".join(f"{Path(i.path).name} ({_why_unusable(i)})" for i in unusable[:20])
            + ("; ..." if len(unusable) > 20 else ""),
        )
    indexes = [i for i in indexes if len(i)]
    if not indexes:
        raise BadDataError(
            f"none of the {len(paths)} shards in {shards_dir} holds a readable sample "
            f"(the warning above names each one and why)"
        )
    form = stored_form(shards_dir, indexes)
    check_stored_form(form, model_cfg, shards_dir)
    check_audio_form(form, data_cfg, model_cfg, shards_dir)
    stream = PretrainStream(indexes, data_cfg, model_cfg, rank, world_size, seed, start_batch, video_out)
    log.info(
        "pretraining loader: video as %s (%s), audio as %s",
        video_out,
        {
            "uint8": "normalised on the device by data.device.to_device",
            "float": "normalised in the workers",
            "jpeg": "JPEG bytes, decoded on the device by data.device.to_device",
        }[video_out],
        data_cfg.audio_form,
    )
    slots = world_size * max(1, data_cfg.num_workers)
    if len(indexes) < slots:
        log.warning(
            "%d shards for %d (rank, worker) slots: some slots share shards, so an epoch can "
            "show a clip more than once; write smaller shards (prepare --shard-size)",
            len(indexes),
            slots,
        )
    return PretrainLoader(stream)


MEDIA_SUFFIXES = (".mp4", ".m4a", ".wav", ".avi", ".mkv", ".webm")


def find_shards(shards_dir: str | Path) -> list[Path]:
    """The shard-*.tar files of a shard directory, sorted; a missing or empty directory, or a raw
    corpus given where its shards were expected, is a FileNotFoundError that says what to do."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise FileNotFoundError(
            f"shard directory {shards_dir} " + ("is not a directory" if shards_dir.exists() else "does not exist")
        )
    paths = sorted(shards_dir.glob("shard-*.tar"))
    if paths:
        return paths
    media = next(
        (
            p
            for p in itertools.islice(shards_dir.rglob("*"), 10_000)  # a look, not a walk of all
            if p.suffix.lower() in MEDIA_SUFFIXES
        ),
        None,
    )
    if media is not None:
        raise FileNotFoundError(
            f"{shards_dir} holds media files ({media.relative_to(shards_dir)}), not shards: "
            f"run `hicmae-dist prepare --src {shards_dir} --out SHARD_DIR` first and pass "
            f"the SHARD_DIR"
        )
    other = sorted(p.name for p in shards_dir.glob("*.tar"))
    raise FileNotFoundError(
        f"no shard-*.tar files in {shards_dir}"
        + (
            f" ({len(other)} other .tar files, e.g. {other[0]}: the loader reads prepare's shard-NNNNNN.tar names)"
            if other
            else ""
        )
        + "; write them with `hicmae-dist prepare`"
    )


def _why_unusable(index: ShardIndex) -> str:
    if index.meta.get("truncated"):  # nothing readable before the problem
        return f"not a readable tar: {index.meta['truncated']}"
    return "no samples"


class PretrainLoader:
    """The DataLoader over a PretrainStream, plus what the trainer wants to know about it.

    Iterating starts at stream.start_batch every time. stats() counts what this iterator has
    yielded so far: batches, samples, bad samples (replaced), the bad fraction, the next batch
    index and its epoch.

    Lifetime of a batch (uint8 and jpeg video): its tensors are buffers the workers reuse. Batch k
    stays valid until the consumer asks for batch k + HELD (2): a consumer may hold the batch it
    works on and the one before (the trainer holds one: a micro-batch is done, forward and
    backward, before the next is fetched); copy what must live longer (`.clone()`, or
    to_device's copy). Why: each of the W workers fills its PREFETCH + HELD buffers in turn, and
    the DataLoader issues one task (in worker turn) per batch it returns, PREFETCH per worker
    ahead: batch k + (PREFETCH + HELD) * W, the next to use batch k's buffers, is issued when
    batch k + HELD * W is returned. In the main process (num_workers 0) HELD buffers, the next
    batch made when asked for. With pin_memory the pin thread copies each batch out before the
    consumer sees it. video_out="float" batches are new memory each time.
    """

    def __init__(self, stream: PretrainStream):
        self.stream = stream
        d = stream.data_cfg
        self.batch_size = d.batch_size
        self.num_workers = d.num_workers
        self.batches_per_epoch = stream.batches_per_epoch
        self.start_batch = stream.start_batch
        self.dataloader = DataLoader(
            stream,
            batch_size=None,
            num_workers=d.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=PREFETCH if d.num_workers else None,
        )
        self._reset()

    def _reset(self) -> None:
        self._batches = self._bad = 0
        self._next = self.start_batch

    def __iter__(self) -> Iterator[dict]:
        self._reset()
        for batch in self.dataloader:
            if batch["index"] != self._next:  # the worker rotation guarantees this order
                raise RuntimeError(f"batch {batch['index']} arrived where {self._next} was due")
            self._batches += 1
            self._bad += batch["bad_samples"]
            self._next += 1
            self._check_bad_fraction()
            yield batch

    def epoch_of(self, batch_index: int) -> int:
        return batch_index // self.batches_per_epoch

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Exactly the batches_per_epoch batches of epoch `epoch` (webdataset's with_epoch, as a
        finite pass): the same batches the endless stream yields there."""
        stream = copy.copy(self.stream)
        stream.start_batch = epoch * self.batches_per_epoch
        return itertools.islice(iter(PretrainLoader(stream)), self.batches_per_epoch)

    def stats(self) -> dict:
        samples = self._batches * self.batch_size
        return {
            "batches": self._batches,
            "samples": samples,
            "bad_samples": self._bad,
            "bad_fraction": self._bad / samples if samples else 0.0,
            "next_batch": self._next,
            "epoch": self.epoch_of(self._next),
            "batches_per_epoch": self.batches_per_epoch,
        }

    def _check_bad_fraction(self) -> None:
        reads = self._batches * self.batch_size
        limit = self.stream.data_cfg.max_bad_fraction
        if reads >= MIN_READS_BEFORE_BAD_CHECK and self._bad > limit * reads:
            raise BadDataError(
                f"{self._bad} of {reads} samples read on rank {self.stream.rank} were unreadable "
                f"({self._bad / reads:.1%}), more than data.max_bad_fraction={limit}; the warnings above "
                f"name each one (key, shard, reason)"
            )


@dataclass(frozen=True)
class StoredForm:
    """What prepare stored per clip (manifest 'form')."""

    frames: str  # "stride": every frame_stride-th frame; "ten": CAV-MAE's 10 frames
    image_size: int  # stored frame side: a face crop (160, 192) or the full 224 frame
    frame_stride: int | None
    audio_form: str = "wave"  # "wave": int16 PCM; "fbank": the clip's float16 log-mel (audio.py)


def stored_form(shards_dir: Path, indexes: list[ShardIndex]) -> StoredForm | None:
    """From manifest.json (or a shard index when the manifest is missing); None if unknown
    (shards made elsewhere: every sample is checked as it is decoded)."""
    manifest = shards_dir / "manifest.json"
    meta = json.loads(manifest.read_text()) if manifest.exists() else indexes[0].meta
    form = meta.get("form")
    if form:
        return StoredForm(form["frames"], form["image_size"], form.get("frame_stride"), form.get("audio_form", "wave"))
    if "image_size" in meta:  # the first layer's manifests
        return StoredForm("stride", meta["image_size"], meta.get("frame_stride", video.FRAME_STRIDE))
    return None


def check_stored_form(form: StoredForm | None, model_cfg: ModelConfig, where: Path) -> None:
    """Shards stored for another input are a setup error (BadDataError), not bad samples."""
    if form is None:
        return
    size = model_cfg.image_size
    if model_cfg.arch == "cavmae":
        if form.image_size != size:
            raise BadDataError(
                f"{where}: the shards hold {form.image_size}px frames; CAV-MAE takes whole "
                f"{size}px frames: prepare them with `hicmae-dist prepare --full-frame "
                f"--frames ten` (or --full-frame alone: every 4th frame, usable by both models)"
            )
        return
    if form.frames != "stride" or form.frame_stride != video.FRAME_STRIDE:
        raise BadDataError(
            f"{where}: the shards hold {form.frames!r} frames (stride {form.frame_stride}); "
            f"HiCMAE takes 16 frames in a row at stride {video.FRAME_STRIDE}: prepare them "
            f"with `hicmae-dist prepare --frames stride`"
        )
    if form.image_size != size and not (form.image_size == video.SOURCE_SIZE and size <= video.SOURCE_SIZE):
        raise BadDataError(
            f"{where}: the shards hold {form.image_size}px frames at stride {form.frame_stride}, "
            f"the model expects {size}px: prepare them with --image-size {size} (or "
            f"--full-frame, from which the loader cuts the face crop)"
        )


def check_audio_form(form: StoredForm | None, data_cfg: DataConfig, model_cfg: ModelConfig, where: Path) -> None:
    """data.audio_form must be what the shards store; HiCMAE's waveform roll needs the waveform."""
    if data_cfg.audio_form == "fbank" and data_cfg.roll_augment and model_cfg.arch != "cavmae":
        raise ConfigError(
            "data.roll_augment=true rolls HiCMAE's waveform, which data.audio_form=fbank does not "
            "have: use audio_form wave (shards from `hicmae-dist prepare --audio-form wave`)"
        )
    if form is not None and form.audio_form != data_cfg.audio_form:
        raise BadDataError(
            f"{where}: the shards hold the {form.audio_form!r} audio form, data.audio_form is "
            f"{data_cfg.audio_form!r}: set data.audio_form={form.audio_form}, or prepare the "
            f"shards with `hicmae-dist prepare --audio-form {data_cfg.audio_form}`"
        )


def _slot_shards(shards: list, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    """The shards one (rank, worker) slot reads in an epoch, from that epoch's order.

    With a shard per slot or more, each slot gets its own round-robin share, so no clip is read
    by two slots (no duplicate in a global batch). With fewer, the ranks still split when they
    can, otherwise every slot reads every shard (their random streams still differ).
    """
    slots = world_size * num_workers
    if len(shards) >= slots:
        return shards[rank * num_workers + worker :: slots]
    if len(shards) >= world_size:
        return shards[rank::world_size]
    return list(shards)


def _seeds(text: str) -> tuple[int, int]:
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") >> 1


class PretrainStream(IterableDataset):
    """One rank's batches (module docstring); iterated by the DataLoader in each worker.
    video_out: "uint8" (the contract), "jpeg" (data.decode_on cuda), or "float": today's path
    before the uint8 contract, kept as the benchmark's comparison row and for the equality test
    (normalised in the worker, new batch memory every batch)."""

    def __init__(
        self,
        shards: list[ShardIndex],
        data_cfg: DataConfig,
        model_cfg: ModelConfig,
        rank: int,
        world_size: int,
        seed: int,
        start_batch: int = 0,
        video_out: str = "uint8",
    ):
        if video_out not in VIDEO_OUTS:
            raise ValueError(f"video_out must be one of {VIDEO_OUTS}, got {video_out!r}")
        self.shards, self.data_cfg, self.model_cfg = shards, data_cfg, model_cfg
        self.rank, self.world_size, self.seed, self.start_batch = rank, world_size, seed, start_batch
        self.video_out = video_out
        self.num_samples = sum(len(s) for s in shards)
        self.batches_per_epoch = max(1, self.num_samples // (world_size * data_cfg.batch_size))
        self.num_workers = max(1, data_cfg.num_workers)  # virtual workers: one stream each
        m = model_cfg
        S = m.image_size
        if m.arch == "cavmae":
            self.frames_shape = ()  # one frame per clip
            freq, time = m.mel_bins // m.patch, m.audio_frames // m.patch
            self.mask_shapes = ((m.image_size // m.patch) ** 2, freq * time)
        else:
            self.frames_shape = (m.num_frames,)
            spatial = (m.image_size // m.patch) ** 2
            self.mask_shapes = (
                (m.num_frames // m.tubelet) * spatial,
                (m.audio_frames // m.patch) * (m.mel_bins // m.patch),
            )
        self.video_shape = (3, *self.frames_shape, S, S) if video_out == "float" else (*self.frames_shape, S, S, 3)
        self.audio_shape = (1, m.audio_frames, m.mel_bins)
        self._bad_logged = 0

    # --- the stream's arithmetic: which worker makes which batch ---------------------------------

    def first_local(self, epoch: int, v: int) -> int:
        """How many of virtual worker v's batches come before epoch `epoch`."""
        return max(0, (epoch * self.batches_per_epoch - v + self.num_workers - 1) // self.num_workers)

    def epoch_shards(self, epoch: int, v: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"hicmae-dist/shards/{self.seed}/{epoch}").shuffle(order)  # same on every rank
        return _slot_shards(order, self.rank, self.world_size, v, self.num_workers)

    def _tag(self, epoch: int, v: int) -> str:
        return f"hicmae-dist/{self.seed}/{self.world_size}/{self.num_workers}/{epoch}/{self.rank}/{v}"

    def _refs(self, epoch: int, v: int) -> Iterator[tuple[int, int]]:
        """(shard, sample) numbers of the slot's epoch, endless: its shards, then again reordered."""
        own = self.epoch_shards(epoch, v)
        reorder = random.Random(self._tag(epoch, v) + "/order")
        order = own
        while True:
            for s in order:
                for i in range(len(self.shards[s])):
                    yield s, i
            order = list(own)
            reorder.shuffle(order)

    def _epoch_samples(self, epoch: int, v: int, skip: int, reader: ShardReader) -> Iterator[tuple]:
        """The slot's epoch stream after `skip` samples: ((shard, i), sample or exception)."""
        size = max(1, self.data_cfg.shuffle_buffer)
        rng = random.Random(self._tag(epoch, v) + "/shuffle")
        refs = self._refs(epoch, v)
        buf: list = []
        out = 0
        while out < skip:  # the same draws as below, on numbers only
            ref = next(refs)
            if len(buf) < size:
                buf.append(ref)
            else:
                buf[rng.randrange(size)] = ref
                out += 1
        buf = [(ref, _read(reader, ref)) for ref in buf]
        while True:
            ref = next(refs)
            item = (ref, _read(reader, ref))
            if len(buf) < size:
                buf.append(item)
            else:
                j = rng.randrange(size)
                yield buf[j]
                buf[j] = item

    # --- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, num = (info.id, info.num_workers) if info else (0, 1)
        if num != self.num_workers:
            raise RuntimeError(f"the stream was planned for {self.num_workers} workers, runs in {num}")
        W, B = self.num_workers, self.data_cfg.batch_size
        v = (self.start_batch + w) % W  # rotation: DataLoader worker w makes batch start_batch + w first
        local = (self.start_batch + w) // W
        shared = info is not None
        # the workers' buffers: PREFETCH batches ahead of the consumer, HELD held by it
        pool = None if self.video_out == "float" else BatchPool(PREFETCH + HELD if shared else HELD, shared)
        reader = ShardReader(self.shards)
        try:
            while True:
                epoch = (local * W + v) // self.batches_per_epoch
                first, end = self.first_local(epoch, v), self.first_local(epoch + 1, v)
                samples = self._epoch_samples(epoch, v, (local - first) * B, reader)
                for p in range(local - first, end - first):
                    items = [next(samples) for _ in range(B)]
                    yield self._batch(items, epoch, v, p, local * W + v, pool)
                    local += 1
        finally:
            reader.close()

    def tensor_specs(self, B: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each tensor of a batch of B (the JPEG bytes aside: their size varies)."""
        nv, na = self.mask_shapes
        specs = {
            "audio": ((B, *self.audio_shape), torch.float32),
            "video_mask": ((B, nv), torch.bool),
            "audio_mask": ((B, na), torch.bool),
            "label": ((B,), torch.int64),
            "start_frame": ((B,), torch.int64),
            "crop": ((B, 4), torch.int64),
        }
        if self.video_out == "jpeg":
            specs.update(
                jpeg_offsets=((B, *self.frames_shape), torch.int64),
                jpeg_sizes=((B, *self.frames_shape), torch.int64),
                face=((B, 4), torch.int64),
            )
        else:
            specs["video"] = ((B, *self.video_shape), torch.uint8 if self.video_out == "uint8" else torch.float32)
        return specs

    def _batch(self, items: list[tuple], epoch: int, v: int, p: int, index: int, pool: BatchPool | None) -> dict:
        B = len(items)
        specs = self.tensor_specs(B)
        if pool is None:  # the float path: new memory every batch, as before the pool
            batch = {k: _empty(shape, dtype, get_worker_info() is not None) for k, (shape, dtype) in specs.items()}
        else:
            batch = pool.take(specs)
        if self.video_out == "jpeg":
            batch["jpeg"] = [None] * B  # each row's JPEG slices until _pack_jpegs
        keys: list[str | None] = [None] * B
        tag = self._tag(epoch, v)
        bad = []
        for t, (ref, sample) in enumerate(items):
            j = p * B + t  # position in the slot's epoch stream
            try:
                if isinstance(sample, BaseException):
                    raise sample
                keys[t] = self._decode_into(batch, t, sample, f"{tag}/{j}")
            except Exception as exn:  # a corrupt sample must not end the run on its own
                bad.append(t)
                self._log_bad(ref, sample, exn)
        good = [t for t in range(B) if t not in bad]
        if bad and not good:
            raise BadDataError(
                f"every sample of batch {index} (rank {self.rank}) was unreadable; the warnings above name them"
            )
        for n, t in enumerate(bad):  # re-decode a good sample of the batch, fresh augmentation
            for k in range(len(good)):
                donor = good[(n + k) % len(good)]
                try:
                    keys[t] = self._decode_into(batch, t, items[donor][1], f"{tag}/{p * B + t}/again/{k}")
                    break
                except Exception:  # e.g. a window the donor's audio cannot fill: try the next
                    continue
            else:
                raise BadDataError(
                    f"no sample of batch {index} (rank {self.rank}) could stand in for its {len(bad)} unreadable ones"
                )
        if self.video_out == "jpeg":
            _pack_jpegs(batch, pool)
        batch.update(key=keys, index=index, epoch=epoch, bad_samples=len(bad))
        return batch

    def _log_bad(self, ref: tuple[int, int], sample, exn: BaseException) -> None:
        self._bad_logged += 1
        if self._bad_logged <= MAX_BAD_LOGS or self._bad_logged % 100 == 0:
            key = sample.get("__key__") if isinstance(sample, dict) else f"sample {ref[1]}"
            log.warning(
                "skipping %s of %s (rank %d): %s: %s [%d bad so far in this worker%s]",
                key,
                Path(self.shards[ref[0]].path).name,
                self.rank,
                type(exn).__name__,
                exn,
                self._bad_logged,
                "; logging one in 100 from now" if self._bad_logged == MAX_BAD_LOGS else "",
            )

    # --- decoding ---------------------------------------------------------------------------------

    def _decode_into(self, batch: dict, t: int, sample: dict, tag: str) -> str:
        """Decode one sample into row t of the batch; returns its key."""
        rng_seed, mask_seed = _seeds(tag)
        rng = random.Random(rng_seed)
        masks = torch.Generator().manual_seed(mask_seed)
        meta = json.loads(sample["json"])
        if meta["sample_rate"] != audio.SAMPLE_RATE:
            raise ValueError(f"audio at {meta['sample_rate']} Hz, expected {audio.SAMPLE_RATE}")
        if self.model_cfg.arch == "cavmae":
            self._cavmae_into(batch, t, sample, meta, rng, masks)
        else:
            self._hicmae_into(batch, t, sample, meta, rng, masks)
        batch["label"][t] = int(meta.get("label", -1))
        return meta["key"]

    def _hicmae_into(
        self, batch: dict, t: int, sample: dict, meta: dict, rng: random.Random, masks: torch.Generator
    ) -> None:
        m, d = self.model_cfg, self.data_cfg
        if meta.get("frames", "stride") != "stride":
            raise ValueError(f"stored frames are {meta['frames']!r}, HiCMAE needs 'stride'")
        start = video.sample_start(meta["num_frames"], m.num_frames, rng)
        window = range(start, start + m.num_frames)
        if self.video_out == "jpeg":  # the trainer's GPU decodes: keep the bytes and the face crop
            batch["jpeg"][t] = _checked_jpegs(video.jpeg_slices(sample["jpgs"], meta["frame_bytes"], window))
            batch["face"][t] = torch.tensor(video.face_box(_stored_size(meta), m.image_size))
            box = video.multiscale_crop_box(m.image_size, rng) if d.multiscale_crop else None
        else:
            frames = video.decode_frames_hwc(sample["jpgs"], meta["frame_bytes"], window)  # (16, h, w, 3) uint8
            face = None if frames.shape[2] == m.image_size else video.face_box(frames.shape[2], m.image_size)
            box = video.multiscale_crop_box(m.image_size, rng) if d.multiscale_crop else None
            into = video.frames_into if self.video_out == "float" else video.frames_u8_into
            into(batch["video"][t], frames, box, face)

        first, length = audio.window_samples(meta, start, m.num_frames)  # the audio under those frames
        audio.hicmae_audio_into(
            batch["audio"][t, 0],
            sample,
            meta,
            d.audio_form,
            first,
            length,
            gain=d.gain_augment,
            roll=d.roll_augment,
            rng=rng,
        )

        batch["video_mask"][t] = tube_mask(
            m.num_frames // m.tubelet, (m.image_size // m.patch) ** 2, m.video_mask_ratio, masks
        )
        batch["audio_mask"][t] = random_mask(batch["audio_mask"].shape[1], m.audio_mask_ratio, masks)
        batch["start_frame"][t] = start * meta["frame_stride"]
        batch["crop"][t] = torch.tensor(box or (0, 0, m.image_size, m.image_size))

    def _cavmae_into(
        self, batch: dict, t: int, sample: dict, meta: dict, rng: random.Random, masks: torch.Generator
    ) -> None:
        m, d = self.model_cfg, self.data_cfg
        stored = meta.get("frame_indices") or [i * meta["frame_stride"] for i in range(meta["num_frames"])]
        wanted = video.cavmae_frame_indices(meta["source_frames"], meta["fps"])[rng.randrange(10)]
        pick = min(range(len(stored)), key=lambda i: abs(stored[i] - wanted))  # exact for "ten"
        if self.video_out == "jpeg":  # decoded on the trainer's GPU
            if _stored_size(meta) != m.image_size:
                raise ValueError(f"stored frames are {_stored_size(meta)}px, CAV-MAE takes {m.image_size}px")
            batch["jpeg"][t] = _checked_jpegs(video.jpeg_slices(sample["jpgs"], meta["frame_bytes"], [pick]))
            batch["face"][t] = torch.tensor((0, 0, m.image_size, m.image_size))
        else:
            frame = video.decode_frames_hwc(sample["jpgs"], meta["frame_bytes"], [pick])[0]  # (224, 224, 3)
            (video.image_into if self.video_out == "float" else video.image_u8_into)(batch["video"][t], frame)

        # data.roll_augment is CAV-MAE's `noise` switch: U*U/10 noise and a time roll of the fbank
        audio.cavmae_audio_into(
            batch["audio"][t, 0],
            sample,
            meta,
            d.audio_form,
            gain=d.gain_augment,
            noise_roll=d.roll_augment,
            rng=rng,
            generator=masks,
        )

        nv, _ = self.mask_shapes
        batch["video_mask"][t] = mae_random_mask(nv, m.video_mask_ratio, masks)
        batch["audio_mask"][t] = audio_structured_mask(
            m.mel_bins // m.patch, m.audio_frames // m.patch, m.audio_mask_ratio, m.audio_mask_mode, masks
        )
        batch["start_frame"][t] = stored[pick]
        batch["crop"][t] = torch.tensor((0, 0, m.image_size, m.image_size))


def _read(reader: ShardReader, ref: tuple[int, int]):
    try:
        return reader.read(*ref)
    except Exception as exn:  # judged (counted, logged) when its turn to be decoded comes
        return exn


def _stored_size(meta: dict) -> int:
    """The stored frames' side, from the sample's json (the jpeg path does not decode them)."""
    if "image_size" not in meta:
        raise ValueError(
            "the sample's json has no image_size (needed by data.decode_on=cuda: shards from "
            "an older prepare; decode on the cpu or prepare them again)"
        )
    return int(meta["image_size"])


def _checked_jpegs(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The JPEGs the GPU will decode: each must start with SOI and end with EOI (a truncated or
    overwritten frame is a bad sample here, in the worker, not a failed decode in the trainer)."""
    for n, jpg in enumerate(jpegs):
        if jpg.numel() < 4 or jpg[:2].tolist() != [0xFF, 0xD8] or jpg[-2:].tolist() != [0xFF, 0xD9]:
            raise ValueError(f"frame {n} of the window is not a whole JPEG ({jpg.numel()} bytes, no SOI/EOI marker)")
    return jpegs


def _pack_jpegs(batch: dict, pool: BatchPool) -> None:
    """batch["jpeg"], each row's list of JPEG slices -> one flat uint8 tensor in the pool's byte
    buffer, with each frame's offset and size in jpeg_offsets / jpeg_sizes."""
    rows = batch["jpeg"]
    offsets, sizes = batch["jpeg_offsets"].view(len(rows), -1), batch["jpeg_sizes"].view(len(rows), -1)
    flat = pool.bytes(sum(j.numel() for row in rows for j in row))
    at = 0
    for t, row in enumerate(rows):
        for f, jpg in enumerate(row):
            flat[at : at + jpg.numel()] = jpg
            offsets[t, f], sizes[t, f] = at, jpg.numel()
            at += jpg.numel()
    batch["jpeg"] = flat


class BatchPool:
    """`slots` batches' tensors, handed out in turn and reused (PretrainLoader: lifetimes); in
    shared memory inside a DataLoader worker. A slot's tensors are made on its first use."""

    def __init__(self, slots: int, shared: bool):
        self.shared = shared
        self._slots: list[dict[str, torch.Tensor] | None] = [None] * slots
        self._bytes: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self._current = 0

    def take(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """The next slot's tensors, as a new dict (the batch's other keys go there)."""
        i = self._current = self._next
        self._next = (i + 1) % len(self._slots)
        if self._slots[i] is None:
            self._slots[i] = {k: _empty(shape, dtype, self.shared) for k, (shape, dtype) in specs.items()}
        return dict(self._slots[i])

    def bytes(self, n: int) -> torch.Tensor:
        """n bytes of the slot last taken (a view of its byte buffer, grown by half when short)."""
        buf = self._bytes[self._current]
        if buf is None or buf.numel() < n:
            buf = self._bytes[self._current] = _empty((n + n // 2,), torch.uint8, self.shared)
        return buf[:n]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """torch.empty, in shared memory inside a DataLoader worker (as default_collate does), so
    the batch crosses to the main process without a copy."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)
