"""`hicmae-dist jobs` and `hicmae-dist cancel`: the toolkit's Slurm jobs of this user.

`submit` appends one line per job to a registry (default ~/.cache/hicmae-dist/jobs.jsonl,
or $HICMAE_DIST_JOBS): job id, run dir, log folder, MLflow store. `jobs` joins it with
Slurm (squeue for queued and running jobs, sacct for the others), the run dirs (latest
checkpoint's state.json, metrics.jsonl) and the job folders' events.jsonl (requeues, errors).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hicmae_dist.launch.job import read_events
from hicmae_dist.train.rundir import RunDir

ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "COMPLETING",
    "CONFIGURING",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
    "RESV_DEL_HOLD",
    "STOPPED",
}


def default_registry() -> Path:
    if os.environ.get("HICMAE_DIST_JOBS"):
        return Path(os.environ["HICMAE_DIST_JOBS"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hicmae-dist" / "jobs.jsonl"


class Registry:
    """Append-only JSON lines; the last line of a job id wins."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_registry()

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        by_id: dict[str, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_id.pop(str(row.get("job_id")), None)  # keep submission order, last one wins
            by_id[str(row.get("job_id"))] = row
        return list(by_id.values())

    def get(self, job_id: str) -> dict[str, Any] | None:
        return next((r for r in self.rows() if str(r["job_id"]) == str(job_id)), None)


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """job id -> {"state", "reason", "elapsed", "exit_code", "source"}: squeue for the jobs it
    still holds, sacct for the rest (needs slurmdbd); a job neither knows is missing."""
    out: dict[str, dict[str, str]] = {}
    if not job_ids:
        return out
    text = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%M|%L"])
    for line in (text or "").splitlines():
        jid, state, reason, elapsed, left = (line.split("|") + [""] * 5)[:5]
        out[jid] = {
            "state": state,
            "reason": reason if reason not in ("None", "") else "",
            "elapsed": elapsed,
            "left": left,
            "source": "squeue",
        }
    rest = [j for j in job_ids if j not in out]
    if rest:
        text = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(rest), "-o", "JobIDRaw,State,ExitCode,Elapsed"])
        for line in (text or "").splitlines():
            jid, state, exit_code, elapsed = (line.split("|") + [""] * 4)[:4]
            if jid in rest:
                out[jid] = {
                    "state": state.split()[0] if state else "",
                    "exit_code": exit_code,
                    "elapsed": elapsed,
                    "source": "sacct",
                    "reason": state[len(state.split()[0]) :].strip() if state else "",
                }
    return out


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|submitit\.\S+Error)\b.*")


def error_from_logs(folder: Path, job_id: str) -> str | None:
    """The last exception line of the job's stderr logs (rank 0 first)."""
    files = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda p: (p.name != f"{job_id}_0_log.err", p.name))
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        hits = [ln.strip() for ln in lines if _ERROR_LINE.match(ln.strip())]
        if hits:
            return hits[-1][:500]
    return None


@dataclass
class JobStatus:
    job_id: str
    name: str
    state: str
    reason: str = ""
    elapsed: str = ""
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str = ""
    run_dir: str = ""
    log_dir: str = ""
    stdout: str = ""
    stderr: str = ""
    attempts: int = 0
    timeouts: int = 0
    preemptions: int = 0
    error: str | None = None
    submitted: str = ""


