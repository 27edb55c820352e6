"""`hicmae-dist submit --dry-run` and the launch layer's pure logic: no Slurm, no data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hicmae_dist.config import ConfigError
from hicmae_dist.launch import job as job_mod
from hicmae_dist.launch.submit import load_cluster, parse_mem, parse_sbatch, parse_time, resolve_shape

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


def _dry_run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, with no sbatch, srun or scontrol on the PATH."""
    env = dict(os.environ, PATH=str(tmp_path))
    return subprocess.run(
        CLI + ["submit", "--preset", "tiny-cpu", "--run-dir", str(tmp_path / "run"), "--dry-run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def dry_run(tmp_path, monkeypatch, capsys):
    """The same in this process (a CLI start costs seconds here): (returncode, stdout, stderr)."""
    from hicmae_dist.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(["submit", "--preset", "tiny-cpu", "--run-dir", str(tmp_path / "run"), "--dry-run", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _sbatch_lines(out: str) -> set[str]:
    return {line for line in out.splitlines() if line.startswith("#SBATCH")}


def test_dry_run_of_a_4_node_x_8_gpu_job(tmp_path):
    r = _dry_run(
        tmp_path,
        "--cluster",
        "generic-gpu",
        "--nodes",
        "4",
        "--partition",
        "big",
        "--account",
        "proj",
        "--qos",
        "high",
        "--constraint",
        "a100|h100",
        "--time",
        "2-00:00:00",
        "--sbatch",
        "mail-type=END",
        "train.steps=1000",
    )
    assert r.returncode == 0, r.stderr
    log_dir = tmp_path / "run" / "slurm"
    expected = {
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",  # one task per GPU
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --time=2880",
        "#SBATCH --partition=big",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint='a100|h100'",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
        "#SBATCH --mail-type=END",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%j/%j_0_log.out",
        f"#SBATCH --error={log_dir}/%j/%j_0_log.err",
    }
    assert expected <= _sbatch_lines(r.stdout), sorted(expected - _sbatch_lines(r.stdout))
    srun = [line for line in r.stdout.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0]
    assert srun[0].endswith(f"-u -m submitit.core._submit {log_dir}/%j") and sys.executable in srun[0]
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in r.stdout
    assert "4 node(s) x 8 GPU task(s)/node (nccl) = 32 rank(s)" in r.stdout
    assert f"# mlflow:   sqlite:///{tmp_path / 'run' / 'mlflow.db'}" in r.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_of_a_cpu_job_and_flags_over_the_preset(tmp_path, dry_run):
    r = dry_run(
        "--cluster",
        "local",
        "--tasks-per-node",
        "4",
        "--nodes",
        "2",
        "--mem",
        "1.5G",
        "--sbatch",
        "exclusive",
        "--log-dir",
        str(tmp_path / "logs"),
        "--job-name",
        "t1",
    )
    assert r.returncode == 0, r.stderr
    lines = _sbatch_lines(r.stdout)
    assert {
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --partition=debug",
        "#SBATCH --mem=1536M",
        "#SBATCH --signal=USR2@30",
        "#SBATCH --time=60",
        "#SBATCH --exclusive",
        "#SBATCH --job-name=t1",
        f"#SBATCH --output={tmp_path}/logs/%j/%j_0_log.out",
    } <= lines
    assert not any("gpus" in line for line in lines)
    assert "(gloo) = 8 rank(s)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cluster", "nope"], "unknown cluster preset 'nope'"),
        (["--time", "soon"], "time: expected minutes"),
        (["--cluster", "generic-gpu", "--tasks-per-node", "2"], "one task per GPU"),
        (["--time", "1", "--signal-delay-s", "90"], "not shorter than the time limit"),
        (["--sbatch", "--bad option"], "sbatch long option"),
        (["train.stpes=5"], "unknown config key 'train.stpes'"),
    ],
)
def test_bad_job_settings_fail_before_submitting(dry_run, args, message):
    r = dry_run(*args)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


