"""The command line's contract: a user error is one line `hicmae-dist <verb>: ...` on stderr with
exit status 2 (usage, config) or 1 (a failure), no traceback unless --debug; a bug keeps its
traceback; key=value overrides are accepted anywhere on the line."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hicmae_dist import cli

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


def _one_line(err: str, verb: str, *parts: str) -> str:
    """stderr is exactly one line, `hicmae-dist <verb>: ...`, holding every part."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hicmae-dist {verb}: "), err
    for part in parts:
        assert part in lines[0], (part, err)
    return lines[0]


def _main(capsys, *argv: str) -> tuple[int, str]:
    """cli.main in-process (argparse's exits included): (exit status, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


# --- bad values on the real command line (a subprocess each: the exit status and stderr as a user sees them)


@pytest.mark.parametrize(
    "args, key",
    [
        (["train.base_lr=-1"], "train.base_lr"),
        (["train.base_lr=.nan"], "train.base_lr"),
        (["model.temperature=0"], "model.temperature"),
        (["--world-size", "0"], "--world-size"),
        (["--world-size", "-3"], "--world-size"),
    ],
    ids=["negative-lr", "nan-lr", "zero-temperature", "world-size-0", "world-size-negative"],
)
def test_pretrain_dry_run_refuses_bad_values_in_one_line(args, key):
    r = subprocess.run(
        CLI + ["pretrain", "--preset", "tiny-cpu", "--dry-run", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout[-500:], r.stderr)
    _one_line(r.stderr, "pretrain", key)


def test_overrides_anywhere_on_the_line():
    r = subprocess.run(
        CLI
        + [
            "pretrain",
            "--preset",
            "tiny-cpu",
            "train.steps=50",
            "--dry-run",
            "model.width=128",
            "--world-size",
            "2",
            "train.warmup_steps=5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "width: 128" in r.stdout and "steps: 50" in r.stdout and "warmup_steps: 5" in r.stdout
    assert "world size 2" in r.stdout


def test_unknown_arguments_and_overrides_where_none_are_taken(capsys):
    code, err = _main(capsys, "pretrain", "--preset", "tiny-cpu", "--dry-run", "--bogus")
    assert code == 2
    _one_line(err, "pretrain", "unrecognized arguments: --bogus")
    code, err = _main(capsys, "export", "run", "out.pth", "model.width=3")
    assert code == 2
    _one_line(err, "export", "unrecognized arguments: model.width=3")


def test_malformed_yaml_preset(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: 64\n  heads: [2\n")
    code, err = _main(capsys, "pretrain", "--preset", str(bad), "--dry-run")
    assert code == 2
    _one_line(err, "pretrain", str(bad), "not valid YAML (line ")


# --- failures before training: one line, status 1


def _pretrain(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--preset",
        "tiny-cpu",
        "--data",
        str(data),
        "--run-dir",
        str(tmp_path / "run"),
        "--no-progress",
        *extra,
    ]


def test_missing_empty_and_raw_corpus_data(tmp_path, capsys):
    code, err = _main(capsys, *_pretrain(tmp_path, tmp_path / "nope"))
    assert code == 1
    _one_line(err, "pretrain", str(tmp_path / "nope"), "does not exist")

    (tmp_path / "empty").mkdir()
    code, err = _main(capsys, *_pretrain(tmp_path, tmp_path / "empty"))
    assert code == 1
    _one_line(err, "pretrain", "no shard-*.tar files in", "hicmae-dist prepare")

    corpus = tmp_path / "corpus"
    clip = corpus / "dev" / "mp4" / "id00001" / "abc" / "00001.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"\0" * 100)
    code, err = _main(capsys, *_pretrain(tmp_path, corpus))
    assert code == 1
    _one_line(err, "pretrain", "holds media files", "run `hicmae-dist prepare --src")
    assert not (tmp_path / "run").exists()  # refused before any set-up


def test_no_data_and_no_run_dir_are_usage_errors(tmp_path, capsys):
    code, err = _main(capsys, "pretrain", "--preset", "tiny-cpu", "--run-dir", str(tmp_path / "run"))
    assert code == 2
    _one_line(err, "pretrain", "data.shards is empty: pass --data DIR")
    code, err = _main(capsys, "pretrain", "--preset", "tiny-cpu")
    assert code == 2
    _one_line(err, "pretrain", "--run-dir is required")


def test_garbage_only_shards_are_bad_data(tmp_path, capsys, monkeypatch):
    """The real loader set-up on a directory whose only shard is random bytes: BadDataError,
    reported in one line (pretrain's engine is not built: its loader is called directly)."""
    from hicmae_dist.data.loader import make_pretrain_loader
    from hicmae_dist.train import pretrain as pretrain_module
    from hicmae_dist.train import runtime as runtime_module

    data = tmp_path / "shards"
    data.mkdir()
    (data / "shard-000000.tar").write_bytes(random.Random(0).randbytes(50_000))

    def fake_pretrain(cfg, run_dir, **kw):
        make_pretrain_loader(cfg.data.shards, cfg.data, cfg.model)

    monkeypatch.setattr(pretrain_module, "pretrain", fake_pretrain)
    monkeypatch.setattr(runtime_module, "install_stop_signals", lambda: None)
    code, err = _main(capsys, *_pretrain(tmp_path, data))
    assert code == 1
    _one_line(err, "pretrain", "none of the 1 shards in", "holds a readable sample")


def test_resume_error_is_one_line(tmp_path):
    """--resume never on a run dir with a checkpoint: ResumeError from the trainer, status 1."""
    data = tmp_path / "shards"
    data.mkdir()
    (data / "shard-000000.tar").write_bytes(b"")  # never read: the refusal comes first
    ckpt = tmp_path / "run" / "checkpoints" / "step00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 10, "config_hash": "0123", "world_size": 1}')
    (ckpt.parent / "latest").write_text("step00000010")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    r = subprocess.run(
        CLI + _pretrain(tmp_path, data, "--resume", "never"), capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr  # the log lines of the start-up come before it
    _one_line(r.stderr.strip().splitlines()[-1], "pretrain", "already holds checkpoint step00000010")


def test_export_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, err = _main(capsys, "export", str(tmp_path / "run"), str(tmp_path / "out.pth"))
    assert code == 1
    _one_line(err, "export", str(tmp_path / "run"), "no checkpoint to export")


def test_convert_of_a_missing_or_junk_file(tmp_path, capsys):
    code, err = _main(capsys, "convert", "--from", "hicmae", str(tmp_path / "nope.pth"), str(tmp_path / "o.pth"))
    assert code == 1
    _one_line(err, "convert", str(tmp_path / "nope.pth"), "no such file")
    junk = tmp_path / "junk.pth"
    junk.write_text("these are not the weights you are looking for\n" * 20)
    code, err = _main(capsys, "convert", "--from", "hicmae", str(junk), str(tmp_path / "o.pth"))
    assert code == 1
    _one_line(err, "convert", str(junk), "not a PyTorch checkpoint (expected a file written by torch.save")
    assert not (tmp_path / "o.pth").exists()


def test_convert_junk_file_on_the_real_command_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello\n")
    r = subprocess.run(
        CLI + ["convert", "--from", "hicmae", str(junk), str(tmp_path / "o.pth")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    _one_line(r.stderr, "convert", str(junk), "not a PyTorch checkpoint")


# --- how main() sorts errors: a verb that raises what the layers below raise


@pytest.fixture
def raising(monkeypatch):
    """`hicmae-dist info hicmae-t` made to raise the given exception."""

    def install(exc: BaseException):
        def cmd(args):
            raise exc

        monkeypatch.setattr(cli, "cmd_info", cmd)

    return install


def test_disk_full_is_one_line_naming_the_file(raising, capsys):
    raising(OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoints/.tmp-step00000010/x.pt"))
    code, err = _main(capsys, "info", "hicmae-t")
    assert code == 1
    _one_line(err, "info", "No space left on device while writing /runs/a/checkpoints/.tmp-step00000010/x.pt")

    try:  # wrapped by a library (torch.save, sqlite): found through __cause__
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")
        except OSError as inner:
            raise RuntimeError("basic_ios::clear: iostream error") from inner
    except RuntimeError as outer:
        raising(outer)
    code, err = _main(capsys, "info", "hicmae-t")
    assert code == 1
    _one_line(err, "info", "No space left on device while writing /runs/a/metrics.jsonl")

    # an OSError subclass with its own message (as train.checkpoint's DiskFullError), errno or not
    class DiskFull(OSError):
        pass

    for exc in (
        DiskFull(errno.ENOSPC, "No space left on device while writing x; the last good checkpoint is 5"),
        RuntimeError("writing x failed"),
    ):
        if isinstance(exc, RuntimeError):
            exc.__context__ = OSError(errno.ENOSPC, "No space left on device")  # raised while handling it
        raising(exc)
        code, err = _main(capsys, "info", "hicmae-t")
        assert code == 1
        _one_line(err, "info", "No space left on device")
        assert "[Errno" not in err


def test_debug_adds_the_traceback_and_keeps_the_status(raising, capsys):
    raising(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"))
    for argv in (["--debug", "info", "hicmae-t"], ["info", "hicmae-t", "--debug"]):
        code, err = _main(capsys, *argv)
        assert code == 1 and "Traceback" in err
        assert err.strip().splitlines()[-1] == "hicmae-dist info: /data/x: No such file or directory"
    code, err = _main(capsys, "info", "hicmae-t")
    assert code == 1 and "Traceback" not in err


def test_a_bug_keeps_its_traceback(raising, capsys):
    raising(ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["info", "hicmae-t"])
    raising(KeyboardInterrupt())
    code, err = _main(capsys, "info", "hicmae-t")
    assert code == cli.EXIT_CTRL_C
    _one_line(err, "info", "interrupted")


def test_exit_status_is_documented():
    r = subprocess.run(CLI + ["pretrain", "--help"], capture_output=True, text=True, timeout=120)
    assert f"{cli.EXIT_INTERRUPTED} stopped by SIGTERM/SIGUSR2" in " ".join(r.stdout.split())
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"`{cli.EXIT_INTERRUPTED}`" in readme and "--debug" in readme
    from hicmae_dist.launch.job import REQUEUE_EXIT_CODE

    assert len({cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED, REQUEUE_EXIT_CODE}) == 5


def test_finetune_bad_folds_is_a_usage_error(tmp_path, capsys):
    for f in (1, 2, 3):
        (tmp_path / "splits" / f"split{f:02d}").mkdir(parents=True)
    args = [
        "finetune",
        "--splits",
        str(tmp_path / "splits"),
        "--run-dir",
        str(tmp_path / "ft"),
        "--from-scratch",
        "--dry-run",
    ]
    for folds in ("0", "x-y"):
        code, err = _main(capsys, *args, "--folds", folds)
        assert code == 2
        _one_line(err, "finetune", f"--folds {folds!r}")


def test_version_names_the_package_and_the_native_build(capsys, monkeypatch):
    import hicmae_dist
    from hicmae_dist.ops import gather

    try:
        cli.main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hicmae-dist {hicmae_dist.__version__}: "), out
    if gather.native_available():
        kind = "CPU + CUDA" if gather.native_built_with_cuda() else "CPU"
        assert f"hicmae_dist._C with {kind} kernels" in out, out
    # a CUDA torch beside an extension without CUDA kernels (a plain isolated `pip install .`) is named
    monkeypatch.setattr(gather, "native_built_with_cuda", lambda: False)
    monkeypatch.setattr(gather, "native_available", lambda: True)
    monkeypatch.setattr("torch.version.cuda", "13.0")
    text = cli.version_text()
    assert "with CPU kernels" in text and "pip install --no-build-isolation" in text, text
