"""synth and prepare on real files: the corpus, the shards, bad clips, resuming (also after SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import pytest
import webdataset as wds

from hicmae_dist.data import video
from hicmae_dist.data.prepare import SkipClip, encode_clip, find_clips, parse_size, prepare_shards, select_clips
from hicmae_dist.data.shards import ShardReader, load_index, parse_sample, scan_tar
from hicmae_dist.data.synth import write_corpus
from tests.data.conftest import BAD, NUM_GOOD, NUM_SYNTH, WAV_BESIDE
from tests.support import require

REPO = Path(__file__).resolve().parents[2]


def _shard_keys(out: Path) -> list[str]:
    """Every sample key in the final shards, read with tarfile (3 members per clip)."""
    names = [n for t in sorted(out.glob("shard-*.tar")) for n in tarfile.open(t).getnames()]
    assert len(names) % 3 == 0
    return sorted(n.rsplit(".", 1)[0] for n in names if n.endswith(".json"))


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
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    kw = dict(num_classes=2, duration_s=2.8, progress=False)
    a = write_corpus(tmp_path / "a", 1, seed=7, **kw)
    b = write_corpus(tmp_path / "b", 1, seed=7, **kw)
    write_corpus(tmp_path / "c", 1, seed=8, **kw)
    assert {k: v for k, v in a.items() if k not in ("out_dir", "labels")} == {
        k: v for k, v in b.items() if k not in ("out_dir", "labels")
    }
    assert files(tmp_path / "a") == files(tmp_path / "b")  # labels.csv and every media byte
    assert (tmp_path / "a/labels.csv").read_text() != (tmp_path / "c/labels.csv").read_text()


def test_prepare_skips_bad_clips_and_writes_the_rest(corpus, shards, labels):
    clips = {c.key: c for c in find_clips(corpus)}
    assert clips.keys() == set(labels) | set(BAD) | {WAV_BESIDE}
    assert clips[next(iter(labels))].audio_path.suffix == ".m4a"  # from the aac tree
    assert clips[WAV_BESIDE].audio_path.suffix == ".wav"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["clips"] == NUM_GOOD and manifest["speakers"] == 3 and manifest["labelled"]
    # every bad clip skipped, counted by kind and listed with its reason; nothing else lost
    assert manifest["num_skipped"] == len(BAD)
    reasons = {s["key"]: (s["kind"], s["reason"]) for s in manifest["skipped"]}
    for key, (kind, text) in BAD.items():
        assert reasons[key][0] == kind and text in reasons[key][1], (key, reasons[key])
    kinds = [kind for kind, _ in BAD.values()]
    assert manifest["skipped_by_kind"] == {k: kinds.count(k) for k in set(kinds)}
    assert _shard_keys(shards) == sorted([*labels, WAV_BESIDE])

    assert manifest["form"] == {
        "frames": "stride",
        "image_size": 160,
        "frame_stride": 4,
        "jpeg_quality": 90,
        "sample_rate": 16000,
        "audio_form": "wave",
    }
    assert manifest["frames"] == NUM_GOOD * 20  # 80 frames, one in 4 kept
    assert manifest["seconds"] == pytest.approx(NUM_GOOD * 3.2, abs=0.5)
    tars = sorted(shards.glob("shard-*.tar"))
    assert [s["shard"] for s in manifest["shards"]] == [t.name for t in tars] and len(tars) == NUM_GOOD
    assert manifest["bytes"] == sum(t.stat().st_size for t in tars)
    assert manifest["bytes_per_clip"] == round(manifest["bytes"] / NUM_GOOD)
    est = manifest["full_set_estimate"]  # VoxCeleb2 dev in this form: hundreds of GB
    assert est["clips"] == 1_091_581 and 2300 < est["hours"] < 2400 and 1e11 < est["bytes"] < 2e12
    assert not list(shards.glob("*.tmp"))

    stored = {}
    for sample in wds.tarfile_samples([{"url": str(t)} for t in tars]):  # plain tars: any reader works
        meta = json.loads(sample["json"])
        stored[meta["key"]] = meta
        assert (meta["fps"], meta["num_frames"], meta["frame_stride"]) == (25.0, 20, 4)
        assert meta["frame_indices"] == list(range(0, 80, 4))
        assert len(sample["pcm"]) == 2 * meta["num_samples"]
        assert meta["num_samples"] == pytest.approx(3.2 * 16000, abs=1100)  # AAC frame padding
        assert meta["sample_rate"] == 16000  # WAV_BESIDE's 44.1 kHz stereo resampled to mono
        first = video.decode_jpegs(sample["jpgs"], meta["frame_bytes"], range(1))
        assert first.shape == (1, 3, 160, 160)
    assert {k: m["label"] for k, m in stored.items()} == {**labels, WAV_BESIDE: -1}


def test_shard_index_locates_every_sample(shards):
    """The .json index's byte boundaries, a scan of the tar and a plain tar reader agree."""
    tars = sorted(shards.glob("shard-*.tar"))
    indexes = [load_index(t) for t in tars]
    reader = ShardReader(indexes)
    for n, (tar, index) in enumerate(zip(tars, indexes)):
        assert index.boundaries == scan_tar(tar).boundaries and index.keys == scan_tar(tar).keys
        plain = list(wds.tarfile_samples([{"url": str(tar)}]))
        for i, expected in enumerate(plain):
            got = reader.read(n, i)
            assert got["__key__"] == expected["__key__"] == index.keys[i]
            assert all(got[k] == expected[k] for k in ("jpgs", "pcm", "json"))
    reader.close()
    # parse_sample also reads what other writers make (webdataset's TarWriter adds pax headers)
    sample = {k: v for k, v in plain[0].items() if not k.startswith("__") or k == "__key__"}
    with wds.TarWriter(str(shards.parent / "other.tar"), encoder=False) as w:
        w.write(sample)
    other = scan_tar(shards.parent / "other.tar")
    blob = (shards.parent / "other.tar").read_bytes()[other.boundaries[0] : other.boundaries[1]]
    assert dict(parse_sample(blob)) == sample


