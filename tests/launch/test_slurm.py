"""`hicmae-dist submit` on a real Slurm (slurm/local/start.sh): 2 ranks over gloo, preemption,
time limit, a failing job, cancel. Each job is the tiny preset for a handful of steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import Slurm


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _events(run_dir: Path, job_id: str) -> list[dict]:
    path = run_dir / "slurm" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mlflow(run_dir: Path):
    """The run dir's MLflow store: (runs of the experiment, step history of 'loss' per run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hicmae-dist")
    runs = client.search_runs([exp.experiment_id])
    return runs, {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in runs}


def _assert_one_complete_run(run_dir: Path, steps: int) -> str:
    """Every step logged once, in metrics.jsonl and in a single FINISHED MLflow run."""
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    runs, history = _mlflow(run_dir)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    assert history[runs[0].info.run_id] == list(range(1, steps + 1)), "MLflow steps with a gap or a repeat"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{steps:08d}"
    return runs[0].info.run_id


def test_two_rank_cpu_job_finishes(slurm: Slurm, tmp_path):
    run_dir, steps = tmp_path / "run", 3
    job = slurm.submit(run_dir, steps=steps)
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", slurm.logs(job)

    run_id = _assert_one_complete_run(run_dir, steps)
    finished = [e for e in _events(run_dir, job) if e["event"] == "finished"]
    assert finished and finished[-1]["world_size"] == 2 and finished[-1]["backend"] == "gloo"
    for rank in (0, 1):  # one task per rank, each with its place in the process group
        err = (run_dir / "slurm" / job / f"{job}_{rank}_log.err").read_text()
        assert f"rank {rank}/2 (local {rank})" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps and summary["mlflow_run_id"] == run_id

    row = slurm.row(job)
    assert (row["state"], row["step"], row["steps"], row["mlflow_run_id"]) == ("COMPLETED", steps, steps, run_id)
    assert row["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"


def test_preemption_checkpoints_requeues_and_resumes_the_same_mlflow_run(slurm: Slurm, tmp_path):
    """A job of the `urgent` partition needs the CPUs the run holds: Slurm preempts it (USR2),
    it saves at the next step, requeues itself and the new attempt continues from there."""
    # Steps enough that the preemption (seconds from sbatch to USR2) lands before the end: 8 steps
    # once finished 3 s after the second logged one, before Slurm preempted anything.
    run_dir, steps = tmp_path / "run", 40
    job = slurm.submit(run_dir, steps=steps)
    slurm.wait(
        "2 logged steps",
        lambda: (run_dir / "metrics.jsonl").exists() and len(_metric_steps(run_dir)) >= 2,
        600,
        job_id=job,
    )
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "urgent",
            "-n",
            "1",
            "-t",
            "1",
            "-J",
            "urgent",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    slurm.jobs.append(urgent.stdout.strip().split(";")[0])
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900) == "COMPLETED", slurm.logs(job)

    events = _events(run_dir, job)
    requeues = [e for e in events if e["event"] == "requeue"]
    assert [e["kind"] for e in requeues] == ["preemption"], events
    stopped_at = requeues[0]["step"]
    assert 2 <= stopped_at < steps
    assert [e["attempt"] for e in events if e["event"] == "start"] == [1, 2]
    log = (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped_at:08d}'} at step {stopped_at}" in log
    run_id = _assert_one_complete_run(run_dir, steps)
    assert slurm.state(urgent.stdout.strip())["state"] == "COMPLETED"

    row = slurm.row(job)
    assert (row["state"], row["preemptions"], row["timeouts"], row["mlflow_run_id"]) == ("COMPLETED", 1, 0, run_id)


# The three one-CPU jobs are submitted together, so that they share the node's two CPUs.
TIME_LIMIT = ["--tasks-per-node", "1", "--time", "2", "--signal-delay-s", "110"]
TIME_LIMIT_STEPS = 150


