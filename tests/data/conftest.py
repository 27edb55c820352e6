"""The data tests' corpus (real mp4/m4a files, good and bad) and its shards, made once a session."""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support import require

NUM_SYNTH = 6
WAV_BESIDE = "id09995/wavbeside0/00001"  # silent mp4 + a 44.1 kHz stereo wav beside it: resampled
NUM_GOOD = NUM_SYNTH + 1
BAD = {  # key -> (kind, how prepare describes it)
    "id09990/truncated00/00001": ("too_short", "too short"),  # the first 20 kB of a good mp4
    "id09991/noaudio0000/00001": ("no_audio", "no readable audio"),
    "id09992/twoseconds0/00001": ("too_short", "too short"),  # 2 s < the 2.56 s window
    "id09993/garbage0000/00001": ("unreadable", "unreadable video"),
    "id09994/shortaudio0/00001": ("av_mismatch", "differ by more than"),  # 1 s wav beside a 3.2 s mp4
    "id09996/longaudio00/00001": ("av_mismatch", "differ by more than"),  # 6.2 s wav beside a 3.2 s mp4
}


@pytest.fixture(autouse=True)
def one_thread():
    """Decode in-process with one thread, as a DataLoader worker does (and fast on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The synthetic clips plus hand-made odd ones: BAD and WAV_BESIDE (neither in labels.csv)."""
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    from hicmae_dist.data.synth import write_corpus

    root = tmp_path_factory.mktemp("data") / "corpus"
    write_corpus(root, NUM_SYNTH, num_classes=3, seed=1, workers=2, progress=False)
    good = str(sorted(root.glob("dev/mp4/*/*/*.mp4"))[0])
    path = {key: root / "dev" / "mp4" / f"{key}.mp4" for key in [*BAD, WAV_BESIDE]}
    for p in path.values():
        p.parent.mkdir(parents=True)
    path["id09990/truncated00/00001"].write_bytes(Path(good).read_bytes()[:20_000])
    ffmpeg("-i", good, "-an", "-c", "copy", str(path["id09991/noaudio0000/00001"]))
    ffmpeg("-i", good, "-t", "2", "-c", "copy", str(path["id09992/twoseconds0/00001"]))
    path["id09993/garbage0000/00001"].write_bytes(random.Random(0).randbytes(5000))
    for key, wav_args in (
        ("id09994/shortaudio0/00001", ["-t", "1"]),
        ("id09996/longaudio00/00001", ["-af", "apad=pad_dur=3"]),
        (WAV_BESIDE, ["-ar", "44100", "-ac", "2"]),
    ):
        ffmpeg("-i", good, "-an", "-c", "copy", str(path[key]))
        ffmpeg("-i", good, "-vn", *wav_args, str(path[key].with_suffix(".wav")))
    return root


@pytest.fixture(scope="session")
def labels(corpus) -> dict[str, int]:
    with open(corpus / "labels.csv", newline="") as f:
        return {row["key"]: int(row["label"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> Path:
    """HiCMAE's stored form, one clip (~250 kB) per shard."""
    from hicmae_dist.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_shards(corpus, out, shard_size="200kB", workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def cavmae_shards(corpus, tmp_path_factory) -> Path:
    """CAV-MAE's stored form: the 10 frames at 224 px, one clip per shard."""
    from hicmae_dist.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("data") / "cavmae_shards"
    prepare_shards(corpus, out, shard_size="150kB", workers=2, full_frame=True, frames="ten", progress=False)
    return out


@pytest.fixture(scope="session")
def fbank_shards(corpus, tmp_path_factory) -> Path:
    """`shards` with the fbank audio form: the same clips in the same shards (one per shard)."""
    from hicmae_dist.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("data") / "fbank_shards"
    prepare_shards(corpus, out, shard_size="200kB", workers=2, audio_form="fbank", progress=False)
    return out