def mlflow_run_by_name(uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run called `run_name` in a local MLflow store (sqlite or file); None
    otherwise. For a job that has not written a checkpoint (which names its run) yet."""
    if uri.startswith("sqlite:///"):
        if not Path(uri[len("sqlite:///") :]).exists():
            return None
    elif not uri.startswith("file:"):
        return None  # a server: not worth a network round trip for a listing
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None
    except Exception:  # a store being created or migrated by the job right now
        return None


def job_status(row: dict[str, Any], slurm: dict[str, str] | None) -> JobStatus:
    jid = str(row["job_id"])
    folder = Path(row["log_dir"]) / jid
    events = read_events(folder)
    progress = RunDir(row["run_dir"]).progress()
    slurm = slurm or {}
    st = JobStatus(
        job_id=jid,
        name=row.get("job_name", ""),
        state=slurm.get("state") or "UNKNOWN",
        reason=slurm.get("reason", ""),
        elapsed=slurm.get("elapsed", ""),
        step=progress["step"],
        steps=row.get("steps"),
        loss=progress["loss"],
        mlflow_run_id=progress["mlflow_run_id"],
        tracking_uri=row.get("tracking_uri", ""),
        run_dir=row["run_dir"],
        log_dir=str(folder),
        stdout=str(folder / f"{jid}_0_log.out"),
        stderr=str(folder / f"{jid}_0_log.err"),
        submitted=row.get("submitted", ""),
    )
    if st.mlflow_run_id is None and any(e["event"] == "start" for e in events) and row.get("run_name"):
        st.mlflow_run_id = mlflow_run_by_name(st.tracking_uri, row.get("experiment", "hicmae-dist"), row["run_name"])
    st.attempts = sum(e["event"] == "start" for e in events)
    requeues = [e for e in events if e["event"] == "requeue"]
    st.timeouts = sum(e.get("kind") == "timeout" for e in requeues)
    st.preemptions = len(requeues) - st.timeouts
    failed = [e for e in events if e["event"] in ("failed", "stopped")]
    if st.state not in ACTIVE_STATES and st.state not in ("COMPLETED", "UNKNOWN", ""):
        st.error = failed[-1].get("error") or failed[-1].get("detail") if failed else None
        if not st.error:
            st.error = error_from_logs(folder, jid)
    if not slurm:  # sacct without slurmdbd, or a job from an older cluster
        ended = [e for e in events if e["event"] in ("finished", "failed", "stopped")]
        if ended:
            st.state = {"finished": "COMPLETED", "failed": "FAILED", "stopped": "STOPPED"}[ended[-1]["event"]]
            st.reason = "(from the job's events; Slurm has no record)"
    return st


def list_jobs(
    registry: Registry, job_ids: list[str] | None = None, active_only: bool = False, last: int | None = None
) -> list[JobStatus]:
    user = getpass.getuser()
    rows = [r for r in registry.rows() if r.get("user", user) == user]
    if job_ids:
        rows = [r for r in rows if str(r["job_id"]) in set(job_ids)]
    if last:
        rows = rows[-last:]
    states = slurm_states([str(r["job_id"]) for r in rows])
    out = [job_status(r, states.get(str(r["job_id"]))) for r in rows]
    if active_only:
        out = [s for s in out if s.state in ACTIVE_STATES]
    return out


def format_table(statuses: list[JobStatus], long: bool = False) -> str:
    if not statuses:
        return "no hicmae-dist jobs (submit one with `hicmae-dist submit`)"
    head = ("JOBID", "NAME", "STATE", "STEP", "LOSS", "REQUEUES", "MLFLOW RUN", "RUN DIR")
    lines = []
    for s in statuses:
        state = s.state + (f" ({s.reason})" if s.reason and s.state in ("PENDING", "REQUEUED") else "")
        step = "-" if s.step is None else f"{s.step}" + (f"/{s.steps}" if s.steps else "")
        loss = "-" if s.loss is None else f"{s.loss:.4f}"
        requeues = f"{s.timeouts}t {s.preemptions}p" if (s.timeouts or s.preemptions) else "-"
        lines.append((s.job_id, s.name, state, step, loss, requeues, s.mlflow_run_id or "-", s.run_dir))
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip()]
    for s, r in zip(statuses, lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if s.error:
            out.append(f"    error: {s.error}")
        if long:
            out.append(f"    logs:   {s.stdout}  {s.stderr}")
            out.append(f"    mlflow: {s.tracking_uri} (run {s.mlflow_run_id or 'not created yet'})")
            out.append(f"    submitted {s.submitted}, attempts {s.attempts}, elapsed {s.elapsed or '-'}")
    out.append("REQUEUES: t = time-limit requeues, p = preemption requeues")
    return "\n".join(out)


def active_job_for_run_dir(registry: Registry, run_dir: Path) -> str | None:
    """A queued or running toolkit job that writes `run_dir`, if any."""
    rows = [r for r in registry.rows() if Path(r["run_dir"]) == run_dir]
    if not rows:
        return None
    states = slurm_states([str(r["job_id"]) for r in rows])
    for r in rows:
        if states.get(str(r["job_id"]), {}).get("state") in ACTIVE_STATES:
            return str(r["job_id"])
    return None


def cancel(job_ids: list[str], signal: str | None = None) -> None:
    cmd = ["scancel"] + ([f"--signal={signal}"] if signal else []) + list(job_ids)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
