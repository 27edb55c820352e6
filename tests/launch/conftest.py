"""A real single-node Slurm for the launch tests: slurm/local/start.sh at the start of the
session (reused when one with the same settings is already up), slurm/local/stop.sh at the
end (only when this session started it). Timings go to the terminal summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import SUMMARY, require

REPO = Path(__file__).resolve().parents[2]
START = REPO / "slurm" / "local" / "start.sh"
STOP = REPO / "slurm" / "local" / "stop.sh"
CLI = [sys.executable, "-m", "hicmae_dist.cli"]
TIMINGS: dict[str, float] = SUMMARY.setdefault("local Slurm timings", {})
# the small, fast job every Slurm test starts from (per-rank batch 2, every step logged)
FAST = ["data.num_workers=0", "data.batch_size=2", "train.log_every=1", "train.warmup_steps=1"]


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster; skips (fails in CI) when it cannot be had on this machine."""
    up_before = _cluster_up()
    if os.geteuid() != 0:
        require("local Slurm cluster", up_before, "slurm/local/start.sh needs root; or start it first as root")
    t0 = time.perf_counter()
    started = False
    if os.geteuid() == 0:
        r = subprocess.run([str(START)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        require(
            "Slurm packages (slurmctld, slurmd, slurmdbd, munge, mariadb)",
            r.returncode != 3,
            "slurm/local/start.sh could not install them: " + r.stdout[-500:],
        )
        assert r.returncode == 0, f"slurm/local/start.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
        started = "already up" not in r.stdout
        TIMINGS["cluster start (s)"] = time.perf_counter() - t0
        TIMINGS["cluster was already up"] = float(not started)
    yield
    if started and os.environ.get("HICMAE_SLURM_KEEP_RUNNING") != "1":
        t1 = time.perf_counter()
        subprocess.run([str(STOP), "--quiet"], check=False, timeout=300)
        TIMINGS["cluster stop (s)"] = time.perf_counter() - t1


@pytest.fixture(scope="session")
def slurm_session(slurm_cluster, tmp_path_factory):
    """Everything the jobs of this session share: a registry file, their environment."""
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    env["HICMAE_DIST_JOBS"] = str(root / "jobs.jsonl")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/hicmae-dist/torch_extensions"))
    env["TQDM_DISABLE"] = "1"
    # what a shell that ran a process group by hand leaves exported (so does this worker, after an
    # in-process distributed test): sbatch passes it on, and every task must still take Slurm's place
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    yield {"root": root, "env": env, "registry": root / "jobs.jsonl"}
    TIMINGS["slurm tests (s)"] = time.perf_counter() - t0
    # nothing of ours may outlive the session
    rows = (
        [json.loads(line) for line in (root / "jobs.jsonl").read_text().splitlines()]
        if (root / "jobs.jsonl").exists()
        else []
    )
    if rows:
        subprocess.run(["scancel", *[str(r["job_id"]) for r in rows]], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory) -> Path:
    """8 synthetic clips in 2 shards (one per rank)."""
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    from hicmae_dist.data.prepare import prepare_shards
    from hicmae_dist.data.synth import write_corpus

    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("slurm-corpus")
    write_corpus(root / "corpus", 8, num_classes=2, seed=0, workers=2, progress=False)
    prepare_shards(root / "corpus", root / "shards", shard_size_mb=1, workers=2, progress=False)
    TIMINGS["shards (s)"] = time.perf_counter() - t0
    return root / "shards"


class Slurm:
    """Submit through the real CLI, wait on Slurm's view of the job."""

    def __init__(self, session: dict, shards: Path, tmp_path: Path):
        self.env, self.shards, self.tmp = session["env"], shards, tmp_path
        self.jobs: list[str] = []

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(CLI + list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check:
            assert r.returncode == 0, f"hicmae-dist {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        return r

    def submit(self, run_dir: Path, *extra: str, steps: int) -> str:
        r = self.cli(
            "submit",
            "--cluster",
            "local",
            "--preset",
            "tiny-cpu",
            "--data",
            str(self.shards),
            "--run-dir",
            str(run_dir),
            *extra,
            f"train.steps={steps}",
            *FAST,
        )
        m = re.search(r"submitted job (\d+)", r.stdout)
        assert m, r.stdout
        self.jobs.append(m.group(1))
        return m.group(1)

    def state(self, job_id: str) -> dict:
        from hicmae_dist.launch.jobs import slurm_states

        return slurm_states([job_id]).get(job_id, {})

    def wait(self, what: str, predicate, timeout: float, job_id: str | None = None, every: float = 1.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if job_id:
                st = self.state(job_id).get("state", "")
                if st in (
                    "COMPLETED",
                    "FAILED",
                    "CANCELLED",
                    "TIMEOUT",
                    "NODE_FAIL",
                    "OUT_OF_MEMORY",
                    "BOOT_FAIL",
                    "DEADLINE",
                ):
                    value = predicate()  # it may have become true just before the end
                    if value:
                        return value
                    pytest.fail(f"job {job_id} ended {st} while waiting for {what}\n{self.logs(job_id)}")
            time.sleep(every)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{self.logs(job_id)}" if job_id else ""))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.state(job_id).get("state", "")
            if state in states:
                return state
            time.sleep(2)
        pytest.fail(
            f"job {job_id} is {state or 'unknown'} after {timeout:.0f}s, expected {states}\n{self.logs(job_id)}"
        )

    def row(self, job_id: str) -> dict:
        """`hicmae-dist jobs JOB --json`, in this process (a CLI start costs seconds here)."""
        from dataclasses import asdict

        from hicmae_dist.launch.jobs import Registry, list_jobs

        (status,) = list_jobs(Registry(Path(self.env["HICMAE_DIST_JOBS"])), job_ids=[job_id])
        return asdict(status)

    def logs(self, job_id: str, tail: int = 40) -> str:
        out = []
        for path in sorted(self.tmp.glob(f"**/slurm/{job_id}/*_log.*")) + sorted(
            self.tmp.glob(f"**/{job_id}/events.jsonl")
        ):
            lines = path.read_text(errors="replace").splitlines()
            out.append(f"----- {path.name} (last {tail} lines)\n" + "\n".join(lines[-tail:]))
        return "\n".join(out)

    def cancel_all(self) -> None:
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True, timeout=60)


@pytest.fixture
def slurm(slurm_session, slurm_shards, tmp_path):
    s = Slurm(slurm_session, slurm_shards, tmp_path)
    yield s
    s.cancel_all()  # a failed test leaves no job behind to hold the node's two CPUs