@pytest.fixture(scope="module")
def one_cpu_jobs(slurm_session, slurm_shards, tmp_path_factory):
    """- time limit: 2 minutes with USR2 110 s ahead: Slurm signals within the first half
      minute, while the tiny model is still starting up (about a minute here), so the first
      attempt stops after one step whatever the machine's speed;
    - no budget: the same with --max-timeouts 0: signalled, saved, not requeued;
    - bad config: model.image_size=96 is a valid config, but the shards hold 160 px frames;
      the job finds out when it opens them."""
    tmp = tmp_path_factory.mktemp("one-cpu")
    s = Slurm(slurm_session, slurm_shards, tmp)
    jobs = {
        # Step budgets well past what fits before Slurm's signal (10-40 s after start), so the
        # signal, not the end of training, stops the first attempt however fast the machine is.
        "time_limit": s.submit(tmp / "time-limit", *TIME_LIMIT, "--max-timeouts", "2", steps=TIME_LIMIT_STEPS),
        # Submitted second so that it starts at once, as the first does, and Slurm's time-limit
        # check signals it in its first half minute: once (in 1 of 4 runs here) the third job,
        # started by backfill a moment after a check, ran to its hard limit without a USR2.
        "no_budget": s.submit(tmp / "no-budget", *TIME_LIMIT, "--max-timeouts", "0", steps=1000),
        "bad_config": s.submit(tmp / "bad-config", "--tasks-per-node", "1", "model.image_size=96", steps=5),
    }
    yield s, tmp, jobs
    s.cancel_all()


def test_time_limit_signals_checkpoints_requeues_and_finishes(one_cpu_jobs):
    """The signal, checkpoint and a time-limit requeue on Slurm's own clock. With its 2-minute
    limit the resumed attempt would again be signalled after one step, so once the requeue is
    seen the test lifts the limit and the run finishes."""
    s, tmp, jobs = one_cpu_jobs
    job, run_dir, steps = jobs["time_limit"], tmp / "time-limit", TIME_LIMIT_STEPS
    requeue = s.wait(
        "a time-limit requeue", lambda: [e for e in _events(run_dir, job) if e["event"] == "requeue"], 400, job_id=job
    )
    assert requeue[0]["kind"] == "timeout", requeue
    assert requeue[0]["timeouts"] == 1 and 1 <= requeue[0]["step"] < steps
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], check=True, capture_output=True)
    assert s.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", s.logs(job)

    assert [e["attempt"] for e in _events(run_dir, job) if e["event"] == "start"] == [1, 2]
    _assert_one_complete_run(run_dir, steps)
    row = s.row(job)
    assert (row["state"], row["timeouts"], row["preemptions"]) == ("COMPLETED", 1, 0)


def test_time_limit_without_requeue_budget_stops_with_a_checkpoint(one_cpu_jobs):
    s, tmp, jobs = one_cpu_jobs
    job, run_dir = jobs["no_budget"], tmp / "no-budget"
    assert s.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "FAILED", s.logs(job)
    events = _events(run_dir, job)
    assert [e["event"] for e in events] == ["start", "stopped"], events
    assert events[-1]["kind"] == "timeout" and "max_timeouts=0" in events[-1]["detail"]
    step = events[-1]["step"]
    assert step >= 1 and (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    assert _metric_steps(run_dir) == list(range(1, step + 1))
    runs, _ = _mlflow(run_dir)
    assert [r.info.status for r in runs] == ["KILLED"]  # a resubmit continues it
    row = s.row(job)
    assert row["state"] == "FAILED" and "max_timeouts=0" in row["error"]


def test_job_that_fails_ends_failed_once_with_its_error(one_cpu_jobs):
    s, tmp, jobs = one_cpu_jobs
    job, run_dir = jobs["bad_config"], tmp / "bad-config"
    assert s.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "FAILED", s.logs(job)
    log = (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "BadDataError" in log and "the model expects 96px" in log
    events = _events(run_dir, job)
    assert [e["event"] for e in events] == ["start", "failed"], events  # no requeue, no second attempt
    row = s.row(job)
    assert row["state"] == "FAILED" and "the model expects 96px" in row["error"]
    table = s.cli("jobs").stdout  # the real CLI, once
    assert f"{job}" in table and "FAILED" in table and "error: BadDataError" in table
    detail = s.cli("jobs", job, "--json").stdout
    assert json.loads(detail)[0]["error"] == row["error"]


def test_cancel(slurm: Slurm, tmp_path):
    # held in the queue for an hour: the test needs a job id, not a run
    job = slurm.submit(tmp_path / "run", "--tasks-per-node", "1", "--sbatch", "begin=now+3600", steps=50)
    assert slurm.state(job)["state"] == "PENDING"
    r = slurm.cli("cancel", job)
    assert f"cancelled {job}" in r.stdout
    assert slurm.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, 120) == "CANCELLED"
    assert slurm.row(job)["state"] == "CANCELLED"
    r = slurm.cli("cancel", "1", check=False)  # not ours
    assert r.returncode == 1 and "not in" in r.stderr
