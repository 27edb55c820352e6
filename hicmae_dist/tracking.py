"""MLflow tracking: one run per job, written by rank 0 only, never in training's way.

The store defaults to an sqlite file under the run directory (artifacts beside it), so a run
directory holds everything; `uri` points at a server (`http://127.0.0.1:5000`) instead. The run
id is kept in the checkpoint, so a resumed job continues the same MLflow run.

Training never waits on the tracker. Creating (or reopening) the run is the only synchronous
call, after a TCP probe of a server URI that fails in seconds with one line. Everything else
(params, tags, metrics, system metrics, artifacts, the final status) goes through a bounded
outbox that a background thread sends; MLflow's own HTTP retries are bounded
(`bound_http_retries`) and the thread retries with its own backoff. A server outage is one
warning, then one line when it is back; `finish` waits at most FINISH_WAIT_S and records what
it could not send in RUN_DIR/tracking.json, which `hicmae-dist sync RUN_DIR` (`sync_run_dir`)
sends later.

One value per step: a tracker with a journal (pretrain's metrics.jsonl, the source of truth)
sends a metric only for steps above the highest step the MLflow run already holds for that key
(its keys' steps only increase). So a job that resumes from an older checkpoint does not send
the steps between that checkpoint and the crash again: MLflow keeps the values first sent for
them (bit-identical losses on a fixed seed; the timings are those of the lost attempt), and the
rows missing from MLflow (an outage, a full outbox) are replayed from the journal by the sender,
the next run, or `sync`. A tracker without a journal (fine-tuning) sends what it is given.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
RECORD_FILE = "tracking.json"  # the run's MLflow record: URI, run id, what is still to send
OUTBOX_ROWS = 20_000  # metric rows held while the server is away; beyond: replayed from the journal
SYSTEM_SAMPLES = 360  # system-metric samples held while the server is away (the oldest go first)
FINISH_WAIT_S = 10.0  # how long finish() lets the outbox drain before it records the rest
PROBE_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 30.0
# MLflow retries each HTTP request 7 times with a factor-2 backoff and a 120 s timeout by default
# (about 4 minutes per call against a dead server). The outbox retries on its own; these bound
# the start-up calls and each try. Set them in the environment to override.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
# MlflowException codes worth trying again (the server or the network); others drop the item
TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


SENDER_THREAD = "mlflow-sender"


def _not_from_the_sender(record: logging.LogRecord) -> bool:
    return record.threadName != SENDER_THREAD


# urllib3 logs each retry of each request: the sender's outage is one warning of ours instead
logging.getLogger("urllib3.connectionpool").addFilter(_not_from_the_sender)


class TrackingUnavailable(RuntimeError):
    """The tracking URI cannot be reached: a one-line error that says how to run without it."""


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def run_uri(tracking_uri: str | None, configured: str, run_dir: Path) -> str:
    """--tracking-uri, else tracking.uri (`configured`), else the run dir's own store."""
    return tracking_uri or configured or default_uri(run_dir)


def bound_http_retries() -> None:
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


def check_reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connection to an http(s) tracking server, without MLflow's retries; other stores
    (sqlite, files) are local. Raises TrackingUnavailable naming the URI."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({why}); start it, pass another "
            f"--tracking-uri, or run without tracking: tracking.enabled=false"
        ) from None


def _reason(err: BaseException) -> str:
    """The short why of an MLflow failure ("Connection refused"), not urllib3's whole chain."""
    text = str(err)
    m = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return m.group(1).strip() if m else text.splitlines()[0][:200] if text else type(err).__name__


