"""The run directory's layout: the one place that knows where a run keeps its files.

    <run_dir>/config.yaml              the resolved config (pretraining and each fold)
    <run_dir>/deepspeed.json           DeepSpeed's config (pretraining)
    <run_dir>/metrics.jsonl            one row per log window (pretraining; the tracker's journal)
    <run_dir>/summary.json             the closing summary (pretraining; the protocol's table data)
    <run_dir>/losses.png               the loss curves (pretraining)
    <run_dir>/checkpoints/latest       the tag of the newest complete checkpoint
    <run_dir>/checkpoints/<tag>/       one checkpoint (its format: train/checkpoint.py) + state.json
    <run_dir>/checkpoints/bad/         checkpoints that failed verification, moved aside
    <run_dir>/checkpoints/universal/   checkpoints converted for another world size
    <run_dir>/checkpoints/.tmp-*       a save in flight (or one a crash left)
    fine-tuning: <run_dir>/protocol.json, results.md, summary.json and one sub-run-dir per fold,
    foldNN/ (config.yaml, checkpoints/, history.json, best.pth, averaged.pth, results.json,
    predictions_*.csv, confusion_*.png)

Reads only files (no torch, no DeepSpeed): `submit` and `jobs` use it on the login node.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"  # inside a checkpoint: our state besides weights and optimizer
TMP_PREFIX = ".tmp-"


class RunDir:
    """Paths and reads of one run directory (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # --- files of a run -------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    deepspeed_config = property(lambda self: self.path / "deepspeed.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary = property(lambda self: self.path / "summary.json")
    losses_plot = property(lambda self: self.path / "losses.png")
    slurm_logs = property(lambda self: self.path / "slurm")  # submit's default --log-dir

    # --- fine-tuning: the protocol's files and one sub-run-dir per fold ---------------------------
    protocol = property(lambda self: self.path / "protocol.json")
    results_table = property(lambda self: self.path / "results.md")
    results = property(lambda self: self.path / "results.json")
    history = property(lambda self: self.path / "history.json")
    best_weights = property(lambda self: self.path / "best.pth")
    averaged_weights = property(lambda self: self.path / "averaged.pth")  # finetune.weight_average

    def fold(self, fold: int) -> RunDir:
        return RunDir(self.path / f"fold{fold:02d}")

    def predictions(self, which: str) -> Path:
        return self.path / f"predictions_{which}.csv"

    def confusion_plot(self, which: str) -> Path:
        return self.path / f"confusion_{which}.png"

    def confusion_plots(self) -> list[Path]:
        return sorted(self.path.glob("confusion_*.png"))

    # --- checkpoints ------------------------------------------------------------------------------
    checkpoints = property(lambda self: self.path / "checkpoints")
    latest_pointer = property(lambda self: self.checkpoints / "latest")
    bad_checkpoints = property(lambda self: self.checkpoints / "bad")
    universal_checkpoints = property(lambda self: self.checkpoints / "universal")

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a state.json, oldest first."""
        return sorted(p for p in self.checkpoints.glob("step*") if (p / STATE_FILE).exists())

    def older_checkpoints(self, tag: str) -> list[Path]:
        """The checkpoint directories before `tag`, newest first (resume's fall-backs)."""
        return sorted((p for p in self.checkpoints.glob("step*") if p.is_dir() and p.name < tag), reverse=True)

    def latest_tag(self) -> str | None:
        """What `latest` names (unverified), or None when the run has no checkpoint."""
        pointer = self.latest_pointer
        return pointer.read_text().strip() if pointer.exists() else None

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or None when the run has none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path = self.checkpoint(tag)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(
                f"{self.latest_pointer} names {path.name}, which has no {STATE_FILE}: "
                f"the checkpoint directory was modified by hand"
            )
        return path

    @staticmethod
    def state_file(ckpt: Path) -> Path:
        return ckpt / STATE_FILE

    @staticmethod
    def read_state(ckpt: Path) -> dict[str, Any]:
        """A checkpoint's state.json (no weights)."""
        return json.loads((ckpt / STATE_FILE).read_text())

    # --- the checks before a run starts or resumes (the trainer's and submit's) -------------------
    def refuse_existing(self, resume: str) -> str | None:
        """With resume "never": why this run dir cannot start (it holds a checkpoint), else None."""
        tag = self.latest_tag()
        if resume == "never" and tag is not None:
            return f"{self.path} already holds checkpoint {tag}; use --resume auto or a new --run-dir"
        return None

    def config_change(self, ckpt: Path, saved: dict[str, Any], config_hash: str) -> str | None:
        """Why `ckpt` (state `saved`) cannot continue a run of `config_hash`, else None."""
        if saved.get("config_hash") == config_hash:
            return None
        return (
            f"checkpoint {ckpt} was written with config hash {saved.get('config_hash')}, this run has "
            f"{config_hash}: the model, data or optimiser settings changed (compare {self.config})"
        )

    # --- what `hicmae-dist jobs` shows ------------------------------------------------------------
    def metrics_rows(self, upto_step: int) -> list[dict[str, Any]]:
        """metrics.jsonl rows up to `upto_step` (a resume drops the rows of the lost steps)."""
        return [r for r in self._metrics_lines() if r["step"] <= upto_step]

    def _metrics_lines(self) -> list[dict[str, Any]]:
        """metrics.jsonl's rows; a line torn by a crash mid-write is skipped (and logged)."""
        if not self.metrics.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is torn (a crash mid-write?): skipped", self.metrics, number)
        return rows

    def progress(self) -> dict[str, Any]:
        """Step, last loss and MLflow run, from the files only (a crash's torn lines skipped)."""
        info: dict[str, Any] = {"step": None, "loss": None, "mlflow_run_id": None, "checkpoint_step": None}
        tag = self.latest_tag()
        state = _read_json(self.state_file(self.checkpoint(tag))) if tag is not None else None
        if state is not None:
            info["checkpoint_step"], info["mlflow_run_id"] = state.get("step"), state.get("mlflow_run_id")
        rows = self._metrics_lines()
        if rows:
            info["step"], info["loss"] = rows[-1].get("step"), rows[-1].get("loss")
        if info["step"] is None:
            info["step"] = info["checkpoint_step"]
        summary = _read_json(self.summary) if info["mlflow_run_id"] is None else None
        if summary is not None:
            info["mlflow_run_id"] = summary.get("mlflow_run_id")
        return info


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when it is missing or torn."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
