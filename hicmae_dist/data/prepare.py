"""VoxCeleb2-layout clips -> tar shards for pretraining, decoded once.

Source: <split>/mp4/<speaker>/<video>/<clip>.mp4 with the audio in <split>/aac/.../<clip>.m4a, a
<clip>.wav beside the mp4, or the mp4's own track; an optional labels.csv at the root. One sample
per clip: {key}.jpgs (the kept frames as JPEGs: every 4th frame, or CAV-MAE's ten), {key}.pcm or
{key}.fbank (the audio form), {key}.json (the metadata). Each shard is written as a .tmp, fsynced,
indexed (shard-NNNNNN.json: the samples' byte ranges for the loader's seeks) and renamed when
complete; manifest.json last. A rerun on the same out_dir resumes. Bad clips are skipped and
listed. The format, the frame and image choices and why JPEG: docs/data.md, "The shards".
"""

from __future__ import annotations

import csv
import fcntl
import functools
import json
import logging
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torchcodec.decoders import AudioDecoder, VideoDecoder
from tqdm import tqdm

from hicmae_dist.data import audio, video
from hicmae_dist.data.shards import TarShardWriter, index_path, scan_tar

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10**9  # ~1 GB: ~1,500 clips; big enough to stream, small enough to spread
FRAME_MODES = ("stride", "ten")
VOX2_DEV_CLIPS = 1_091_581  # usable clips of VoxCeleb2 dev (docs/models.md, HiCMAE pretraining recipe)
VOX2_MEAN_CLIP_S = 2442 * 3600 / 1_128_246  # 7.79 s: the paper's 2,442 h over its 1,128,246 clips
SKIP_KINDS = ("unreadable", "frame_size", "fps", "too_short", "no_audio", "sample_rate", "av_mismatch")


@dataclass(frozen=True)
class ClipSource:
    key: str  # "<speaker>/<video>/<clip>"
    video_path: Path
    audio_path: Path  # m4a or wav beside, else the mp4 itself
    label: int  # -1 when unknown


class SkipClip(Exception):
    """A clip that cannot be used; kind is one of SKIP_KINDS, the message says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def find_clips(src_dir: str | Path) -> list[ClipSource]:
    """Every <speaker>/<video>/<clip>.mp4 under src_dir, sorted by key, with its audio file and
    its label from src_dir/labels.csv (if that file exists)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    labels = _read_labels(src / "labels.csv")
    clips = []
    for mp4 in src.resolve().rglob("*.mp4"):
        key = "/".join(mp4.with_suffix("").parts[-3:])
        candidates = [mp4.with_suffix(".wav")]
        if len(mp4.parts) > 4 and mp4.parts[-4] == "mp4":  # official: <split>/aac/... mirrors <split>/mp4/...
            candidates.insert(0, (mp4.parents[3] / "aac" / key).with_suffix(".m4a"))
        audio_path = next((p for p in candidates if p.exists()), mp4)
        clips.append(ClipSource(key, mp4, audio_path, labels.get(key, -1)))
    return sorted(clips, key=lambda c: c.key)


def select_clips(
    clips: list[ClipSource], *, speakers: int | list[str] | None = None, limit: int | None = None
) -> list[ClipSource]:
    """speakers: the first N speaker ids (sorted) or a list of ids; then limit: the first N clips
    by key."""
    if speakers is not None:
        ids = sorted({c.key.split("/")[0] for c in clips})
        if isinstance(speakers, int):
            keep = set(ids[:speakers])
        else:
            keep = set(speakers)
            missing = keep - set(ids)
            if missing:
                log.warning("no clips for speakers %s", ", ".join(sorted(missing)[:10]))
        clips = [c for c in clips if c.key.split("/")[0] in keep]
    return clips[:limit] if limit is not None else clips


def parse_size(text: str | int | float) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '200k' -> 200000, '3000' -> 3000 bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise ValueError(f"size {text!r}: expected a number of bytes with an optional unit, e.g. 1GB, 500MB, 64MiB")
    number, unit, binary = match.groups()
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _read_labels(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"key", "label"} <= rows[0].keys():
        raise ValueError(f"{path}: expected columns 'key' and 'label', got {list(rows[0])}")
    return {row["key"]: int(row["label"]) for row in rows}


def store_form(image_size: int = 160, frames: str = "stride", jpeg_quality: int = 90, audio_form: str = "wave") -> dict:
    """The 'form' record of shard indexes and the manifest (what the loader checks)."""
    if frames not in FRAME_MODES:
        raise ValueError(f"frames must be one of {FRAME_MODES}, got {frames!r}")
    if audio_form not in audio.AUDIO_FORMS:
        raise ValueError(f"audio_form must be one of {audio.AUDIO_FORMS}, got {audio_form!r}")
    if image_size not in (160, 192, video.SOURCE_SIZE):
        raise ValueError(f"image_size must be 160, 192 (face crops) or {video.SOURCE_SIZE} (the full frame)")
    return {
        "frames": frames,
        "image_size": image_size,
        "frame_stride": video.FRAME_STRIDE if frames == "stride" else None,
        "jpeg_quality": jpeg_quality,
        "sample_rate": audio.SAMPLE_RATE,
        "audio_form": audio_form,
    }


def encode_clip(
    clip: ClipSource,
    image_size: int = 160,
    jpeg_quality: int = 90,
    *,
    frames: str = "stride",
    max_av_diff_s: float = 0.5,
    resample: bool = True,
    audio_form: str = "wave",
) -> dict:
    """Decode one clip and build its shard sample (module docstring); raises SkipClip.

    Skipped: unreadable video, frames not 224x224, not 25 fps, fewer than 64 frames (one 16-frame
    window at stride 4), no readable audio, audio not at 16 kHz (with resample=False: a source at
    another rate; always: a decode that does not give 16 kHz), audio and video durations more
    than max_av_diff_s apart.
    """
    try:
        decoder = VideoDecoder(clip.video_path, dimension_order="NCHW")
        info = decoder.metadata
        # The nominal rate: the content average is off for clips cut or truncated mid-stream.
        fps = float(info.average_fps_from_header or info.average_fps)
        size, num_source = (info.width, info.height), len(decoder)  # frames found by a scan
    except Exception as exn:  # torchcodec raises RuntimeError/ValueError on broken files
        raise SkipClip("unreadable", f"unreadable video: {_first_line(exn)}") from exn
    if size != (video.SOURCE_SIZE, video.SOURCE_SIZE):
        raise SkipClip(
            "frame_size", f"expected {video.SOURCE_SIZE}x{video.SOURCE_SIZE} frames, got {size[0]}x{size[1]}"
        )
    if num_source < video.MIN_SOURCE_FRAMES:
        raise SkipClip(
            "too_short",
            f"too short: {num_source} frames, need {video.MIN_SOURCE_FRAMES} "
            f"(one 16-frame window at stride {video.FRAME_STRIDE})",
        )
    if abs(fps - video.FPS) > 0.01 * video.FPS:
        raise SkipClip("fps", f"expected {video.FPS} fps, got {fps:.2f}")
    wave = _decode_audio(clip, resample)
    audio_s, video_s = wave.shape[-1] / audio.SAMPLE_RATE, num_source / fps
    if abs(audio_s - video_s) > max_av_diff_s:
        raise SkipClip(
            "av_mismatch",
            f"audio ({audio_s:.2f} s in {clip.audio_path.name}) and video "
            f"({video_s:.2f} s) differ by more than {max_av_diff_s} s",
        )
    try:
        if frames == "stride":
            indices = list(range(0, num_source, video.FRAME_STRIDE))
            kept = decoder.get_frames_in_range(0, num_source, video.FRAME_STRIDE).data  # (T, 3, 224, 224)
        else:
            indices = video.cavmae_frame_indices(num_source, fps)
            kept = decoder.get_frames_at(indices).data
    except Exception as exn:
        raise SkipClip("unreadable", f"unreadable video frames: {_first_line(exn)}") from exn

    jpgs, frame_bytes = video.encode_jpegs(video.face_crop(kept, image_size), jpeg_quality)
    speaker, vid, name = clip.key.split("/")
    meta = {
        "key": clip.key,
        "speaker": speaker,
        "video": vid,
        "clip": name,
        "label": clip.label,
        "fps": fps,
        "frames": frames,
        "frame_stride": video.FRAME_STRIDE if frames == "stride" else None,
        "frame_indices": indices,
        "num_frames": len(frame_bytes),
        "source_frames": num_source,
        "image_size": image_size,
        "frame_bytes": frame_bytes,
        "sample_rate": audio.SAMPLE_RATE,
        "num_samples": int(wave.shape[-1]),
    }
    if audio_form == "wave":
        return {"__key__": clip.key, "jpgs": jpgs, "pcm": audio.to_pcm16(wave), "json": json.dumps(meta).encode()}
    log_mel = audio.clip_fbank(wave)  # (frames, 128)
    meta.update(audio_form=audio_form, mel_bins=log_mel.shape[1])
    return {"__key__": clip.key, "jpgs": jpgs, "fbank": audio.to_fbank16(log_mel), "json": json.dumps(meta).encode()}


