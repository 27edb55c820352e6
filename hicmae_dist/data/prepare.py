"""VoxCeleb2-layout clips -> WebDataset tar shards for pretraining.

Source layout (VoxCeleb2's): <split>/mp4/<speaker>/<video>/<clip>.mp4, with the audio in
<split>/aac/<speaker>/<video>/<clip>.m4a, or a <clip>.wav beside the mp4, or else the mp4's own
audio track. An optional labels.csv (key,...,label) at the source root gives each clip a label.

Stored form, chosen so the loader does the least work per sample. One sample per clip, key
"<speaker>/<video>/<clip>":
    {key}.jpgs   every FRAME_STRIDE-th frame, face-cropped to image_size (rows 0:160, columns
                 32:192 of 224x224), as JPEGs concatenated (sizes in the json)
    {key}.pcm    the audio, 16 kHz mono, little-endian int16
    {key}.json   key, speaker, video, clip, label (-1 if unknown), fps, frame_stride,
                 num_frames (stored), source_frames, frame_bytes, sample_rate, num_samples
The loader then decodes only the 16 JPEGs it samples and slices the PCM; nothing is resampled,
cropped to the face or skipped over at training time.

out_dir gets shard-%06d.tar (each written as .tar.tmp and renamed when complete), a
shard-%06d.json index beside each (its keys and totals), and manifest.json. Running again on
the same out_dir resumes: clips already in a complete shard are not redone.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from torchcodec.decoders import AudioDecoder, VideoDecoder
from tqdm import tqdm

from hicmae_dist.data import audio, video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSource:
    key: str  # "<speaker>/<video>/<clip>"
    video_path: Path
    audio_path: Path  # m4a or wav beside, else the mp4 itself
    label: int  # -1 when unknown


class SkipClip(Exception):
    """A clip that cannot be used; the message says why."""


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
        if mp4.parts[-4] == "mp4":  # official layout: <split>/aac/... mirrors <split>/mp4/...
            candidates.insert(0, (mp4.parents[3] / "aac" / key).with_suffix(".m4a"))
        audio_path = next((p for p in candidates if p.exists()), mp4)
        clips.append(ClipSource(key, mp4, audio_path, labels.get(key, -1)))
    return sorted(clips, key=lambda c: c.key)


def _read_labels(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"key", "label"} <= rows[0].keys():
        raise ValueError(f"{path}: expected columns 'key' and 'label', got {list(rows[0])}")
    return {row["key"]: int(row["label"]) for row in rows}


def encode_clip(clip: ClipSource, image_size: int = 160, jpeg_quality: int = 90) -> dict:
    """Decode one clip and build its shard sample (see the module docstring); raises SkipClip."""
    try:
        decoder = VideoDecoder(clip.video_path, dimension_order="NCHW")
        info = decoder.metadata
        # The nominal rate: the content average is off for clips cut or truncated mid-stream.
        fps = float(info.average_fps_from_header or info.average_fps)
        size, num_source = (info.width, info.height), len(decoder)  # frames found by a scan
    except Exception as exn:  # torchcodec raises RuntimeError/ValueError on broken files
        raise SkipClip(f"unreadable video: {_first_line(exn)}") from exn
    if size != (video.SOURCE_SIZE, video.SOURCE_SIZE):
        raise SkipClip(f"expected {video.SOURCE_SIZE}x{video.SOURCE_SIZE} frames, got {size[0]}x{size[1]}")
    if num_source < video.MIN_SOURCE_FRAMES:
        raise SkipClip(f"too short: {num_source} frames, need {video.MIN_SOURCE_FRAMES}")
    if abs(fps - video.FPS) > 0.01 * video.FPS:
        raise SkipClip(f"expected {video.FPS} fps, got {fps:.2f}")
    try:
        wave = AudioDecoder(clip.audio_path, sample_rate=audio.SAMPLE_RATE,
                            num_channels=1).get_all_samples().data  # (1, S)
    except Exception as exn:
        where = ("no .m4a in the aac tree, no .wav beside the mp4, and no audio track in it"
                 if clip.audio_path == clip.video_path else str(clip.audio_path))
        raise SkipClip(f"no readable audio ({where}): {_first_line(exn)}") from exn
    audio_s, video_s = wave.shape[-1] / audio.SAMPLE_RATE, num_source / fps
    if audio_s < video_s - 0.5:  # the loader takes the audio under any 2.56 s of the video
        raise SkipClip(f"audio ({audio_s:.2f} s in {clip.audio_path.name}) ends before the video "
                       f"({video_s:.2f} s)")
    try:
        frames = decoder.get_frames_in_range(0, num_source, video.FRAME_STRIDE).data  # (T, 3, 224, 224)
    except Exception as exn:
        raise SkipClip(f"unreadable video frames: {_first_line(exn)}") from exn

    jpgs, frame_bytes = video.encode_jpegs(video.face_crop(frames, image_size), jpeg_quality)
    speaker, vid, name = clip.key.split("/")
    meta = {
        "key": clip.key, "speaker": speaker, "video": vid, "clip": name, "label": clip.label,
        "fps": fps, "frame_stride": video.FRAME_STRIDE, "num_frames": len(frame_bytes),
        "source_frames": num_source, "image_size": image_size, "frame_bytes": frame_bytes,
        "sample_rate": audio.SAMPLE_RATE, "num_samples": int(wave.shape[-1]),
    }
    return {"__key__": clip.key, "jpgs": jpgs, "pcm": audio.to_pcm16(wave),
            "json": json.dumps(meta).encode()}


def _first_line(exn: BaseException) -> str:
    lines = str(exn).strip().splitlines()
    return lines[0].strip() if lines else type(exn).__name__


def _encode_or_skip(clip: ClipSource, image_size: int) -> dict | str:
    """The sample, or the reason the clip is skipped."""
    try:
        return encode_clip(clip, image_size)
    except SkipClip as exn:
        return str(exn)


class _ShardSink:
    """Writes samples into shard-%06d.tar files of about max_bytes each; every shard is written
    as .tar.tmp and renamed, after its .json index, only once complete."""

    def __init__(self, out_dir: Path, first_index: int, max_bytes: int, image_size: int):
        self.out_dir, self.index = out_dir, first_index
        self.max_bytes, self.image_size = max_bytes, image_size
        self.writer: wds.TarWriter | None = None
        self.tmp: Path | None = None
        self.current: dict = {}  # index of the shard being written
        self.written: list[dict] = []  # index of each completed shard

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self.tmp = self.out_dir / f"shard-{self.index:06d}.tar.tmp"
            self.writer = wds.TarWriter(str(self.tmp), encoder=False)
            self.current = {"shard": self.tmp.stem, "image_size": self.image_size, "clips": 0,
                            "frames": 0, "seconds": 0.0, "payload": 0, "keys": []}
        meta = json.loads(sample["json"])
        cur = self.current
        cur["payload"] += self.writer.write(sample)
        cur["clips"] += 1
        cur["frames"] += meta["num_frames"]
        cur["seconds"] += meta["num_samples"] / meta["sample_rate"]
        cur["keys"].append(meta["key"])
        if cur["payload"] >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        shard = self.out_dir / self.current["shard"]
        self.current["bytes"] = self.tmp.stat().st_size
        _write_json_atomic(shard.with_suffix(".json"), self.current)
        os.replace(self.tmp, shard)
        self.written.append(self.current)
        self.index += 1


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _completed_shards(out_dir: Path, image_size: int) -> list[dict]:
    """Index of every complete shard from an earlier run (a .tar with its .json); leftovers of
    an interrupted run (.tmp files, orphan indexes) are removed."""
    for tmp in out_dir.glob("shard-*.tmp"):
        tmp.unlink()
    done = []
    for index_path in sorted(out_dir.glob("shard-*.json")):
        if not index_path.with_suffix(".tar").exists():
            index_path.unlink()
            continue
        index = json.loads(index_path.read_text())
        if index["image_size"] != image_size:
            raise ValueError(f"{index_path.with_suffix('.tar')} holds {index['image_size']}px frames, "
                             f"this run makes {image_size}px; use another out_dir")
        done.append(index)
    return done


def prepare_shards(src_dir: str | Path, out_dir: str | Path, *, shard_size_mb: float = 512,
                   workers: int = 1, limit: int | None = None, image_size: int = 160,
                   progress: bool = True) -> dict:
    """Convert the clips under src_dir into shards under out_dir; returns the manifest.

    Bad clips (unreadable, wrong size or frame rate, no audio, shorter than 64 frames) are
    skipped and listed with their reason, never fatal. `limit` takes the first clips by key.
    The manifest (also written to out_dir/manifest.json) has clips, frames (stored), seconds,
    bytes, bytes_per_clip, speakers, labelled clips, the shards and the skipped clips.
    """
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = find_clips(src)[:limit]
    if not clips:
        raise FileNotFoundError(f"no <speaker>/<video>/<clip>.mp4 files under {src}")
    done = _completed_shards(out, image_size)
    done_keys = {key for shard in done for key in shard["keys"]}
    todo = [c for c in clips if c.key not in done_keys]
    if done:
        log.info("resuming in %s: %d clips already in %d shards, %d to do",
                 out, len(done_keys), len(done), len(todo))

    sink = _ShardSink(out, len(done), int(shard_size_mb * 2**20), image_size)
    skipped = []
    bar = tqdm(total=len(todo), desc="prepare shards", unit="clip", disable=not progress)
    for clip, result in zip(todo, _encoded(todo, image_size, workers)):
        if isinstance(result, str):
            skipped.append({"key": clip.key, "path": str(clip.video_path), "reason": result})
            log.warning("skipping %s: %s", clip.video_path, result)
        else:
            sink.write(result)
        bar.update()
        bar.set_postfix(skipped=len(skipped))
    sink.close()
    bar.close()

    shards = done + sink.written
    if not shards:
        raise RuntimeError(f"none of the {len(clips)} clips under {src} could be prepared; "
                           f"first reasons: {[s['reason'] for s in skipped[:3]]}")
    labelled = any(c.label >= 0 for c in clips)
    return _write_manifest(out, src, shards, skipped, image_size, labelled)


def _encoded(clips: list[ClipSource], image_size: int, workers: int) -> Iterator[dict | str]:
    """Encode results (sample or skip reason) in clip order, from `workers` threads with a few
    clips in flight each. Threads, not processes: the decoders and the JPEG encoder release the
    GIL, and no worker has to import torch again."""
    encode = functools.partial(_encode_or_skip, image_size=image_size)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        in_flight: deque[Future] = deque()
        for clip in clips:
            in_flight.append(pool.submit(encode, clip))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _write_manifest(out: Path, src: Path, shards: list[dict], skipped: list[dict],
                    image_size: int, labelled: bool) -> dict:
    clips = sum(s["clips"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "source": str(src.resolve()),
        "clips": clips,
        "frames": sum(s["frames"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 2),
        "bytes": total_bytes,
        "bytes_per_clip": round(total_bytes / clips) if clips else 0,
        "speakers": len({key.split("/")[0] for s in shards for key in s["keys"]}),
        "labelled": labelled,
        "image_size": image_size,
        "frame_stride": video.FRAME_STRIDE,
        "sample_rate": audio.SAMPLE_RATE,
        "shards": [{k: s[k] for k in ("shard", "clips", "bytes")} for s in shards],
        "skipped": skipped,
        "num_skipped": len(skipped),
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest
