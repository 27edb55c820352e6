"""Inference tests' data: a small synthetic downstream set, its clips as lossless videos (the same
pixels and samples as the frame folders and wavs), and a tiny fine-tuned run made once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import require


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], input=stdin, check=True)


def lossless_video(frame_dir: Path, wav: Path, out: Path) -> Path:
    """frame_dir's JPEGs (decoded as the fine-tuning dataset decodes them) and the wav, muxed as
    FFV1 RGB + PCM in Matroska at 25 fps: decoding it gives back the same pixels and samples."""
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(frame_dir.glob("*.jpg"))])
    h, w = frames.shape[1:3]
    ffmpeg(
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        "25",
        "-i",
        "-",
        "-i",
        str(wav),
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "bgr0",
        "-c:a",
        "pcm_s16le",
        str(out),
        stdin=frames.tobytes(),
    )
    return out


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


@pytest.fixture(scope="session")
def downstream(tmp_path_factory) -> Path:
    """12 clips of 4 hidden classes, 6 subjects, 3 folds (4 test clips each), 3.2 s each."""
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    from hicmae_dist.data.synth import write_downstream

    out = tmp_path_factory.mktemp("infer") / "set"
    write_downstream(out, 12, num_classes=4, num_subjects=6, folds=3, seed=1, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def finetuned(downstream, tmp_path_factory) -> Path:
    """Fold 1 fine-tuned from scratch through the CLI, 1 epoch, the tiny preset, 2 test segments
    x 1 crop (the test pass `predict --segments 2` reproduces). Returns the run dir."""
    run_dir = tmp_path_factory.mktemp("infer") / "ft"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/hicmae-dist/torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "hicmae_dist.cli",
        "finetune",
        "--preset",
        "finetune-tiny-cpu",
        "--splits",
        str(downstream / "splits"),
        "--folds",
        "1",
        "--from-scratch",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "finetune.num_outputs=4",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "data.batch_size=2",
        "data.num_workers=0",
        "finetune.test_num_segment=2",
        "finetune.test_num_crop=1",
        "tracking.enabled=false",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir
