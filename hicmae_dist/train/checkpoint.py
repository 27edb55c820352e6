"""Atomic, verified checkpoints: DeepSpeed's files plus our state.json, made current by a rename.

The format of one checkpoint directory (where they live: train/rundir.py's RunDir):
    DeepSpeed's files, rng_rank*.pt, files_rank*.json, state.json
A save writes into `.tmp-<tag>/`, renames it to `<tag>/` when every rank has written, then
replaces `latest` atomically; a crash at any point leaves the previous checkpoint current, and
the next start removes the `.tmp-*` it left.

Each rank lists the files it wrote, with their sizes and CRC32s, in its own files_rankNNNNN.json
(computed right after writing, read back from the page cache: 1.4-3.4 GB/s on a loaded 2-core
machine, 0.7-0.9 s for a 1.2 GB optimizer shard whose torch.save took 10.8 s there). A resume
(resume_checkpoint) verifies the newest checkpoint against these before any load; a bad one is
named, moved aside, and the one before it is tried. Checkpoints from before the manifests are
checked as far as they can be (each .pt a complete zip archive).

Every load, DeepSpeed's included, runs with weights_only=True (weights_only_loads).
A checkpoint written at another world size is converted to DeepSpeed's universal format first.
A save that fails for lack of space raises DiskFullError (one line, naming the file and the
last good checkpoint) after removing its partial `.tmp-*`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import random
import shutil
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hicmae_dist import comm
from hicmae_dist.train.rundir import STATE_FILE, TMP_PREFIX, RunDir

log = logging.getLogger(__name__)

MANIFEST_KEY = "file_manifests"  # in state.json: how many files_rank*.json the checkpoint has
CHUNK = 8 << 20
# Why a verification fails, in the order the ranks report it (agreed as flags through comm.agree).
BAD_REASONS = ("missing", "size", "checksum", "unreadable")
# errnos that mean "the disk (or this process's share of it) is full"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ResumeError(RuntimeError):
    """A checkpoint that cannot continue this run (other config or data, none that verifies)."""


class DiskFullError(OSError):
    """A save that failed for lack of space; str() is the whole one-line message."""

    def __init__(self, code: int, message: str, filename: str):
        super().__init__(code, os.strerror(code))
        self.filename, self.message = filename, message

    def __str__(self) -> str:
        return self.message


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor objects DeepSpeed pickles into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's own included, runs with weights_only=True
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides their weights_only=False): no arbitrary unpickling."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        # The rank's own device, the one its dropout draws from; not every visible device's
        # (get_rng_state_all): a task that sees all the node's GPUs would save 8 states, and
        # its requeued attempt, seeing only its own GPU, would restore device 0's, not its own.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written before the above: every visible device's state
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _manifest_file(rank: int) -> str:
    return f"files_rank{rank:05d}.json"


def file_record(path: Path) -> dict[str, int]:
    """Size and CRC32 of a file, read in 8 MiB chunks (zlib.crc32: about 4x blake2b's speed; it
    guards against truncation and torn or flipped bytes, not tampering)."""
    crc, buf = 0, bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


@contextlib.contextmanager
def _recording_writes(engine, written: list[Path]):
    """Appends each file DeepSpeed's checkpoint engine writes on this rank to `written` (the
    file in flight last: a failed write names it)."""
    ckpt_engine = engine.checkpoint_engine
    real_save = ckpt_engine.save

    def save(state_dict, path, *args, **kwargs):
        written.append(Path(path))
        return real_save(state_dict, path, *args, **kwargs)

    ckpt_engine.save = save
    try:
        yield
    finally:
        del ckpt_engine.save  # back to the class's method


def disk_full_errno(err: BaseException, probe_dir: Path | None = None) -> int | None:
    """ENOSPC / EDQUOT / EFBIG when `err` comes from a full disk, else None. torch's and
    DeepSpeed's writers lose the errno ("basic_ios::clear: iostream error", "unexpected pos ..."):
    then a 1 MiB probe write into probe_dir tells (the failed write's partial file still fills
    the disk at that point)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen.errno
        for code in DISK_FULL:
            if os.strerror(code) in str(seen):
                return code
        seen = seen.__cause__ or seen.__context__
    if probe_dir is None or not isinstance(err, (OSError, RuntimeError)):
        return None
    probe = probe_dir / f"{TMP_PREFIX}probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_err:
        return probe_err.errno if probe_err.errno in DISK_FULL else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _last_good(run_dir: Path) -> str:
    try:
        last = RunDir(run_dir).latest_checkpoint()
    except OSError as err:
        return f"unknown ({err})"
    return str(last) if last is not None else "none (no checkpoint was written yet)"


def disk_full_error(code: int, what: Path | str, run_dir: Path) -> DiskFullError:
    return DiskFullError(
        code, f"{os.strerror(code)} while writing {what}; the last good checkpoint is {_last_good(run_dir)}", str(what)
    )


def _space_short(run: RunDir) -> str | None:
    """Collective: why the next save would not fit on this rank, agreed by all. Rank 0 measures
    the newest complete checkpoint (the next one is as large, and the old ones go only once it is
    complete; one listing on the shared file system, not one per rank); every rank compares it
    with its own free space under the checkpoints; one all-reduce. None when it fits everywhere,
    or when there is no checkpoint to measure yet."""
    done = run.complete_checkpoints() if comm.is_rank0() else []
    need = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else 0
    free = shutil.disk_usage(run.checkpoints).free if run.checkpoints.is_dir() else math.inf
    need, minus_least_free = comm.max_values([need, -free])
    if -minus_least_free >= need:
        return None
    if free >= need:
        return "another rank found too little space, see its log"
    free_mib, need_mib, last = free / 2**20, need / 2**20, run.complete_checkpoints()[-1].name
    return f"{free_mib:,.1f} MiB free under {run.checkpoints}, a checkpoint takes {need_mib:,.1f} MiB ({last})"


def save_checkpoint(
    engine, run_dir: Path, step: int, state: dict[str, Any], keep: int, keep_also: Callable[[Path], bool] | None = None
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. The newest `keep`
    checkpoints stay, and the older ones keep_also(path) is True for (fine-tuning's weight average).
    Raises DiskFullError on every rank, before anything is written, when a rank finds less free
    space than the last checkpoint took (agreed: a rank that failed alone inside DeepSpeed's save
    would leave the others at its barrier until the launcher ends them). A write that still fails
    for lack of space (the disk filled meanwhile) raises it on that rank, the partial .tmp-<tag>
    removed; the launcher (torchrun, srun --kill-on-bad-exit) then ends the other ranks."""
    run = RunDir(run_dir)
    root, tag = run.checkpoints, RunDir.tag(step)
    tmp_tag, final = f"{TMP_PREFIX}{tag}", run.checkpoint(tag)
    tmp = root / tmp_tag
    rank, world_size = comm.world()
    short = _space_short(run)
    if short is not None:  # on every rank, before anything is written
        message = f"{os.strerror(errno.ENOSPC)} for the checkpoint of step {step}: {short}; the last good checkpoint is"
        raise DiskFullError(errno.ENOSPC, f"{message} {_last_good(run_dir)}", str(root))
    written: list[Path] = []
    try:
        if comm.is_rank0() and tmp.exists():  # left by a crash during an earlier save
            shutil.rmtree(tmp)
        comm.barrier()
        with _recording_writes(engine, written):
            engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        written.append(tmp / _rng_file(rank))
        torch.save(_rng_state(), written[-1])  # dropout/drop-path streams, per rank
        manifest = {"rank": rank, "files": {p.name: file_record(p) for p in written}}
        written.append(tmp / _manifest_file(rank))
        _atomic_write(written[-1], json.dumps(manifest, indent=1))
        comm.barrier()
        if comm.is_rank0():
            written.append(tmp / STATE_FILE)
            _atomic_write(written[-1], json.dumps({**state, "step": step, MANIFEST_KEY: world_size}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            written.append(run.latest_pointer)
            _atomic_write(written[-1], tag)
    except (OSError, RuntimeError) as err:
        code = disk_full_errno(err, root)
        if code is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint: space back at once
        raise disk_full_error(code, written[-1] if written else tmp, run_dir) from err
    if comm.is_rank0():
        for old in run.complete_checkpoints()[:-keep]:
            if keep_also is None or not keep_also(old):
                shutil.rmtree(old)
    comm.barrier()
    return final


def saved_world_size(path: Path) -> int:
    return RunDir.read_state(path).get("world_size", 1)


# --- verification before a resume ----------------------------------------------------------------


def verify_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> tuple[str, str] | None:
    """This rank's share of the checks of one checkpoint: (reason in BAD_REASONS, detail naming
    the file) for the first problem found, None when its share is sound. The work is split by
    index over the ranks (manifest r is checked by rank r % world_size), so a checkpoint written
    at another world size is still checked whole."""
    try:
        state = RunDir.read_state(path)
    except FileNotFoundError:
        return "missing", f"{path / STATE_FILE} is missing"
    except (OSError, ValueError) as err:
        return "unreadable", f"{path / STATE_FILE}: {err}"
    if MANIFEST_KEY not in state:  # written before the manifests: each .pt must be a whole zip
        for i, f in enumerate(sorted(path.glob("*.pt"))):
            if i % world_size == rank:
                try:
                    with zipfile.ZipFile(f) as z:
                        broken = z.testzip()  # reads every entry, checks its CRC
                except (OSError, zipfile.BadZipFile, EOFError) as err:
                    return "unreadable", f"{f}: {err}"
                if broken is not None:
                    return "checksum", f"{f}: entry {broken} fails its CRC"
        return None
    for r in range(rank, int(state[MANIFEST_KEY]), world_size):
        manifest = path / _manifest_file(r)
        try:
            files = json.loads(manifest.read_text())["files"]
        except FileNotFoundError:
            return "missing", f"{manifest} is missing"
        except (OSError, ValueError, KeyError) as err:
            return "unreadable", f"{manifest}: {err}"
        for name, want in files.items():
            f = path / name
            if not f.exists():
                return "missing", f"{f} is missing"
            size = f.stat().st_size
            if size != want["bytes"]:
                return "size", f"{f} has {size} bytes, {want['bytes']} were written"
            if file_record(f)["crc32"] != want["crc32"]:
                return "checksum", f"{f} does not match the CRC32 written at save time"
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the .tmp-* a crashed or failed save left (rank 0, before any save)."""
    run = RunDir(run_dir)
    for parent in (run.checkpoints, run.universal_checkpoints):
        for tmp in sorted(parent.glob(f"{TMP_PREFIX}*")) if parent.is_dir() else []:
            log.warning("removing %s, left by an interrupted save", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _move_aside(run: RunDir, path: Path, reason: str, prefix: str = "") -> Path:
    bad = run.bad_checkpoints
    bad.mkdir(exist_ok=True)
    dest, n = bad / f"{prefix}{path.name}-{reason}", 1
    while dest.exists():
        n += 1
        dest = bad / f"{prefix}{path.name}-{reason}-{n}"
    os.replace(path, dest)
    return dest


def resume_checkpoint(run_dir: Path) -> Path | None:
    """Collective, at the start of a run: remove stale temporaries (rank 0), then return the
    newest checkpoint that verifies, starting from the one `latest` names. Every rank checks
    its share and all agree on each verdict; a bad checkpoint is named in a warning and moved
    aside by rank 0 to checkpoints/bad/<tag>-<reason>, and `latest` is pointed at the one used.
    Raises ResumeError when checkpoints exist but none verifies. None: a fresh run."""
    rank, world_size = comm.world()
    if rank == 0:
        remove_stale_temporaries(run_dir)
    comm.barrier()
    run = RunDir(run_dir)
    named = run.latest_tag()
    if named is None:
        return None
    candidates = [run.checkpoint(named)] + run.older_checkpoints(named)
    moved = []
    for ckpt in candidates:
        if not ckpt.is_dir():
            log.warning("%s names %s, which does not exist; trying the checkpoint before it", run.latest_pointer, ckpt)
            continue
        mine = verify_checkpoint(ckpt, rank, world_size)
        if mine is not None:
            log.warning("checkpoint %s is bad: %s", ckpt, mine[1])
        flags = comm.agree([mine is not None and mine[0] == r for r in BAD_REASONS])
        if not any(flags):
            if MANIFEST_KEY not in RunDir.read_state(ckpt):
                log.warning(
                    "checkpoint %s was written without file manifests (before checksums were "
                    "recorded): checked that its state.json reads and each .pt is a complete archive",
                    ckpt,
                )
            if ckpt.name != named and rank == 0:
                _atomic_write(run.latest_pointer, ckpt.name)
                log.warning("resuming from %s instead of %s", ckpt, named)
            comm.barrier()
            return ckpt
        reason = BAD_REASONS[flags.index(True)]
        comm.barrier()  # every rank is done reading it
        if rank == 0:
            moved.append(_move_aside(run, ckpt, reason))
            log.warning(
                "checkpoint %s failed verification (%s%s); moved aside to %s",
                ckpt,
                reason,
                f": {mine[1]}" if mine else " on another rank, see its log",
                moved[-1],
            )
        comm.barrier()
    raise ResumeError(
        f"no checkpoint under {run.checkpoints} verifies (moved aside to {run.bad_checkpoints}: "
        f"{', '.join(p.name for p in moved) or 'none'}); move one back by hand, or start "
        f"over with a new --run-dir"
    )


def universal_path(path: Path) -> Path:
    """Where to_universal puts the conversion of the checkpoint `path`."""
    return RunDir(path.parent.parent).universal_checkpoints / path.name


def to_universal(path: Path) -> Path:
    """Convert a (verified) checkpoint to DeepSpeed's universal format (loadable at any world
    size) under checkpoints/universal/<tag>; one process does it (rank 0, or the CLI), once,
    atomically (temporary name, then rename). The conversion records its files like a save
    (one files_rank00000.json), and one already there is verified before it is used: a bad or
    unrecorded one is moved aside to checkpoints/bad/universal-<tag>-<reason> and converted again."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_path(path)
    if out.exists():
        problem = verify_checkpoint(out)
        if problem is None:
            return out
        moved = _move_aside(RunDir(path.parent.parent), out, problem[0], prefix="universal-")
        log.warning("universal checkpoint %s is bad (%s); moved aside to %s, converting again", out, problem[1], moved)
    tmp = out.with_name(f"{TMP_PREFIX}{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with weights_only_loads():
        ds_to_universal.main(args)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    manifest = {"rank": 0, "files": {str(f.relative_to(tmp)): file_record(f) for f in files}}
    _atomic_write(tmp / _manifest_file(0), json.dumps(manifest, indent=1))
    _atomic_write(tmp / STATE_FILE, json.dumps({**RunDir.read_state(path), MANIFEST_KEY: 1}, indent=1))
    os.replace(tmp, out)
    return out


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Collective. Restores weights and optimizer state into `engine`; returns our state.
    A universal checkpoint (to_universal) needs an engine built with load_universal=True."""
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    state = RunDir.read_state(path)
    rank, world_size = comm.world()
    rng = path / _rng_file(rank)
    if rng.exists() and state.get("world_size") == world_size:
        _set_rng_state(torch.load(rng, weights_only=True))  # the same ranks: continue their streams
    return state
