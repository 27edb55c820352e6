"""End to end on the CPU: the real CLI pretrains the tiny preset on real shards with DeepSpeed,
logs to MLflow, checkpoints, and resumes after a SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hicmae_dist.config import load_config
from hicmae_dist.train.schedule import lr_at

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


def _pretrain_cmd(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return CLI + ["pretrain", "--preset", "tiny-cpu", "--data", str(shards), "--run-dir", str(run_dir),
                  "--no-progress", *overrides]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_history(run_dir: Path, key: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "hicmae-dist"]
    runs = client.search_runs([exp.experiment_id])
    return runs, {r.info.run_id: client.get_metric_history(r.info.run_id, key) for r in runs}


def test_dry_run_prints_resolved_config_without_data():
    out = subprocess.run(CLI + ["pretrain", "--preset", "tiny-cpu", "--dry-run", "model.width=128",
                                "train.zero_stage=1"], capture_output=True, text=True, check=True).stdout
    assert "width: 128" in out and '"stage": 1' in out and "heads: 2" in out


def test_bad_override_fails_naming_the_key():
    r = subprocess.run(CLI + ["pretrain", "--preset", "tiny-cpu", "--dry-run", "train.stpes=5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'train.stpes'" in r.stderr


@pytest.mark.slow
def test_two_minute_run_lowers_losses_and_is_tracked(shards, cli_env, tmp_path):
    run_dir = tmp_path / "run"
    steps = 120
    r = subprocess.run(_pretrain_cmd(shards, run_dir, f"train.steps={steps}", "train.warmup_steps=10",
                                     "train.log_every=10", "train.checkpoint_every=60"),
                       capture_output=True, text=True, env=cli_env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss first/last" in r.stdout and "mlflow ui --backend-store-uri sqlite:///" in r.stdout

    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(10, steps + 1, 10))
    first, last = rows[0], rows[-1]
    assert last["loss_video"] < 0.9 * first["loss_video"]
    assert last["loss_audio"] < 0.9 * first["loss_audio"]
    assert last["loss_contrastive"] < first["loss_contrastive"] - 0.3  # 3 layers of ln(8) = 6.24 at chance

    runs, history = _mlflow_history(run_dir, "loss")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    (hist,) = history.values()
    assert [m.step for m in hist] == [row["step"] for row in rows]
    assert runs[0].data.params["model.width"] == "64"
    assert {"loss_contrastive_l1", "loss_video", "lr", "grad_norm", "clips_per_s"} <= set(runs[0].data.metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["checkpoint"].endswith(f"step{steps:08d}")
    assert (run_dir / "losses.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_after_sigkill_continues_step_schedule_and_loss(shards, cli_env, tmp_path):
    run_dir = tmp_path / "run"
    steps, kill_after = 60, 30
    args = (f"train.steps={steps}", "train.warmup_steps=5", "train.log_every=5", f"train.checkpoint_every={kill_after}")
    proc = subprocess.Popen(_pretrain_cmd(shards, run_dir, *args), env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text() == f"step{kill_after:08d}"):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _metrics(run_dir)
    assert before[-1]["step"] >= kill_after

    r = subprocess.run(_pretrain_cmd(shards, run_dir, *args), capture_output=True, text=True, env=cli_env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"this session from {kill_after}" in r.stdout
    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(5, steps + 1, 5))  # no gap, no repeat
    cfg = load_config("tiny-cpu", list(args))
    resumed = [row for row in rows if row["step"] > kill_after]
    for row in resumed:  # the schedule continues: logged lr is that of the window's last step
        assert row["lr"] == pytest.approx(
            sum(lr_at(s, cfg.train, 8) for s in range(row["step"] - 5, row["step"])) / 5, rel=1e-9)
    at_kill = next(row for row in rows if row["step"] == kill_after)
    assert resumed[0]["loss"] < rows[0]["loss"]  # continues from the trained weights, not from scratch
    assert abs(resumed[0]["loss"] - at_kill["loss"]) < 0.5 * (rows[0]["loss"] - at_kill["loss"])

    runs, history = _mlflow_history(run_dir, "loss")
    assert len(runs) == 1, "the resumed job must continue the same MLflow run"
    (hist,) = history.values()
    assert sorted(m.step for m in hist if m.step <= kill_after) == [s for s in range(5, kill_after + 1, 5)]
    assert sorted({m.step for m in hist}) == list(range(5, steps + 1, 5))
