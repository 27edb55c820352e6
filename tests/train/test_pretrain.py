"""End to end on the CPU: the real CLI pretrains the tiny preset on real shards with DeepSpeed,
logs to MLflow, checkpoints, and resumes after a SIGKILL."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hicmae_dist.cli import EXIT_INTERRUPTED
from hicmae_dist.config import load_config
from hicmae_dist.train.schedule import lr_at
from tests.support import pretrain_cmd

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_history(run_dir: Path, key: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "hicmae-dist"]
    runs = client.search_runs([exp.experiment_id])
    return runs, {r.info.run_id: client.get_metric_history(r.info.run_id, key) for r in runs}


def test_dry_run_prints_resolved_config_without_data():
    out = subprocess.run(
        CLI + ["pretrain", "--preset", "tiny-cpu", "--dry-run", "model.width=128", "train.zero_stage=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "width: 128" in out and '"stage": 1' in out and "heads: 2" in out


def test_bad_override_fails_naming_the_key():
    r = subprocess.run(
        CLI + ["pretrain", "--preset", "tiny-cpu", "--dry-run", "train.stpes=5"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown config key 'train.stpes'" in r.stderr


@pytest.mark.slow
def test_two_minute_run_lowers_losses_and_is_tracked(two_minute_run):
    run_dir, r = two_minute_run
    steps = 120
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loss first/last" in r.stdout and "mlflow ui --backend-store-uri sqlite:///" in r.stdout
    # a log, not a terminal: no carriage returns, one line per log window
    assert "\r" not in r.stdout + r.stderr
    lines = re.findall(r"pretrain step (\d+)/120 loss \S+ clips/s \S+ step_time \S+s eta \d+:\d\d:\d\d", r.stderr)
    assert [int(s) for s in lines] == list(range(10, steps + 1, 10)), r.stderr[-3000:]

    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(10, steps + 1, 10))
    first = rows[0]
    last = {k: sum(r[k] for r in rows[-3:]) / 3 for k in ("loss_video", "loss_audio", "loss_contrastive")}
    assert last["loss_video"] < 0.97 * first["loss_video"]  # the frame-difference target falls slowly
    assert last["loss_audio"] < 0.9 * first["loss_audio"]
    # 3 layers of ln(8) = 6.24 at chance; seen in CI: 6.49 -> 6.20 in 120 steps of the tiny model
    assert last["loss_contrastive"] < first["loss_contrastive"] - 0.1

    runs, history = _mlflow_history(run_dir, "loss")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    (hist,) = history.values()
    assert [m.step for m in hist] == [row["step"] for row in rows]
    assert runs[0].data.params["model.width"] == "64"
    assert {"loss_contrastive_l1", "loss_video", "lr", "grad_norm", "clips_per_s"} <= set(runs[0].data.metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["checkpoint"].endswith(f"step{steps:08d}")
    assert (run_dir / "losses.png").stat().st_size > 1000


def _final_weights(run_dir: Path) -> dict:
    from hicmae_dist.train.checkpoint import weights_only_loads
    from hicmae_dist.train.rundir import RunDir

    with weights_only_loads():
        return torch.load(RunDir(run_dir).latest_checkpoint() / "mp_rank_00_model_states.pt")["module"]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(shards, cli_env, tmp_path):
    """fp32, torch AdamW, fixed seed, 2 micro-batches per step: killed and resumed ends with the
    same weights, to the bit, as an uninterrupted run; one MLflow run whose step metrics have no
    gap and no repeat."""
    steps, every = 16, 4
    args = (
        f"train.steps={steps}",
        "train.warmup_steps=4",
        "train.log_every=2",
        f"train.checkpoint_every={every}",
        "model.width=32",
        "model.decoder_width=32",
        "data.batch_size=2",
        "train.grad_accum=2",
    )
    reference = tmp_path / "uninterrupted"
    r = subprocess.run(
        pretrain_cmd(shards, reference, *args, "tracking.enabled=false"),
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        pretrain_cmd(shards, run_dir, *args),
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text() >= f"step{every:08d}"):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    time.sleep(random.uniform(0.0, 2.0))  # somewhere between two checkpoints
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    assert killed_at != f"step{steps:08d}", "the run finished before the kill; make it longer"

    r = subprocess.run(pretrain_cmd(shards, run_dir, *args), capture_output=True, text=True, env=cli_env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = int(killed_at.removeprefix("step"))
    assert f"this session from {resumed_from}" in r.stdout

    ours, theirs = _final_weights(run_dir), _final_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"

    rows = _metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(2, steps + 1, 2))  # no gap, no repeat
    cfg = load_config("tiny-cpu", list(args))
    for row in rows:  # the schedule continues: the logged lr is the mean over the logging window
        assert row["lr"] == pytest.approx(sum(lr_at(s, cfg.train, 4) for s in range(row["step"] - 2, row["step"])) / 2)
    assert [row["loss"] for row in rows] == [row["loss"] for row in _metrics(reference)]

    runs, history = _mlflow_history(run_dir, "loss")
    assert len(runs) == 1, "the resumed job must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    (hist,) = history.values()
    # Steps logged between the last checkpoint and the kill are trained again by the resumed job
    # (SIGKILL gives no chance to save) but not sent again: one value per step.
    assert sorted(m.step for m in hist) == list(range(2, steps + 1, 2))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_resume_repeats_nothing(shards, cli_env, tmp_path):
    run_dir = tmp_path / "run"
    args = (
        "train.steps=12",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "model.width=32",
        "model.decoder_width=32",
        "data.batch_size=4",
    )
    proc = subprocess.Popen(
        pretrain_cmd(shards, run_dir, *args), env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 600
    while not ((run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]  # saved, not finished: a script can tell
    assert "interrupted      SIGTERM" in out
    stopped = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 3 <= stopped < 12
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"

    r = subprocess.run(pretrain_cmd(shards, run_dir, *args), capture_output=True, text=True, env=cli_env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs, history = _mlflow_history(run_dir, "loss")
    (hist,) = history.values()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in hist) == list(range(1, 13))  # no gap and no repeat


def _torchrun(nproc: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "hicmae_dist.cli",
    ]


@pytest.mark.slow
def test_resume_at_another_world_size_through_universal_checkpoint(shards, cli_env, tmp_path):
    """2 ranks -> 1 rank -> 2 ranks, one run directory: each resume converts the checkpoint to
    DeepSpeed's universal format and continues the step count, the loss and the MLflow run."""
    run_dir = tmp_path / "run"
    base = (
        "train.warmup_steps=2",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "model.width=32",
        "model.decoder_width=32",
        "data.batch_size=2",
        "data.num_workers=0",
    )

    def run(nproc, steps):
        cmd = pretrain_cmd(shards, run_dir, *base, f"train.steps={steps}")
        cmd = _torchrun(nproc) + cmd[len(CLI) :] if nproc > 1 else cmd
        r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    assert "2 rank(s)" in run(2, 4)
    out = run(1, 8)
    assert "this session from 4, 1 rank(s)" in out
    assert (run_dir / "checkpoints" / "universal" / "step00000004" / "zero").is_dir()
    assert "this session from 8, 2 rank(s)" in run(2, 12)
    assert (run_dir / "checkpoints" / "universal" / "step00000008").is_dir()

    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    assert rows[-1]["loss"] < rows[0]["loss"]
    runs, history = _mlflow_history(run_dir, "loss")
    assert len(runs) == 1 and sorted(m.step for m in next(iter(history.values()))) == list(range(2, 13, 2))


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1; kill() and start() again keep the port and the store."""

    def __init__(self, store: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.store = store
        store.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.store / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.store / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
                assert time.time() < deadline, "mlflow server did not come up in 2 minutes"
                time.sleep(0.5)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped after the test."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server.uri
    server.kill(signal.SIGTERM)


@pytest.mark.slow
def test_tracking_to_a_real_mlflow_server_with_system_metrics(shards, cli_env, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    r = subprocess.run(
        pretrain_cmd(
            shards,
            tmp_path / "run",
            "--tracking-uri",
            mlflow_server,
            "train.steps=6",
            "train.warmup_steps=1",
            "train.log_every=2",
            "tracking.system_metrics_s=1",
            "tracking.experiment=server-test",
            "model.width=32",
            "model.decoder_width=32",
            "data.batch_size=2",
        ),
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert {"mfu", "tokens_per_s", "step_time_s"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "losses.png"} <= artifacts


def _wait_for(what: str, condition, proc, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_tracking_server_killed_mid_run_training_goes_on_and_sync_sends_one_value_per_step(shards, cli_env, tmp_path):
    """A crash after step 5 (checkpoint at 4, MLflow holds 1-5), a resume that repeats step 5 on,
    the server SIGKILLed at step 7 of it: every step and checkpoint is written, the process ends
    soon after its last step; after the server restarts (same port and store) `sync` completes the
    run: every metric has one value per step, the artifacts, FINISHED."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server")
    server.start()
    run_dir, steps = tmp_path / "run", 10
    cmd = pretrain_cmd(
        shards,
        run_dir,
        "--tracking-uri",
        server.uri,
        f"train.steps={steps}",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=3",
        "tracking.system_metrics_s=1",
        "tracking.experiment=outage",
        "model.width=32",
        "model.decoder_width=32",
        "data.batch_size=2",
    )
    client = MlflowClient(tracking_uri=server.uri)

    def mlflow_steps() -> list[int]:
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")]

    def rows() -> list[dict]:
        return _metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []

    try:
        proc = subprocess.Popen(
            cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        _wait_for("step 5 in MLflow", lambda: len(mlflow_steps()) >= 5, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = (run_dir / "checkpoints" / "latest").read_text()
        assert killed_at == "step00000004", killed_at

        # The killed attempt may have logged past step 7 before MLflow saw step 5: wait for the
        # resume's own step 7 (it first rewrites metrics.jsonl up to its checkpoint), not those.
        resumed_at = time.time()
        proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def resumed_to_step_7() -> bool:
            rewritten = run_dir.joinpath("metrics.jsonl").stat().st_mtime > resumed_at
            return rewritten and any(r["step"] >= 7 for r in rows())

        _wait_for("the resume's step 7", resumed_to_step_7, proc)
        server.kill()
        out, err = proc.communicate(timeout=900)
        ended = time.time()
        assert proc.returncode == 0, err[-3000:]
        assert "this session from 4" in out
        assert f"MLflow at {server.uri} unreachable" in err and f"hicmae-dist sync {run_dir}" in err
        # every step and every checkpoint despite the outage, and no wait of minutes at the end
        assert [r["step"] for r in rows()] == list(range(1, steps + 1))
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
        assert {p.name for p in (run_dir / "checkpoints").glob("step*")} == {f"step{s:08d}" for s in (4, 8, 10)}
        assert ended - (run_dir / "metrics.jsonl").stat().st_mtime < 45, "the run waited on the dead server"
        pending = json.loads((run_dir / "tracking.json").read_text())["pending"]
        assert pending["status"] == "FINISHED" and pending["artifacts"]

        server.start()
        r = subprocess.run(CLI + ["sync", str(run_dir)], capture_output=True, text=True, env=cli_env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "status FINISHED" in r.stdout
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert run.info.status == "FINISHED"
        local = rows()
        for key in [k for k in local[0] if k != "step"]:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, steps + 1)), key  # one value per step
        # fp32 on a fixed seed: the resumed steps repeat the lost attempt's losses exactly
        loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        assert [loss[r["step"]] for r in local] == [r["loss"] for r in local]
        assert {"config.yaml", "summary.json", "losses.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert any(k.startswith("system/") for k in run.data.metrics)
        again = subprocess.run(CLI + ["sync", str(run_dir)], capture_output=True, text=True, env=cli_env, timeout=300)
        assert again.returncode == 0 and " 0 metric values sent" in again.stdout, again.stdout + again.stderr
    finally:
        server.kill()


def test_unreachable_tracking_uri_is_one_line_within_seconds(shards, cli_env, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.time()
    r = subprocess.run(
        pretrain_cmd(shards, tmp_path / "run", "--tracking-uri", uri, "train.steps=2", "train.warmup_steps=1"),
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    took = time.time() - start
    assert r.returncode != 0 and took < 15, (r.returncode, took)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert uri in last and "tracking.enabled=false" in last, r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tracking.json").exists()