def _decode_audio(clip: ClipSource, resample: bool):
    where = (
        "no .m4a in the aac tree, no .wav beside the mp4, and no audio track in it"
        if clip.audio_path == clip.video_path
        else str(clip.audio_path)
    )
    try:
        decoder = AudioDecoder(clip.audio_path, sample_rate=audio.SAMPLE_RATE if resample else None, num_channels=1)
        native = decoder.metadata.sample_rate
        if not resample and native != audio.SAMPLE_RATE:
            raise SkipClip(
                "sample_rate",
                f"audio at {native} Hz in {clip.audio_path.name}, expected {audio.SAMPLE_RATE} (resampling is off)",
            )
        samples = decoder.get_all_samples()
    except SkipClip:
        raise
    except Exception as exn:
        raise SkipClip("no_audio", f"no readable audio ({where}): {_first_line(exn)}") from exn
    if samples.sample_rate != audio.SAMPLE_RATE:
        raise SkipClip("sample_rate", f"audio decoded at {samples.sample_rate} Hz, expected {audio.SAMPLE_RATE}")
    if samples.data.shape[-1] < audio.FRAME_SAMPLES:
        raise SkipClip("no_audio", f"no readable audio ({where}): {samples.data.shape[-1]} samples")
    return samples.data  # (1, S) float32


def _first_line(exn: BaseException) -> str:
    lines = str(exn).strip().splitlines()
    return lines[0].strip() if lines else type(exn).__name__


def _encode_or_skip(clip: ClipSource, **kw) -> dict:
    """The sample, or {'skip': {key, path, kind, reason}}."""
    try:
        return encode_clip(clip, **kw)
    except SkipClip as exn:
        return {"skip": {"key": clip.key, "path": str(clip.video_path), "kind": exn.kind, "reason": str(exn)}}


class _ShardSink:
    """Writes samples into shard-%06d.tar files of about max_bytes each (see the module docstring);
    clips skipped while a shard fills are recorded in its index."""

    def __init__(self, out_dir: Path, first_index: int, max_bytes: int, form: dict):
        self.out_dir, self.index, self.max_bytes, self.form = out_dir, first_index, max_bytes, form
        self.writer: TarShardWriter | None = None
        self.tmp: Path | None = None
        self.current: dict = {}
        self.pending_skips: list[dict] = []
        self.written: list[dict] = []

    def skip(self, entry: dict) -> None:
        self.pending_skips.append(entry)

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self.tmp = self.out_dir / f"shard-{self.index:06d}.tar.tmp"
            self.writer = TarShardWriter(self.tmp)
            self.current = {
                "shard": f"shard-{self.index:06d}.tar",
                "index": self.index,
                "form": self.form,
                "clips": 0,
                "frames": 0,
                "seconds": 0.0,
                "jpg_bytes": 0,
                _audio_bytes_key(self.form): 0,
            }
        meta = json.loads(sample["json"])
        cur = self.current
        self.writer.write(sample)
        cur["clips"] += 1
        cur["frames"] += meta["num_frames"]
        cur["seconds"] += meta["num_samples"] / meta["sample_rate"]
        cur["jpg_bytes"] += len(sample["jpgs"])
        cur[_audio_bytes_key(self.form)] += len(sample[_AUDIO_MEMBER[self.form["audio_form"]]])
        if self.writer.boundaries[-1] >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()  # fsynced
        shard = self.out_dir / self.current["shard"]
        self.current.update(
            bytes=self.tmp.stat().st_size,
            keys=self.writer.keys,
            boundaries=self.writer.boundaries,
            skipped=self.pending_skips,
        )
        self.current["seconds"] = round(self.current["seconds"], 3)
        _write_json_atomic(index_path(shard), self.current)  # the index first: a tar is final only with it
        os.replace(self.tmp, shard)
        self.written.append(self.current)
        self.writer, self.pending_skips = None, []
        self.index += 1


