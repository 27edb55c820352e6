"""Test helpers shared across the suite."""

from __future__ import annotations

import os

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
