"""Checkpoints a week-long job can trust: verified before a resume (a bad one is moved aside and
the one before it used), the config and data identity checked before any weight is loaded, and
a full disk reported in one line with the last good checkpoint intact."""

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hicmae_dist.config import load_config
from hicmae_dist.train import checkpoint
from hicmae_dist.train import pretrain as pretrain_mod
from hicmae_dist.train import runtime as runtime_mod
from tests.support import pretrain_cmd, require

TINY = [
    "model.width=32",
    "model.decoder_width=32",
    "data.batch_size=2",
    "data.num_workers=0",
    "train.warmup_steps=1",
    "train.log_every=1",
    "tracking.enabled=false",
]
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _pretrain(shards, run_dir, *overrides, **kw):
    cfg = load_config("tiny-cpu", TINY + [f"data.shards={shards}", *overrides])
    return pretrain_mod.pretrain(cfg, run_dir, progress=False, **kw)


def _cut_in_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_every_rank_file_is_recorded_and_a_torn_file_is_caught(engine, tmp_path):
    ckpt = checkpoint.save_checkpoint(engine, tmp_path, 1, {"config_hash": "h"}, keep=2)
    manifest = json.loads((ckpt / "files_rank00000.json").read_text())["files"]
    written = {p.name for p in ckpt.iterdir()} - {"state.json", "files_rank00000.json"}
    assert {OPTIM, "mp_rank_00_model_states.pt", "rng_rank00000.pt"} <= set(manifest) <= written
    for name, rec in manifest.items():
        assert rec == checkpoint.file_record(ckpt / name)
    assert checkpoint.verify_checkpoint(ckpt) is None

    model = ckpt / "mp_rank_00_model_states.pt"
    good = model.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    model.write_bytes(bytes(data))
    reason, detail = checkpoint.verify_checkpoint(ckpt)
    assert reason == "checksum" and model.name in detail
    model.write_bytes(good)
    _cut_in_half(ckpt / OPTIM)
    reason, detail = checkpoint.verify_checkpoint(ckpt)
    assert reason == "size" and OPTIM in detail
    (ckpt / "rng_rank00000.pt").unlink()
    assert checkpoint.verify_checkpoint(ckpt)[0] in ("missing", "size")