def test_prepare_options(corpus, tmp_path):
    clips = find_clips(corpus)
    assert [c.key.split("/")[0] for c in select_clips(clips, speakers=["id09991", "id09995"])] == ["id09991", "id09995"]
    assert {c.key.split("/")[0] for c in select_clips(clips, speakers=2)} == {"id00000", "id00001"}
    assert len(select_clips(clips, limit=3)) == 3
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("200k") == 200_000
    assert parse_size("3000") == 3000
    with pytest.raises(ValueError, match="expected a number"):
        parse_size("lots")
    with pytest.raises(SkipClip, match="44100 Hz") as err:  # a source not at 16 kHz, resampling off
        encode_clip(next(c for c in clips if c.key == WAV_BESIDE), resample=False)
    assert err.value.kind == "sample_rate"
    with pytest.raises(ValueError, match="contradicts"):
        prepare_shards(corpus, tmp_path / "x", full_frame=True, image_size=192, progress=False)

    # one speaker, whole frames, CAV-MAE's ten frames
    manifest = prepare_shards(
        corpus, tmp_path / "ten", speakers=["id00001"], full_frame=True, frames="ten", progress=False
    )
    assert manifest["clips"] == 3 and manifest["form"]["image_size"] == 224 and manifest["form"]["frames"] == "ten"
    sample = next(iter(wds.tarfile_samples([{"url": str(next((tmp_path / "ten").glob("*.tar")))}])))
    meta = json.loads(sample["json"])
    assert meta["frame_indices"] == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72] and meta["num_frames"] == 10
    assert video.decode_jpegs(sample["jpgs"], meta["frame_bytes"], [3]).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="use another out_dir"):  # another form into the same directory
        prepare_shards(corpus, tmp_path / "ten", speakers=["id00000"], progress=False)


def test_prepare_resumes_without_redoing_clips(corpus, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    first = prepare_shards(corpus, out, shard_size="100MB", limit=3, progress=False)
    assert first["clips"] == 3
    (out / "shard-000001.tar.tmp").write_bytes(b"left over by a crash")
    (out / "shard-000007.json").write_text("{}")  # an index whose tar never got its final name
    second = prepare_shards(corpus, out, shard_size="100MB", progress=False)
    assert second["clips"] == NUM_GOOD and [s["clips"] for s in second["shards"]] == [3, NUM_GOOD - 3]
    assert second["num_skipped"] == len(BAD) and second["last_run"]["resumed_shards"] == 1
    keys = _shard_keys(out)
    assert len(keys) == NUM_GOOD and len(set(keys)) == NUM_GOOD  # no repeats
    assert not list(out.glob("*.tmp")) and not (out / "shard-000007.json").exists()

    # a third run has nothing left: clips in shards and the skips recorded with them are not redone
    from hicmae_dist.data import prepare as prep

    calls = []
    monkeypatch.setattr(prep, "encode_clip", lambda clip, **kw: calls.append(clip.key))
    third = prepare_shards(corpus, out, shard_size="100MB", progress=False)
    assert calls == [] and third["clips"] == NUM_GOOD and third["num_skipped"] == len(BAD)


def test_prepare_survives_sigkill(corpus, labels, tmp_path, capsys):
    """`hicmae-dist prepare` killed with SIGKILL after its first shard, then run again: the final
    shards hold every clip exactly once, and no final name ever held a partial shard."""
    src, out = tmp_path / "src", tmp_path / "shards"
    sources = sorted(labels)
    keys = []
    for i in range(24):  # 24 clips (links to the 6 synthetic ones), one per ~250 kB shard
        key = f"id{20000 + i:05d}/video{i:06d}/00001"
        for kind, ext in (("mp4", ".mp4"), ("aac", ".m4a")):
            link = src / "dev" / kind / f"{key}{ext}"
            link.parent.mkdir(parents=True)
            link.symlink_to(corpus / "dev" / kind / f"{sources[i % len(sources)]}{ext}")
        keys.append(key)
    cmd = [
        sys.executable,
        "-m",
        "hicmae_dist.cli",
        "prepare",
        "--src",
        str(src),
        "--out",
        str(out),
        "--shard-size",
        "200kB",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "shard-000000.tar").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "prepare wrote no shard in 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "prepare finished before the kill: nothing was tested"
    killed = sorted(out.glob("shard-*.tar"))
    assert 1 <= len(killed) < 24
    for tar in killed:  # every final name holds a complete, indexed shard
        index = json.loads(tar.with_suffix(".json").read_text())
        assert index["bytes"] == tar.stat().st_size and scan_tar(tar).keys == index["keys"]

    from hicmae_dist.cli import main  # the restart runs in-process (a second import of torch costs ~10 s here)

    assert main(cmd[3:]) == 0
    assert "resumed: " in capsys.readouterr().err
    assert _shard_keys(out) == sorted(keys)  # each clip exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clips"] == 24 and manifest["num_skipped"] == 0
    assert manifest["last_run"]["clips_done"] == 24 - sum(
        json.loads(t.with_suffix(".json").read_text())["clips"] for t in killed
    )
    assert not list(out.glob("*.tmp"))