_AUDIO_MEMBER = {"wave": "pcm", "fbank": "fbank"}


def _audio_bytes_key(form: dict) -> str:
    """'pcm_bytes' or 'fbank_bytes': the index's total of the audio members."""
    return _AUDIO_MEMBER[form.get("audio_form", "wave")] + "_bytes"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _completed_shards(out_dir: Path, form: dict) -> tuple[list[dict], int]:
    """(index of every complete shard from an earlier run, the next free shard number).
    Leftovers of an interrupted run (.tmp files, indexes without their tar) are removed; a tar
    without an index (another tool's) is scanned."""
    for tmp in out_dir.glob("shard-*.tmp"):
        tmp.unlink()
    for orphan in out_dir.glob("shard-*.json"):
        if not orphan.with_suffix(".tar").exists():
            orphan.unlink()
    done, numbers = [], [-1]
    for tar in sorted(out_dir.glob("shard-*.tar")):
        numbers.append(int(tar.stem.split("-")[1]) if tar.stem.split("-")[1].isdigit() else -1)
        side = index_path(tar)
        if side.exists():
            index = json.loads(side.read_text())
        else:
            scanned = scan_tar(tar)
            log.warning("%s has no index; scanned it: %d samples", tar, len(scanned))
            index = {
                "shard": tar.name,
                "keys": scanned.keys,
                "clips": len(scanned),
                "bytes": tar.stat().st_size,
                "frames": 0,
                "seconds": 0.0,
                "jpg_bytes": 0,
                "pcm_bytes": 0,
                "skipped": [],
            }
        stored = index.get("form") or {"image_size": index.get("image_size")}
        theirs = {k: stored.get(k) for k in ("frames", "image_size", "jpeg_quality") if k in stored}
        if "form" in index:  # older indexes have no audio_form: they hold PCM
            theirs["audio_form"] = stored.get("audio_form", "wave")
        if any(form[k] != v for k, v in theirs.items() if v is not None):
            raise ValueError(
                f"{tar} holds {theirs}, this run makes { {k: form[k] for k in theirs} }; use another out_dir"
            )
        index.setdefault("skipped", [])
        done.append(index)
    return done, max(numbers) + 1


def prepare_shards(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int | str | None = None,
    shard_size_mb: float | None = None,
    workers: int = 1,
    limit: int | None = None,
    speakers: int | list[str] | None = None,
    image_size: int = 160,
    full_frame: bool = False,
    frames: str = "stride",
    jpeg_quality: int = 90,
    max_av_diff_s: float = 0.5,
    resample: bool = True,
    shuffle_seed: int | None = 0,
    progress: bool = True,
    audio_form: str = "wave",
) -> dict:
    """Convert the clips under src_dir into shards under out_dir; returns the manifest.

    shard_size: bytes per shard (int or '1GB', '200MB'; default ~1 GB); shard_size_mb is the older
    spelling (MiB). speakers / limit select clips (select_clips). full_frame stores the whole
    224x224 frame (= image_size 224); frames "stride" or "ten"; audio_form "wave" (int16 PCM) or
    "fbank" (the clip's float16 log-mel) (module docstring). Bad clips are
    skipped and listed with their reason (encode_clip), never fatal. shuffle_seed orders the
    clips across shards (None: sorted by key). The manifest (also out_dir/manifest.json) has
    clips, frames (stored), seconds, bytes, bytes_per_clip, bytes_per_second, speakers, the
    stored form, the shards, the skipped clips and counts per kind, and the full-set estimate.
    """
    if full_frame:
        if image_size not in (160, video.SOURCE_SIZE):
            raise ValueError(f"full_frame stores {video.SOURCE_SIZE}px frames; image_size={image_size} contradicts it")
        image_size = video.SOURCE_SIZE
    max_bytes = _shard_bytes(shard_size, shard_size_mb)
    form = store_form(image_size, frames, jpeg_quality, audio_form)
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        clips = _ordered_clips(src, speakers, limit, shuffle_seed)
        done, next_number, todo = _resume(out, form, clips)
        started = time.perf_counter()
        sink = _ShardSink(out, next_number, max_bytes, form)
        encode = functools.partial(
            _encode_or_skip,
            image_size=image_size,
            jpeg_quality=jpeg_quality,
            frames=frames,
            max_av_diff_s=max_av_diff_s,
            resample=resample,
            audio_form=audio_form,
        )
        skipped_now = _encode_into(sink, todo, encode, workers, progress)
        elapsed = time.perf_counter() - started

        shards = done + sink.written
        if not any(s["clips"] for s in shards):
            reasons = [s["reason"] for s in sink.pending_skips[:3]]
            raise RuntimeError(
                f"none of the {len(clips)} clips under {src} could be prepared; first reasons: {reasons}"
            )
        run = {
            "clips_done": len(todo),
            "skipped": skipped_now,
            "shards_written": len(sink.written),
            "seconds": round(elapsed, 2),
            "clips_per_s": round(len(todo) / elapsed, 2) if elapsed > 0 else None,
            "workers": workers,
            "resumed_shards": len(done),
        }
        return _write_manifest(out, src, shards, sink.pending_skips, form, any(c.label >= 0 for c in clips), run)
    finally:
        lock.close()


def _shard_bytes(shard_size: int | str | None, shard_size_mb: float | None) -> int:
    """Bytes per shard from shard_size ('1GB', '200MB', int) or the older shard_size_mb (MiB)."""
    if shard_size is not None and shard_size_mb is not None:
        raise ValueError("give shard_size or shard_size_mb, not both")
    max_bytes = (
        int(shard_size_mb * 2**20) if shard_size_mb is not None else parse_size(shard_size or DEFAULT_SHARD_SIZE)
    )
    if max_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {max_bytes} bytes")
    return max_bytes


def _ordered_clips(src: Path, speakers, limit: int | None, shuffle_seed: int | None) -> list:
    """The selected clips under src, shuffled by shuffle_seed (None: sorted by key)."""
    clips = select_clips(find_clips(src), speakers=speakers, limit=limit)
    if not clips:
        raise FileNotFoundError(
            f"no <speaker>/<video>/<clip>.mp4 files under {src}"
            + (" for the selected speakers" if speakers is not None else "")
        )
    if shuffle_seed is not None:
        clips = list(clips)
        random.Random(f"hicmae-dist/prepare/{shuffle_seed}").shuffle(clips)
    return clips


def _resume(out: Path, form: dict, clips: list) -> tuple[list[dict], int, list]:
    """(the shards already complete in out, the next shard number, the clips still to do)."""
    done, next_number = _completed_shards(out, form)
    done_keys = {key for shard in done for key in shard["keys"]} | {
        s["key"] for shard in done for s in shard["skipped"]
    }
    todo = [c for c in clips if c.key not in done_keys]
    if done:
        log.info(
            "resuming in %s: %d clips already done in %d shards, %d to do", out, len(done_keys), len(done), len(todo)
        )
    return done, next_number, todo


def _encode_into(sink: _ShardSink, todo: list, encode, workers: int, progress: bool) -> int:
    """Encode `todo` (in `workers` processes) into the sink, then close it; returns how many
    clips were skipped (each logged with its reason)."""
    bar = tqdm(total=len(todo), desc="prepare", unit="clip", disable=not progress, dynamic_ncols=True)
    skipped_now = 0
    for result in _encoded(todo, encode, workers):
        if "skip" in result:
            sink.skip(result["skip"])
            skipped_now += 1
            log.warning("skipping %s: %s", result["skip"]["path"], result["skip"]["reason"])
        else:
            sink.write(result)
        bar.update()
        bar.set_postfix(shards=len(sink.written), skipped=skipped_now)
    sink.close()
    bar.close()
    return skipped_now


def _lock(out: Path):
    f = open(out / ".prepare.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another `prepare` is writing {out} (it holds {out / '.prepare.lock'})") from None
    return f