def test_submit_refuses_a_run_dir_whose_checkpoint_has_another_config(tmp_path, dry_run):
    ckpt = tmp_path / "run" / "checkpoints" / "step00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 10, "config_hash": "0123", "mlflow_run_id": "abc"}))
    (ckpt.parent / "latest").write_text("step00000010")
    r = dry_run()
    assert r.returncode == 2 and "config hash 0123" in r.stderr
    r = dry_run("--resume", "never")
    assert r.returncode == 2 and "already holds checkpoint step00000010" in r.stderr


def test_time_mem_and_sbatch_parsing():
    assert [parse_time(v) for v in (30, "30", "1:30", "2:00:00", "1-00", "1-2:03", "1-00:00:01")] == [
        30,
        30,
        2,
        120,
        1440,
        1563,
        1441,
    ]
    for bad in ("0", "x", "1:2:3:4", True):
        with pytest.raises(ConfigError):
            parse_time(bad)
    assert [parse_mem(v) for v in ("16G", "16gb", "500M", "0", 0, "1.5G", None)] == [
        "16G",
        "16G",
        "500M",
        "0",
        "0",
        "1536M",
        None,
    ]
    assert parse_sbatch(["exclusive", "mail_type=END", "gres=gpu:2"]) == {
        "exclusive": True,
        "mail-type": "END",
        "gres": "gpu:2",
    }
    shape = resolve_shape(load_cluster("generic-gpu"), {"sbatch": ["exclusive=false"], "nodes": 3, "mem": None})
    assert shape.nodes == 3 and shape.tasks == 24 and "exclusive" not in shape.sbatch and shape.mem == "0"


def test_requeue_decisions():
    decide = job_mod.decide
    assert decide("preemption", "", 7, timeouts_used=9, max_timeouts=0) == ""  # always
    assert decide("signal", "", 7, timeouts_used=9, max_timeouts=0) == ""
    assert decide("timeout", "", 7, timeouts_used=1, max_timeouts=2) == ""
    assert "2 time-limit requeue(s) used of max_timeouts=2" in decide("timeout", "", 7, timeouts_used=2, max_timeouts=2)
    assert "stopped by SIGTERM" in decide("terminated", "SIGTERM", 7, timeouts_used=0, max_timeouts=3)


def test_why_slurm_signalled(monkeypatch):
    """PreemptTime set in this attempt -> preemption; little time left -> time limit."""
    now = 1_800_000_000.0
    iso = lambda dt: __import__("datetime").datetime.fromtimestamp(now + dt).isoformat(timespec="seconds")  # noqa: E731
    info = {"StartTime": iso(-600), "EndTime": iso(3000), "TimeLimit": "01:00:00", "PreemptTime": iso(-1)}
    monkeypatch.setattr(job_mod, "scontrol_job", lambda job_id: dict(info))
    assert job_mod.classify_stop("1", 120, now)[0] == "preemption"
    info["PreemptTime"] = "None"
    assert job_mod.classify_stop("1", 120, now)[0] == "signal"  # 50 min left: USR2 by hand
    info["EndTime"] = iso(150)
    assert job_mod.classify_stop("1", 120, now)[0] == "timeout"  # may come up to a minute early
    info["PreemptTime"] = iso(-900)  # an earlier attempt's preemption
    assert job_mod.classify_stop("1", 120, now)[0] == "timeout"


def test_dry_run_of_a_finetune_job(tmp_path, dry_run):
    """`submit --splits` runs the fine-tuning protocol in the job: its spec is resolved here."""
    for fold in (1, 2, 3):
        (tmp_path / "splits" / f"split{fold:02d}").mkdir(parents=True)
    r = dry_run(
        "--preset",
        "finetune-tiny-cpu",
        "--splits",
        str(tmp_path / "splits"),
        "--folds",
        "all",
        "--from-scratch",
        "finetune.num_outputs=4",
    )
    assert r.returncode == 0, r.stderr
    assert "# finetune: preset finetune-tiny-cpu" in r.stdout and "from scratch" in r.stdout
    assert f"folds [1, 2, 3] of {tmp_path / 'splits'}" in r.stdout
    r = dry_run("--preset", "finetune-tiny-cpu", "--splits", str(tmp_path / "splits"))
    assert r.returncode == 2 and "--pretrained RUN_DIR|FILE or --from-scratch" in r.stderr