def test_a_checkpoint_without_manifests_is_checked_as_far_as_it_can_be(engine, tmp_path, caplog):
    """Written before this change: no files_rank*.json, no file_manifests in state.json. It
    resumes, with a warning; a truncated .pt is still caught (not a complete zip)."""
    for step in (1, 2):
        ckpt = checkpoint.save_checkpoint(engine, tmp_path, step, {"config_hash": "h"}, keep=2)
        (ckpt / "files_rank00000.json").unlink()
        state = json.loads((ckpt / "state.json").read_text())
        del state[checkpoint.MANIFEST_KEY]
        (ckpt / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resume_checkpoint(tmp_path).name == "step00000002"
    assert "without file manifests" in caplog.text

    _cut_in_half(tmp_path / "checkpoints" / "step00000002" / OPTIM)
    assert checkpoint.resume_checkpoint(tmp_path).name == "step00000001"
    assert (tmp_path / "checkpoints" / "bad" / "step00000002-unreadable" / OPTIM).exists()


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(engine, tmp_path):
    ckpt = checkpoint.save_checkpoint(engine, tmp_path, 1, {"config_hash": "h"}, keep=2)
    _cut_in_half(ckpt / OPTIM)
    with pytest.raises(checkpoint.ResumeError, match="no checkpoint under .* verifies .*step00000001-size"):
        checkpoint.resume_checkpoint(tmp_path)


def test_a_universal_conversion_is_recorded_verified_before_use_and_redone_when_bad(engine, tmp_path, caplog, capsys):
    from hicmae_dist.cli import main as cli_main

    ckpt = checkpoint.save_checkpoint(engine, tmp_path, 1, {"config_hash": "h", "world_size": 2}, keep=2)
    out = checkpoint.to_universal(ckpt)
    assert out == checkpoint.universal_path(ckpt) and checkpoint.verify_checkpoint(out) is None
    recorded = json.loads((out / "files_rank00000.json").read_text())["files"]
    tensors = sorted(p for p in out.rglob("*.pt") if "zero" in p.parts)
    assert tensors and {str(p.relative_to(out)) for p in tensors} <= set(recorded)
    assert json.loads((out / "state.json").read_text())["world_size"] == 2  # the source's state, kept

    _cut_in_half(tensors[0])
    with caplog.at_level(logging.WARNING):
        assert checkpoint.to_universal(ckpt) == out
    bad = tmp_path / "checkpoints" / "bad" / "universal-step00000001-size"
    assert (bad / tensors[0].relative_to(out)).exists() and "converting again" in caplog.text
    assert checkpoint.verify_checkpoint(out) is None  # converted again from the verified source

    # the CLI converts only a checkpoint that verifies
    _cut_in_half(ckpt / OPTIM)
    shutil.rmtree(out)
    assert cli_main(["ckpt", "universal", str(tmp_path)]) == 1
    assert f"{ckpt} does not verify ({ckpt / OPTIM} has" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(shards, tmp_path, caplog):
    _pretrain(shards, tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step00000004"
    _cut_in_half(root / "step00000004" / OPTIM)

    with caplog.at_level(logging.WARNING):
        summary = _pretrain(shards, tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    assert summary["start_step"] == 2 and summary["steps"] == 6
    bad = root / "bad" / "step00000004-size"
    assert (bad / OPTIM).exists() and (bad / "mp_rank_00_model_states.pt").exists()  # kept, not deleted
    assert f"{OPTIM} has" in caplog.text and str(bad) in caplog.text
    assert (root / "latest").read_text() == "step00000006"
    assert checkpoint.verify_checkpoint(root / "step00000006") is None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again, logged once


def test_leftover_temporaries_are_removed_on_the_next_start(engine, tmp_path, caplog):
    checkpoint.save_checkpoint(engine, tmp_path, 1, {"config_hash": "h"}, keep=2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step00000002").mkdir()
    (root / ".tmp-step00000002" / OPTIM).write_bytes(b"x" * 1000)
    (root / ".tmp-latest").write_text("step00000002")
    (root / "universal" / ".tmp-step00000001").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resume_checkpoint(tmp_path).name == "step00000001"
    assert not list(root.glob(".tmp-*")) and not list((root / "universal").glob(".tmp-*"))
    assert ".tmp-step00000002, left by an interrupted save" in caplog.text


def _refuse_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a weight was loaded before the refusal")

    monkeypatch.setattr(runtime_mod, "load_checkpoint", fail)
    monkeypatch.setattr(pretrain_mod, "build_engine", fail)
    monkeypatch.setattr(pretrain_mod, "to_universal", fail)


@pytest.mark.slow
def test_changed_config_or_data_is_refused_before_any_weight_is_loaded(shards, cli_env, tmp_path, monkeypatch):
    _pretrain(shards, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2")
    other = tmp_path / "other-shards"  # another shard set: four of the six shards
    other.mkdir()
    for p in sorted(shards.glob("shard-*"))[:8] + [shards / "manifest.json"]:
        shutil.copy(p, other / p.name)

    with monkeypatch.context() as m:
        _refuse_loads(m)
        with pytest.raises(checkpoint.ResumeError) as err:  # a shape change: today's size-mismatch traceback
            _pretrain(shards, tmp_path / "run", "train.steps=4", "model.width=128", "model.decoder_width=64")
        assert "config hash" in str(err.value) and "--allow-config-change" in str(err.value)
        assert "\n" not in str(err.value)
        with pytest.raises(checkpoint.ResumeError) as err:
            _pretrain(other, tmp_path / "run", "train.steps=4")
        msg = str(err.value)
        assert f"shard set {shards} (6 shards" in msg and f"reads {other} (4 shards" in msg
        assert "config hash" not in msg and "\n" not in msg

    # the CLI: the refusal, not a size-mismatch traceback from loading the weights
    r = subprocess.run(
        pretrain_cmd(shards, tmp_path / "run", *TINY, "train.steps=4", "model.width=128", "model.decoder_width=64"),
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=300,
    )
    assert r.returncode == 1 and "config hash" in r.stderr and "--allow-config-change" in r.stderr
    assert "size mismatch" not in r.stderr and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("hicmae-dist pretrain:")]
    assert "config hash" in line

    moved = tmp_path / "moved-shards"  # the same shards elsewhere: the same data set
    shutil.copytree(shards, moved)
    assert _pretrain(moved, tmp_path / "run", "train.steps=3")["start_step"] == 2
    summary = _pretrain(other, tmp_path / "run", "train.steps=4", allow_config_change=True)
    assert summary["start_step"] == 3 and summary["steps"] == 4
    state = json.loads((tmp_path / "run" / "checkpoints" / "step00000004" / "state.json").read_text())
    assert state["data_shards"] == str(other) and state["data_num_shards"] == 4  # the run now trains on it


def _rank(rank: int, port: int, shards: str, run_dir: str, steps: int, queue, no_space_on: int) -> None:
    if rank == no_space_on:  # this rank's disk is full (only its view: the others see the free space)
        real_disk_usage = shutil.disk_usage
        shutil.disk_usage = lambda path: real_disk_usage(path)._replace(free=0)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        summary = _pretrain(shards, run_dir, f"train.steps={steps}", "train.checkpoint_every=2")
    except checkpoint.DiskFullError as err:
        queue.put((rank, "disk full", str(err)))
        return
    queue.put((rank, summary["start_step"], summary["steps"]))


def _two_ranks(shards, run_dir, steps, no_space_on=-1):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, port, str(shards), str(run_dir), steps, queue, no_space_on))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=300) for _ in procs)  # a hang (ranks disagreeing) fails here
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results