def _encoded(clips: list[ClipSource], encode, workers: int) -> Iterator[dict]:
    """Encode results in clip order, from `workers` threads with a few clips in flight each.
    Threads, not processes: the decoders and the JPEG encoder release the GIL, results need no
    pickling, and a killed run leaves no orphan processes."""
    workers = max(1, workers)
    with ThreadPoolExecutor(workers) as pool:
        in_flight: deque[Future] = deque()
        for clip in clips:
            in_flight.append(pool.submit(encode, clip))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def full_set_estimate(shards: list[dict]) -> dict:
    """Disk for VoxCeleb2 dev in this stored form, from these shards' bytes: what grows with
    duration (PCM or fbank; JPEGs at stride 4) per second, the rest (JPEGs of 'ten', json, tar headers)
    per clip."""
    clips = sum(s["clips"] for s in shards)
    seconds = sum(s["seconds"] for s in shards)
    keys = [_audio_bytes_key(s.get("form") or {}) for s in shards]
    if not clips or not seconds or not all(k in s and s.get("jpg_bytes") for k, s in zip(keys, shards)):
        return {}
    total = sum(s["bytes"] for s in shards)
    jpg, sound = sum(s["jpg_bytes"] for s in shards), sum(s[k] for k, s in zip(keys, shards))
    per_second = (sound + (jpg if shards[0]["form"]["frames"] == "stride" else 0)) / seconds
    per_clip = (total - per_second * seconds) / clips
    dev_seconds = VOX2_DEV_CLIPS * VOX2_MEAN_CLIP_S
    estimate = per_second * dev_seconds + per_clip * VOX2_DEV_CLIPS
    return {
        "clips": VOX2_DEV_CLIPS,
        "hours": round(dev_seconds / 3600),
        "bytes_per_second": round(per_second),
        "bytes_per_clip_fixed": round(per_clip),
        "bytes": round(estimate),
        "bytes_per_clip": round(estimate / VOX2_DEV_CLIPS),
        "human": _human(estimate),
    }


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def _write_manifest(
    out: Path, src: Path, shards: list[dict], trailing_skips: list[dict], form: dict, labelled: bool, run: dict
) -> dict:
    clips = sum(s["clips"] for s in shards)
    seconds = sum(s["seconds"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    skipped = [s for shard in shards for s in shard["skipped"]] + trailing_skips
    manifest = {
        "source": str(src.resolve()),
        "form": form,
        "clips": clips,
        "frames": sum(s["frames"] for s in shards),
        "seconds": round(seconds, 2),
        "bytes": total_bytes,
        "bytes_per_clip": round(total_bytes / clips) if clips else 0,
        "bytes_per_second": round(total_bytes / seconds) if seconds else 0,
        "speakers": len({key.split("/")[0] for s in shards for key in s["keys"]}),
        "labelled": labelled,
        "image_size": form["image_size"],  # as the first layer's manifests
        "frame_stride": form["frame_stride"],
        "sample_rate": form["sample_rate"],
        "shards": [{k: s[k] for k in ("shard", "clips", "bytes")} for s in shards],
        "skipped": skipped,
        "num_skipped": len(skipped),
        "skipped_by_kind": dict(Counter(s["kind"] for s in skipped if "kind" in s)),
        "full_set_estimate": full_set_estimate(shards),
        "last_run": run,
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


def format_summary(manifest: dict) -> str:
    """A few lines for the end of `hicmae-dist prepare`."""
    form, run, est = manifest["form"], manifest.get("last_run", {}), manifest.get("full_set_estimate") or {}
    lines = [
        f"prepared {manifest['clips']} clips ({manifest['seconds'] / 3600:.2f} h, {manifest['speakers']} speakers) "
        f"in {len(manifest['shards'])} shards, {_human(manifest['bytes'])}: {_human(manifest['bytes_per_clip'])} "
        f"per clip, {_human(manifest['bytes_per_second'])} per second",
        f"stored form: {form['frames']} frames, {form['image_size']}px, JPEG q{form['jpeg_quality']}, "
        + ("float16 log-mel fbank" if form.get("audio_form") == "fbank" else "int16 PCM")
        + f" at {form['sample_rate']} Hz",
        f"skipped {manifest['num_skipped']} clips"
        + (
            ": " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["skipped_by_kind"].items()))
            if manifest["num_skipped"]
            else ""
        ),
    ]
    if run:
        rate = f", {run['clips_per_s']} clips/s with {run['workers']} workers" if run.get("clips_per_s") else ""
        resumed = f" (resumed: {run['resumed_shards']} shards were already done)" if run.get("resumed_shards") else ""
        lines.append(f"this run: {run['clips_done']} clips in {run['seconds']} s{rate}{resumed}")
    if est:
        lines.append(
            f"VoxCeleb2 dev in this form ({est['clips']:,} clips, ~{est['hours']:,} h): ~{est['human']} "
            f"(~{_human(est['bytes_per_clip'])} per clip)"
        )
    return "\n".join(lines)
