"""Test helpers shared across the suite."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import pytest

# A narrow CAV-MAE that trains in seconds on a CPU: one frame of 224 px, 1024 fbank frames.
CAVMAE_TINY_MODEL = [
    "model.arch=cavmae",
    "model.width=64",
    "model.heads=2",
    "model.modality_depth=1",
    "model.shared_depth=1",
    "model.decoder_width=32",
    "model.decoder_heads=2",
    "model.decoder_depth=1",
    "model.num_frames=1",
    "model.image_size=224",
    "model.audio_frames=1024",
]


# Figures for the end of a run: {section: {name: value}}, printed by tests/conftest.py (under
# xdist the workers send theirs to the controller, which prints them).
SUMMARY: dict[str, dict[str, float]] = {}


def pretrain_cmd(shards: Path, run_dir: Path, *overrides: str, progress: bool = False) -> list[str]:
    """`hicmae-dist pretrain` of the tiny preset on `shards`, as a subprocess command line."""
    return [
        sys.executable,
        "-m",
        "hicmae_dist.cli",
        "pretrain",
        "--preset",
        "tiny-cpu",
        "--data",
        str(shards),
        "--run-dir",
        str(run_dir),
        *([] if progress else ["--no-progress"]),
        *overrides,
    ]


@contextlib.contextmanager
def shared_across_workers(tmp_path_factory, name: str):
    """A directory of this test session shared by its xdist workers, held under an exclusive
    lock: the first worker fills it (a costly session fixture), the others wait, then read it.
    Without xdist, a directory of this session's own."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common parent
    path = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path.mkdir(exist_ok=True)
        yield path


def strict() -> bool:
    """In CI (CI=true) or with HICMAE_REQUIRE_ALL=1 a missing component fails instead of skipping."""
    return os.environ.get("HICMAE_REQUIRE_ALL") == "1" or os.environ.get("CI", "").lower() == "true"


def require(component: str, available: bool, hint: str = "") -> None:
    """Skip the test when `component` is missing on a user's machine; fail in CI."""
    if available:
        return
    message = f"{component} is not available" + (f" ({hint})" if hint else "")
    if strict():
        pytest.fail(f"{message}; CI requires it", pytrace=False)
    pytest.skip(message)


def run_ranks(target, world_size: int, args: tuple, expect: int, timeout_s: float = 600) -> list:
    """target(rank, world_size, port, *args, queue) in `world_size` spawned processes, one
    process group on a free loopback port; returns the `expect` items they put on the queue.
    A hang fails here (the queue read times out) and the ranks are killed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world_size, port, *args, queue)) for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        items = [queue.get(timeout=timeout_s) for _ in range(expect)]
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return items