@pytest.mark.slow
def test_two_ranks_agree_on_a_checkpoint_only_one_of_them_finds_bad(shards, tmp_path):
    """Rank 1's optimizer shard of the newest checkpoint is cut: rank 1 checks its own manifest,
    rank 0 does not; the agreed verdict moves it aside (rank 0) and both resume from the one before."""
    _two_ranks(shards, tmp_path, 4)
    root = tmp_path / "checkpoints"
    assert {p.name for p in root.glob("step*")} == {"step00000002", "step00000004"}
    assert (root / "step00000004" / "files_rank00001.json").exists()
    _cut_in_half(root / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert checkpoint.verify_checkpoint(root / "step00000004", rank=0, world_size=2) is None
    assert _two_ranks(shards, tmp_path, 6) == [(0, 2, 6), (1, 2, 6)]
    assert (root / "bad" / "step00000004-size" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert (root / "latest").read_text() == "step00000006"

    # rank 1 alone finds its disk full before the step-8 save: both ranks end with the error, none
    # waits at a barrier, nothing is written
    (rank0, kind0, msg0), (rank1, kind1, msg1) = _two_ranks(shards, tmp_path, 8, no_space_on=1)
    assert (rank0, kind0, rank1, kind1) == (0, "disk full", 1, "disk full")
    last_good = f"; the last good checkpoint is {root / 'step00000006'}"
    assert msg0.startswith("No space left on device for the checkpoint of step 8: another rank found too little")
    assert msg1.startswith(f"No space left on device for the checkpoint of step 8: 0.0 MiB free under {root}")
    assert msg0.endswith(last_good) and msg1.endswith(last_good) and "(step00000006)" in msg1
    assert (root / "latest").read_text() == "step00000006" and not list(root.glob(".tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted on tmp_path/disk (root only); resize(bytes) remounts it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True
        ).returncode
        == 0
    )
    require("a tmpfs mount", mounted, "the full-disk test mounts a small tmpfs: run it as root")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_good_checkpoint(
    shards, small_disk, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    disk, resize = small_disk
    run_dir = disk / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # off the full disk: the run's status must get there
    args = (
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        "tracking.enabled=true",
        "tracking.system_metrics_s=0",
        f"tracking.uri={store}",
    )
    run_id = _pretrain(shards, run_dir, "train.steps=2", *args)["mlflow_run_id"]
    root = run_dir / "checkpoints"
    size = sum(p.stat().st_size for p in (root / "step00000002").iterdir())
    used = shutil.disk_usage(disk).used
    resize(used + size // 2)  # room for half a checkpoint more: the step-4 save fills the disk

    # the step-4 save finds less free space than step 2's checkpoint took: refused before writing
    with pytest.raises(checkpoint.DiskFullError) as err:
        _pretrain(shards, run_dir, "train.steps=6", *args)
    msg = str(err.value)
    assert "\n" not in msg and not list(root.glob(".tmp-*"))
    assert msg.startswith("No space left on device for the checkpoint of step 4: ")
    assert f" MiB free under {root}, a checkpoint takes {size / 2**20:,.1f} MiB (step00000002); " in msg
    assert msg.endswith(f"; the last good checkpoint is {root / 'step00000002'}")

    # the disk fills between that check and the write (another job): the write fails, is removed
    with monkeypatch.context() as m, pytest.raises(checkpoint.DiskFullError) as err:
        m.setattr(checkpoint, "_space_short", lambda run: None)
        _pretrain(shards, run_dir, "train.steps=6", *args)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("No space left on device while writing ") and ".tmp-step00000004" in msg
    assert msg.endswith(f"; the last good checkpoint is {root / 'step00000002'}")
    assert not list(root.glob(".tmp-*"))  # the partial save is gone at once
    assert (root / "latest").read_text() == "step00000002"
    assert checkpoint.verify_checkpoint(root / "step00000002") is None  # intact
    assert MlflowClient(tracking_uri=store).get_run(run_id).info.status == "FAILED"

    (root / ".tmp-step00000004").mkdir()  # as a crash (not a clean failure) would leave it
    (root / ".tmp-step00000004" / OPTIM).write_bytes(b"x" * 1000)
    resize(used + 4 * size)  # space freed: the next start resumes, cleans up and finishes
    summary = _pretrain(shards, run_dir, "train.steps=6", *args)
    assert summary["start_step"] == 2 and summary["steps"] == 6 and summary["mlflow_run_id"] == run_id
    assert not list(root.glob(".tmp-*"))
    assert checkpoint.verify_checkpoint(root / "step00000006") is None


def test_a_rank_saves_and_restores_its_own_gpus_random_stream(monkeypatch, tmp_path):
    """A task that sees all 8 of its node's GPUs (rank 3 on cuda:3) saves cuda:3's stream only, and
    its requeued attempt restores that stream on whatever device it now has, without touching the
    other devices (CUDA emulated: the checkpoint code sees these functions as torch.cuda's)."""
    streams = {i: torch.tensor([i], dtype=torch.uint8) for i in range(8)}
    restored = []

    def get_rng_state(device="cuda"):
        assert device == "cuda", "only the current device"
        return streams[current[0]].clone()

    def get_rng_state_all():
        raise AssertionError("every visible device's state was read")

    current = [3]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((current[0], s)))
    torch.save(checkpoint._rng_state(), tmp_path / "rng.pt")
    current[0] = 0  # requeued with one visible GPU per task
    checkpoint._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [(device, s.tolist()) for device, s in restored] == [(0, [3])]

    restored.clear()  # written before: a list of every visible device's state
    old = {"torch": torch.get_rng_state(), "python": random.getstate()}
    current[0] = 3
    checkpoint._set_rng_state({**old, "cuda": [streams[i] for i in range(8)]})
    current[0] = 5
    checkpoint._set_rng_state({**old, "cuda": [streams[0]]})  # that device's state was not saved
    assert [(device, s.tolist()) for device, s in restored] == [(3, [3])]
