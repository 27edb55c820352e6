"""MLflow tracking: one run per job, written by rank 0 only, metrics sent in batches.

The store defaults to an sqlite file under the run directory (artifacts beside it), so a run
directory holds everything; `uri` points at a server (`http://127.0.0.1:5000`) instead. The run
id is kept in the checkpoint, so a resumed job continues the same MLflow run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class Tracker:
    """No-op unless `enabled` (rank 0 with tracking on)."""

    def __init__(self, enabled: bool, uri: str, experiment: str, run_dir: Path,
                 run_name: str = "", run_id: str | None = None, system_metrics_s: float = 10.0):
        self.enabled = enabled
        self.uri = uri
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._system = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self._create_run(experiment, run_dir, run_name)
        if system_metrics_s > 0:  # CPU, memory, disk, network (and GPU where present), in a thread
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=system_metrics_s,
                                                resume_logging=run_id is not None, tracking_uri=uri)
            self._system.start()

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

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_CALL])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags; mlflow.parentRunId nests this run under another in the UI."""
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queued; sent by flush()."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if not self.enabled:
            return
        while self._pending:
            chunk, self._pending = self._pending[:MAX_METRICS_PER_CALL], self._pending[MAX_METRICS_PER_CALL:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str | None = "FINISHED") -> None:
        """Flush and stop the system-metrics thread; status None leaves the run RUNNING (a
        requeued job continues it)."""
        if not self.enabled:
            return
        self.flush()
        if self._system is not None:
            self._system.finish()
            self._system = None
        if status is not None:
            self.client.set_terminated(self.run_id, status=status)
