"""The tracker against a local sqlite store: one value per step across a resume, nothing
blocking, a one-line error for an unreachable server, and sync of what was left behind."""

import json
import socket
import time
from pathlib import Path

import pytest

from hicmae_dist.tracking import RECORD_FILE, Tracker, TrackingUnavailable, default_uri, sync_run_dir


def _journal(path: Path, rows: dict[int, float]) -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": v, "lr": 0.1 * s}) + "\n" for s, v in rows.items()))


def _history(uri: str, run_id: str, key: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    out: dict[int, list[float]] = {}
    for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_resume_from_an_older_checkpoint_sends_each_step_once(tmp_path):
    uri, journal = default_uri(tmp_path), tmp_path / "metrics.jsonl"
    first = {s: 10.0 - s for s in range(1, 7)}
    _journal(journal, first)
    t = Tracker(True, uri, "exp", tmp_path, system_metrics_s=0, journal=journal)
    for s, v in first.items():
        t.log_metrics(s, {"loss": v, "lr": 0.1 * s})
    t.finish(None)  # a crash after step 6; the checkpoint is at step 4
    run_id = t.run_id

    # the resumed job: the journal cut to the checkpoint, steps 5-8 trained again (other values)
    _journal(journal, {s: v for s, v in first.items() if s <= 4})
    t = Tracker(True, uri, "exp", tmp_path, run_id=run_id, system_metrics_s=0, journal=journal)
    for s in range(5, 9):
        with journal.open("a") as f:
            f.write(json.dumps({"step": s, "loss": 100.0 + s, "lr": 0.1 * s}) + "\n")
        t.log_metrics(s, {"loss": 100.0 + s, "lr": 0.1 * s})
    t.finish("FINISHED")
    loss = _history(uri, run_id, "loss")
    assert sorted(loss) == list(range(1, 9)) and all(len(v) == 1 for v in loss.values()), loss
    # MLflow keeps the first values it got (steps 5, 6); the new steps carry the resumed job's
    assert [loss[s][0] for s in range(1, 9)] == [9, 8, 7, 6, 5, 4, 107, 108]
    assert sorted(_history(uri, run_id, "lr")) == list(range(1, 9))
    assert json.loads((tmp_path / RECORD_FILE).read_text())["pending"] == {}


def test_a_journal_row_missing_from_mlflow_is_replayed_by_the_next_session(tmp_path):
    uri, journal = default_uri(tmp_path), tmp_path / "metrics.jsonl"
    t = Tracker(True, uri, "exp", tmp_path, system_metrics_s=0, journal=journal)
    t.log_metrics(1, {"loss": 1.0, "lr": 0.1})
    t.finish(None)
    _journal(journal, {1: 1.0, 2: 2.0, 3: 3.0})  # 2 and 3 written while the server was away
    t = Tracker(True, uri, "exp", tmp_path, run_id=t.run_id, system_metrics_s=0, journal=journal)
    t.finish("FINISHED")
    assert {s: v for s, (v,) in _history(uri, t.run_id, "loss").items()} == {1: 1.0, 2: 2.0, 3: 3.0}


def test_unreachable_server_is_one_line_naming_the_uri_within_seconds(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.time()
    with pytest.raises(TrackingUnavailable) as err:
        Tracker(True, uri, "exp", tmp_path)
    assert time.time() - start < 6
    msg = str(err.value)
    assert uri in msg and "tracking.enabled=false" in msg and "\n" not in msg
    assert not (tmp_path / RECORD_FILE).exists()


def test_finish_against_a_dead_server_returns_and_sync_sends_the_rest(tmp_path):
    """The store goes away after the run was opened (its URI now names a port nobody listens on):
    log and finish return at once / within the finish wait; sync sends everything later."""
    uri, journal = default_uri(tmp_path), tmp_path / "metrics.jsonl"
    t = Tracker(True, uri, "exp", tmp_path, system_metrics_s=0, journal=journal)
    run_id = t.run_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    from mlflow.tracking import MlflowClient

    t._outbox.client = MlflowClient(tracking_uri=dead)  # the outage
    _journal(journal, {1: 1.0, 2: 2.0})
    artifact = tmp_path / "summary.json"
    artifact.write_text("{}")
    start = time.time()
    for s in (1, 2):
        t.log_metrics(s, {"loss": float(s), "lr": 0.1 * s})
    t.log_artifact(artifact)
    assert time.time() - start < 0.5  # queued, never sent from the caller
    t.finish("FINISHED", wait_s=2)
    assert time.time() - start < 10
    pending = json.loads((tmp_path / RECORD_FILE).read_text())["pending"]
    assert pending["status"] == "FINISHED" and pending["artifacts"] == [str(artifact.resolve())]

    (line,) = sync_run_dir(tmp_path)
    assert ": 4 metric values sent, 0 already there, status FINISHED" in line, line  # 2 rows x (loss, lr)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(_history(uri, run_id, "loss")) == [1, 2]
    assert [a.path for a in client.list_artifacts(run_id)] == ["summary.json"]
    assert " 0 metric values sent" in sync_run_dir(tmp_path)[0]  # again: nothing twice


def test_the_sender_catches_up_from_the_journal_when_the_server_is_back(tmp_path, monkeypatch):
    """An outage longer than the outbox holds: rows beyond it are dropped from memory, and replayed
    from metrics.jsonl once the server answers again; every step once, in the same session."""
    from mlflow.tracking import MlflowClient

    import hicmae_dist.tracking as tracking

    monkeypatch.setattr(tracking, "OUTBOX_ROWS", 2)
    uri, journal = default_uri(tmp_path), tmp_path / "metrics.jsonl"
    t = Tracker(True, uri, "exp", tmp_path, system_metrics_s=0, journal=journal)
    live = t._outbox.client
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        t._outbox.client = MlflowClient(tracking_uri=f"http://127.0.0.1:{s.getsockname()[1]}")
    rows = {s: float(s) for s in range(1, 7)}
    for s, v in rows.items():
        _journal(journal, {k: x for k, x in rows.items() if k <= s})
        t.log_metrics(s, {"loss": v, "lr": 0.1 * s})
    assert len(t._outbox.items) == 2 and t._outbox.replay  # 4 rows left to the journal
    t._outbox.client = live  # the server is back
    t.finish("FINISHED", wait_s=60)
    loss = _history(uri, t.run_id, "loss")
    assert {s: v for s, (v,) in loss.items()} == rows
    assert MlflowClient(tracking_uri=uri).get_run(t.run_id).info.status == "FINISHED"