def _transient(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return not isinstance(err, MlflowException) or err.error_code in TRANSIENT


def _held_steps(client, run_id: str) -> dict[str, int]:
    """{metric key: the highest step the run holds}: MLflow's latest value of a key is the one at
    its largest step (what its SystemMetricsMonitor reads too; no whole history fetched)."""
    run = client.get_run(run_id)
    return {m.key: m.step for m in run.data._metric_objs}


def _read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECORD_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as err:
        log.warning("ignoring %s: %s", path, err)
        return {}


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / RECORD_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError as err:  # a full disk: the run goes on, sync will not know what is pending
        log.warning("could not write %s: %s", path, err)


def _journal_rows(path: Path):
    """(step, {key: float}) per row of a metrics.jsonl; rows cut short by a crash are skipped."""
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            yield step, {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class _Outbox:
    """What is still to send to one MLflow run, and the sending. The tracker's thread calls
    send_next(); sync_run_dir calls it in the foreground."""

    def __init__(self, client, run_id: str, journal: Path | None, resumed: bool):
        self.client, self.run_id, self.journal = client, run_id, journal
        self.items: collections.deque = collections.deque()  # (kind, payload), in order
        self.system: collections.deque = collections.deque(maxlen=SYSTEM_SAMPLES)
        self.metric_rows = 0
        self.lost_rows = 0  # dropped with no journal to replay them from
        self.replay = journal is not None and resumed  # rows of earlier sessions MLflow may lack
        self.replays_asked = 0  # a replay asked for while one runs is run again
        self.held: dict[str, int] | None = None if resumed else {}
        self.system_base = 0  # system-metric steps continue after those the run holds
        self.sent = self.skipped = 0
        self.lock = threading.Condition()

    # -- filling (any thread)
    def put(self, kind: str, payload: Any) -> None:
        with self.lock:
            if kind == "metrics":
                if self.metric_rows >= OUTBOX_ROWS:
                    if self.journal is not None:
                        self.replay = True  # the row is in the journal: sent from there later
                        self.replays_asked += 1
                        self.lock.notify()
                        return
                    self._drop_oldest_metrics()
                self.metric_rows += 1
            self.items.append((kind, payload))
            self.lock.notify()

    def put_system(self, step: int, metrics: dict[str, float]) -> None:
        with self.lock:
            self.system.append((step, metrics))
            self.lock.notify()

    def _drop_oldest_metrics(self) -> None:
        for i, (kind, _) in enumerate(self.items):
            if kind == "metrics":
                del self.items[i]
                self.metric_rows -= 1
                self.lost_rows += 1
                return

    def empty(self) -> bool:
        return not (self.items or self.system or self.replay)

    # -- sending (one thread at a time)
    def send_next(self) -> None:
        """Send the next piece; raises on failure (it stays queued)."""
        if self.held is None:
            held = _held_steps(self.client, self.run_id)
            system = [s for k, s in held.items() if k.startswith("system/")]
            self.system_base = max(system) + 1 if system else 0
            self.held = {k: s for k, s in held.items() if not k.startswith("system/")}
        if self.replay:  # first: the journal is complete, the queue then only holds what it has
            with self.lock:
                asked = self.replays_asked
            self._replay()
            with self.lock:
                self.replay = self.replays_asked != asked
            return
        with self.lock:
            item = self.items[0] if self.items else None
            sample = self.system[0] if item is None and self.system else None
        if item is not None:
            self._send(*item)
            with self.lock:
                if self.items and self.items[0] is item:
                    self.items.popleft()
                    self.metric_rows -= item[0] == "metrics"
        elif sample is not None:
            from mlflow.entities import Metric

            step, metrics = sample
            now = int(time.time() * 1000)
            self._log_metrics([Metric(k, v, now, self.system_base + step) for k, v in metrics.items()], dedupe=False)
            with self.lock:
                if self.system and self.system[0] is sample:
                    self.system.popleft()

    def _send(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Param

        if kind == "metrics":
            self._log_metrics(payload, dedupe=self.journal is not None)
        elif kind == "params":
            items = [Param(k, str(v)) for k, v in payload.items()]
            for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_CALL])
        elif kind == "tags":
            for k, v in payload.items():
                self.client.set_tag(self.run_id, k, str(v))
        elif kind == "artifact":
            if Path(payload).exists():
                self.client.log_artifact(self.run_id, payload)
            else:
                log.warning("MLflow run %s: artifact %s no longer exists, not sent", self.run_id, payload)
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=payload)

    def _log_metrics(self, metrics: list, dedupe: bool) -> None:
        # A retry resends the same Metric objects (same timestamps): a server whose reply was lost
        # stores them once (the SQL store's key is key, timestamp, step, value).
        if dedupe:  # one value per step: what the run holds stays
            fresh = [m for m in metrics if m.step > self.held.get(m.key, -math.inf)]
            self.skipped += len(metrics) - len(fresh)
            metrics = fresh
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            chunk = metrics[i : i + MAX_METRICS_PER_CALL]
            self.client.log_batch(self.run_id, metrics=chunk)
            self.sent += len(chunk)
            if dedupe:
                for m in chunk:
                    self.held[m.key] = max(self.held.get(m.key, m.step), m.step)

    def _replay(self) -> None:
        """The journal's rows the run lacks, in order, in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch: list = []
        for step, values in _journal_rows(self.journal):
            batch += [Metric(k, v, now, step) for k, v in values.items()]
            if len(batch) >= MAX_METRICS_PER_CALL:
                self._log_metrics(batch, dedupe=True)
                batch = []
        self._log_metrics(batch, dedupe=True)

    def pending(self) -> dict[str, Any]:
        """What finish() leaves for sync: params, tags, artifacts, status (metrics: the journal)."""
        with self.lock:
            items = list(self.items)
        out: dict[str, Any] = {
            "params": {},
            "tags": {},
            "artifacts": [],
            "status": None,
            "metric_rows": sum(k == "metrics" for k, _ in items) + (self.lost_rows if self.journal is None else 0),
        }
        for kind, payload in items:
            if kind in ("params", "tags"):
                out[kind].update(payload)
            elif kind == "artifact" and payload not in out["artifacts"]:
                out["artifacts"].append(payload)
            elif kind == "status":
                out["status"] = payload
        return out

    def load_pending(self, pending: dict[str, Any], with_status: bool) -> None:
        for kind in ("params", "tags"):
            if pending.get(kind):
                self.put(kind, pending[kind])
        for path in pending.get("artifacts", []):
            self.put("artifact", path)
        if with_status and pending.get("status"):
            self.put("status", pending["status"])


class Tracker:
    """No-op unless `enabled` (rank 0 with tracking on). `journal`: the run's metrics.jsonl, from
    which missing steps are replayed (module docstring)."""

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str = "",
        run_id: str | None = None,
        system_metrics_s: float = 10.0,
        journal: Path | None = None,
    ):
        self.enabled = enabled
        self.uri = uri
        self.run_id: str | None = None
        self.run_dir = Path(run_dir)
        self._thread: threading.Thread | None = None
        self._system_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the sender's backoff early (finish)
        self._system_stop = threading.Event()
        if not enabled:
            return
        bound_http_retries()
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self._create_run(experiment, self.run_dir, run_name)
        self.experiment = experiment
        self.journal = journal
        self._outbox = _Outbox(self.client, self.run_id, journal, resumed=run_id is not None)
        previous = _read_record(self.run_dir)
        if previous.get("run_id") == self.run_id:  # what the last session could not send
            self._outbox.load_pending(previous.get("pending", {}), with_status=False)
        self._record(None)
        self._outage_since: float | None = None
        self._tries = self._last_failed_try = 0  # numbered: finish() knows a try it woke failed
        self._thread = threading.Thread(target=self._send_loop, name=SENDER_THREAD, daemon=True)
        self._thread.start()
        if system_metrics_s > 0:  # CPU, memory, disk, network (and GPU where present)
            self._system_thread = threading.Thread(
                target=self._sample_system, args=(system_metrics_s,), name="mlflow-system-metrics", daemon=True
            )
            self._system_thread.start()

    def _create_run(self, experiment: str, run_dir: Path, run_name: str) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:"):  # keep artifacts in the run dir, not in ./mlruns of the cwd
                artifacts = (run_dir / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        return self.client.create_run(exp_id, run_name=run_name or None).info.run_id

    def _record(self, pending: dict[str, Any] | None) -> None:
        _write_record(
            self.run_dir,
            {
                "uri": self.uri,
                "run_id": self.run_id,
                "experiment": self.experiment,
                "journal": self.journal.name if self.journal else None,
                "pending": pending or {},
            },
        )

    # -- the background threads
    def _send_loop(self) -> None:
        box, backoff = self._outbox, 1.0
        while not self._stop.is_set():
            with box.lock:
                while box.empty() and not self._stop.is_set():
                    box.lock.wait()
            if self._stop.is_set():
                return
            self._tries += 1
            try:
                box.send_next()
            except Exception as err:  # noqa: BLE001 - nothing of MLflow's may reach training
                if not _transient(err):
                    self._drop_head(err)
                    continue
                self._last_failed_try = self._tries
                if self._outage_since is None:
                    self._outage_since = time.time()
                    log.warning(
                        "MLflow at %s unreachable (%s); training goes on, metrics stay in the run "
                        "directory and are sent when it is back (or by `hicmae-dist sync %s`)",
                        self.uri,
                        _reason(err),
                        self.run_dir,
                    )
                self._wake.wait(backoff)  # new items do not shorten it; finish() does
                self._wake.clear()
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            if self._outage_since is not None:
                log.warning(
                    "MLflow at %s is back after %.0f s; catching up", self.uri, time.time() - self._outage_since
                )
                self._outage_since = None

    def _drop_head(self, err: Exception) -> None:
        box = self._outbox
        with box.lock:
            if box.held is None:  # the run's steps cannot be read: send all, MLflow may repeat some
                box.held, box.replay = {}, False
                what = "reading the run's metrics"
            elif box.replay:
                box.replay = False
                what = "journal replay"
            elif box.items:
                what = box.items.popleft()[0]
                box.metric_rows -= what == "metrics"
            else:
                what = "system metrics"
                box.system.clear()
        log.warning("MLflow run %s refused %s, dropped: %s", self.run_id, what, _reason(err))

    def _sample_system(self, interval_s: float) -> None:
        """MLflow's CPU/disk/network/GPU monitors, sampled here and sent through the outbox (its own
        monitor thread would block on, then give up at, the first outage)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri)
        except Exception as err:  # noqa: BLE001 - e.g. psutil missing
            log.warning("no system metrics: %s", err)
            return
        step = 0
        while not self._system_stop.wait(interval_s):
            try:
                monitor.collect_metrics()
                metrics = monitor.aggregate_metrics()
                for m in monitor.monitors:
                    m.clear_metrics()
            except Exception as err:  # noqa: BLE001
                log.warning("system metrics stopped: %s", err)
                return
            self._outbox.put_system(step, {f"system/{k}": float(v) for k, v in metrics.items()})
            step += 1

    # -- the API
    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._outbox.put("params", dict(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags; mlflow.parentRunId nests this run under another in the UI."""
        if self.enabled:
            self._outbox.put("tags", dict(tags))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queued for the sender; returns at once."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._outbox.put("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def flush(self) -> None:
        """Kept for callers; the sender sends as soon as it can."""

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            self._outbox.put("artifact", str(Path(path).resolve()))

    def finish(self, status: str | None = "FINISHED", wait_s: float = FINISH_WAIT_S) -> None:
        """Stop the system metrics, queue `status` (None leaves the run RUNNING: a requeued job
        continues it) and let the outbox drain for up to wait_s; what is left is written to
        RUN_DIR/tracking.json for `hicmae-dist sync`, with one warning."""
        if not self.enabled or self._thread is None:
            return
        box = self._outbox
        self._system_stop.set()
        if self._system_thread is not None:
            self._system_thread.join(timeout=2.0)  # sampling only: the sender holds its samples
        if status is not None:
            box.put("status", status)
        self._wake.set()  # one more try now, not after the backoff
        woken_after = self._tries  # a try numbered above this one started after the wake
        deadline = time.monotonic() + wait_s
        with box.lock:  # until sent, the time is up, or the server is down and a try since failed
            while (
                not box.empty()
                and time.monotonic() < deadline
                and self._thread.is_alive()
                and not (self._outage_since is not None and self._last_failed_try > woken_after)
            ):
                box.lock.wait(0.1)
        self._stop.set()
        self._wake.set()
        with box.lock:
            box.lock.notify_all()
        self._thread.join(timeout=1.0)  # a request in flight keeps going in its daemon thread
        self._thread = None
        # what a request in flight may still complete is sent again by sync: idempotent, or skipped
        pending = box.pending()
        if box.replay or any(pending[k] for k in ("params", "tags", "artifacts", "status", "metric_rows")):
            self._record(pending)
            left = [
                f"{pending['metric_rows']} metric rows" if pending["metric_rows"] else "",
                "missing metric rows" if box.replay else "",
                f"{len(pending['artifacts'])} artifacts" if pending["artifacts"] else "",
                f"status {pending['status']}" if pending["status"] else "",
            ]
            log.warning(
                "MLflow at %s did not take everything (%s left); the run directory keeps them: "
                "`hicmae-dist sync %s` sends them",
                self.uri,
                ", ".join(x for x in left if x) or "params/tags",
                self.run_dir,
            )
        else:
            self._record(None)


def end_status(err: BaseException) -> str:
    """The status of a run that an exception ended: KILLED for Ctrl-C, FAILED otherwise."""
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"


def finish_run(run_dir: Path, uri: str, run_id: str, status: str) -> bool:
    """End an MLflow run from outside the trainer (the Slurm job: KILLED, FINISHED): one bounded
    try; on failure a warning, and the status waits in RUN_DIR/tracking.json for sync."""
    bound_http_retries()
    try:
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
        sent = True
    except Exception as err:  # noqa: BLE001 - the job's own outcome matters more
        log.warning(
            "could not mark MLflow run %s %s at %s (%s); `hicmae-dist sync %s` will",
            run_id,
            status,
            uri,
            _reason(err),
            run_dir,
        )
        sent = False
    record = _read_record(Path(run_dir))
    if record.get("run_id") == run_id:
        record.setdefault("pending", {})["status"] = None if sent else status
        _write_record(Path(run_dir), record)
    return sent


def sync_run_dir(run_dir: Path, uri: str | None = None) -> list[str]:
    """Send what the runs recorded under run_dir (its tracking.json and its folds') did not: the
    journal's missing steps, params, tags, artifacts, the final status. Returns one line per run.
    Raises TrackingUnavailable / FileNotFoundError with one line."""
    run_dir = Path(run_dir)
    records = [p.parent for p in [run_dir / RECORD_FILE, *sorted(run_dir.glob(f"*/{RECORD_FILE}"))] if p.exists()]
    if not records:
        raise FileNotFoundError(
            f"{run_dir / RECORD_FILE} not found: not a run directory tracked in MLflow (or tracking was off)"
        )
    bound_http_retries()
    from mlflow.tracking import MlflowClient

    lines = []
    for d in records:
        record = _read_record(d)
        target = uri or record["uri"]
        check_reachable(target)
        journal = d / record["journal"] if record.get("journal") else None
        box = _Outbox(MlflowClient(tracking_uri=target), record["run_id"], journal, resumed=True)
        box.load_pending(record.get("pending", {}), with_status=True)
        while not box.empty():
            box.send_next()  # a failure raises: nothing recorded is lost, sync again
        _write_record(d, {**record, "pending": {}})
        status = record.get("pending", {}).get("status")
        lines.append(
            f"{d}: run {record['run_id']} at {target}: {box.sent} metric values sent, {box.skipped} "
            f"already there" + (f", status {status}" if status else "")
        )
    return lines
