"""Fine-tuning end to end through the CLI: a pretrained tiny model against the same fine-tune
from scratch over 3 synthetic folds, retrieval and the linear probe, and fine-tuning from an
authors'-format checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hicmae_dist.cli import EXIT_INTERRUPTED
from hicmae_dist.data import downstream as ds
from hicmae_dist.data.synth import write_downstream
from hicmae_dist.train.export import checkpoint_weights
from tests.support import CAVMAE_TINY_MODEL

CLI = [sys.executable, "-m", "hicmae_dist.cli"]


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    """48 clips of 4 hidden classes from 12 subjects in 3 subject-independent folds (16 train /
    16 val / 16 test each)."""
    out = tmp_path_factory.mktemp("downstream") / "set"
    write_downstream(out, 48, num_classes=4, num_subjects=12, folds=3, seed=1, workers=2, progress=False)
    return out


def _run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(CLI + cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _finetune(splits: Path, run_dir: Path, env: dict, *args: str) -> dict:
    """`hicmae-dist finetune` (preset finetune-tiny-cpu unless args give --preset)."""
    preset = [] if "--preset" in args else ["--preset", "finetune-tiny-cpu"]
    _run(["finetune", *preset, "--splits", str(splits), "--run-dir", str(run_dir), "--no-progress", *args], env)
    return json.loads((run_dir / "summary.json").read_text())


def test_finetune_from_an_authors_format_checkpoint(downstream, cli_env, tmp_path):
    """HiCMAE-T fine-tuned on 6 classes, as the authors release it ({'model': state dict} with
    their key names, built from their key list): converted on the fly, every tensor but the
    6-class head loaded, the 4-class head initialised, one short fold runs."""
    from hicmae_dist.models import build_finetune_model
    from hicmae_dist.models.convert import load_weights
    from tests.models.test_convert import random_state

    ckpt = tmp_path / "hicmae_tiny_finetuned.pth"
    torch.save({"model": random_state("hicmae_finetune_tiny")}, ckpt)
    run_dir = tmp_path / "ft"
    summary = _finetune(
        _small_splits(downstream, tmp_path / "splits"),
        run_dir,
        cli_env,
        "--pretrained",
        str(ckpt),
        "finetune.num_outputs=4",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "data.batch_size=2",
        "finetune.test_num_segment=1",
        "finetune.test_num_crop=1",
    )
    result = json.loads((run_dir / "fold01" / "results.json").read_text())
    weights = load_weights(ckpt)
    assert weights.cfg.width == 256 and weights.kind == "finetune" and weights.num_classes == 6
    with torch.device("meta"):
        tensors = len(build_finetune_model(weights.cfg, 4).state_dict())
    assert result["load_report"] == {"loaded": tensors - 2, "initialised": 2, "dropped": 2}  # head weight, bias
    assert 0.0 <= summary["best"]["war"]["mean"] <= 1.0 and len(result["best"]["confusion"]) == 4
    fold_model = yaml.safe_load((run_dir / "fold01" / "config.yaml").read_text())["model"]
    assert (fold_model["width"], fold_model["heads"]) == (256, 4)  # the model trained, not the preset's


def _small_splits(downstream: Path, out: Path, folds=(1,), train: int = 4, val: int = 2, test: int = 2) -> Path:
    """The first clips of each split of the given folds (fast runs), as out/splitNN/*.csv."""
    for fold in folds:
        files = ds.fold_files(downstream / "splits", fold)
        for name, n in (("train", train), ("val", val), ("test", test)):
            ds.write_annotations(out / f"split{fold:02d}" / f"{name}.csv", ds.read_annotations(files[name])[:n])
    return out


def _mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "hicmae-dist"]
    return client.search_runs([exp.experiment_id])


def test_three_fold_protocol_table_mlflow_and_rerun(downstream, cli_env, tmp_path):
    run_dir = tmp_path / "kfold"
    splits = _small_splits(downstream, tmp_path / "splits", folds=(1, 2, 3), train=4, val=2, test=3)
    args = [
        "--folds",
        "1-3",
        "--from-scratch",
        "finetune.num_outputs=4",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "data.batch_size=4",
        "data.num_workers=0",
    ]
    summary = _finetune(splits, run_dir, cli_env, *args)
    assert summary["folds"] == [1, 2, 3]
    for which in ("last", "best"):
        for metric in ("uar", "war", "weighted_f1"):
            values = summary[which][metric]["per_fold"]
            assert len(values) == 3 and summary[which][metric]["mean"] == pytest.approx(sum(values) / 3)
    table = (run_dir / "results.md").read_text()
    for fold in (1, 2, 3):
        assert f"| last epoch | {fold} |" in table and f"| best val uar | {fold} |" in table
        result = json.loads((run_dir / f"fold{fold:02d}" / "results.json").read_text())
        assert result["val_split"].endswith(f"split{fold:02d}/val.csv") and result["test_views"] == 2
        assert (run_dir / f"fold{fold:02d}" / "confusion_best.png").stat().st_size > 1000
        rows = (run_dir / f"fold{fold:02d}" / "predictions_last.csv").read_text().splitlines()
        assert len(rows) == 1 + 3  # every test clip, once
    assert table.count("mean ± std") == 2
    runs = _mlflow_runs(run_dir)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["fold"] for r in children) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {"test_best_uar", "test_last_war", "val_uar", "train_loss"} <= set(children[0].data.metrics)
    assert {"best_uar_mean", "best_uar_std", "last_war_mean"} <= set(parent.data.metrics)
    # a rerun finds every fold done: nothing trained again, the same table
    before = (run_dir / "fold02" / "results.json").stat().st_mtime_ns
    again = _run(
        [
            "finetune",
            "--preset",
            "finetune-tiny-cpu",
            "--splits",
            str(splits),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *args,
        ],
        cli_env,
    )
    assert (run_dir / "fold02" / "results.json").stat().st_mtime_ns == before
    assert "| best val uar | mean ± std |" in again.stdout


def test_regression_with_ccc_loss(cli_env, tmp_path):
    out = tmp_path / "reg"
    write_downstream(
        out, 12, num_classes=4, num_subjects=6, folds=3, seed=2, regression=True, workers=2, progress=False
    )
    run_dir = tmp_path / "ft"
    summary = _finetune(
        out / "splits",
        run_dir,
        cli_env,
        "--from-scratch",
        "finetune.task=regression",
        "finetune.num_outputs=2",
        "finetune.regression_loss=ccc",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "data.batch_size=4",
        "finetune.test_num_crop=1",
    )
    result = json.loads((run_dir / "fold01" / "results.json").read_text())
    assert {"ccc_d0", "ccc_d1", "pcc_d0", "mse_d1", "ccc"} <= set(result["last"])
    assert -1.0 <= summary["best"]["ccc"]["mean"] <= 1.0 and "| best val ccc |" in (run_dir / "results.md").read_text()


def test_pretrained_features_beat_random_ones_and_retrieval_runs(two_minute_run, downstream, cli_env, tmp_path):
    """The two-minute pretraining against a random encoder of the same size, frozen, in the
    linear probe of fold 1 (16 train / 16 val / 16 test clips of 4 hidden classes, chance 0.25;
    measured 0.75 against 0.50 with the seeded random encoder); then retrieval over the 48 clips."""
    run_dir, r = two_minute_run
    assert r.returncode == 0, r.stderr[-3000:]
    probe = {}
    for name, init in (("pretrained", ["--pretrained", str(run_dir)]), ("random", ["--from-scratch"])):
        out = tmp_path / f"probe_{name}.json"
        _run(
            [
                "eval",
                "linear-probe",
                *init,
                "--preset",
                "finetune-tiny-cpu",
                "--splits",
                str(downstream / "splits"),
                "--fold",
                "1",
                "--no-progress",
                "--json",
                str(out),
                "finetune.num_outputs=4",
            ],
            cli_env,
        )
        probe[name] = json.loads(out.read_text())
    assert probe["pretrained"]["pretrained_tensors"] > 100 and probe["random"]["pretrained_tensors"] == 0
    assert probe["pretrained"]["test"]["war"] >= 0.5  # well above chance
    assert probe["pretrained"]["test"]["war"] > probe["random"]["test"]["war"], probe

    everything = tmp_path / "all.csv"
    ds.write_annotations(
        everything, sum((ds.read_annotations(downstream / "splits" / f"split0{f}" / "test.csv") for f in (1, 2, 3)), [])
    )
    out = tmp_path / "retrieval.json"
    _run(
        [
            "eval",
            "retrieval",
            "--weights",
            str(run_dir),
            "--annotations",
            str(everything),
            "--no-progress",
            "--json",
            str(out),
        ],
        cli_env,
    )
    result = json.loads(out.read_text())
    assert result["clips"] == 48 and result["chance_r@1"] == pytest.approx(1 / 48)
    for direction in ("video_to_audio", "audio_to_video"):
        assert 0.0 <= result[f"{direction}_r@1"] <= result[f"{direction}_r@5"] <= result[f"{direction}_r@10"] <= 1.0
        assert 1.0 <= result[f"{direction}_median_rank"] <= 48.0


def test_cavmae_multimodal_finetune_with_its_head_lr(downstream, cli_env, tmp_path):
    """A narrow CAV-MAE from scratch, multimodal mode, Adam with the head at 10x: the other modes'
    LayerNorms are frozen (no gradient reaches them) and one short fold runs."""
    run_dir = tmp_path / "cav"
    summary = _finetune(
        _small_splits(downstream, tmp_path / "splits"),
        run_dir,
        cli_env,
        *CAVMAE_TINY,
        "finetune.epochs=1",
    )
    result = json.loads((run_dir / "fold01" / "results.json").read_text())
    assert result["test_views"] == 10  # CAV-MAE's 10-frame test ensemble
    assert summary["folds"] == [1] and len(result["last"]["confusion"]) == 4


CAVMAE_TINY = [
    "--preset",
    "finetune-cavmae",
    "--from-scratch",
    "finetune.num_outputs=4",
    "finetune.warmup_epochs=0",
    "data.batch_size=2",
    "data.num_workers=0",
    "train.bf16=false",
    *CAVMAE_TINY_MODEL,
]


def test_cavmae_eval_modes_and_weight_average(downstream, cli_env, tmp_path):
    """3 epochs, one checkpoint kept (train.keep_checkpoints=1) yet epochs 0-1 averaged: their
    checkpoints outlive the retention; the test split in the training mode and both
    missing-modality modes, with the last, the selected and the averaged weights."""
    run_dir = tmp_path / "cav"
    modes = ("audio_missing_video", "video_missing_audio")
    summary = _finetune(
        _small_splits(downstream, tmp_path / "splits"),
        run_dir,
        cli_env,
        *CAVMAE_TINY,
        "finetune.epochs=3",
        "train.keep_checkpoints=1",
        "finetune.weight_average=[0, 1]",
        "--eval-modes",
        ",".join(modes),
    )
    fold = run_dir / "fold01"
    result = json.loads((fold / "results.json").read_text())
    selections = [f"{w}{m}" for w in ("last", "best", "averaged") for m in ("", *(f"_{m}" for m in modes))]
    assert result["selections"] == summary["selections"] == selections and result["averaged_epochs"] == [0, 1]
    for name in selections:
        assert 0.0 <= result[name]["war"] <= 1.0 and len(result[name]["confusion"]) == 4
        assert len((fold / f"predictions_{name}.csv").read_text().splitlines()) == 1 + 2  # every test clip
    # the kept checkpoints: epochs 0 and 1 (averaged) and the newest (epoch 2)
    states = [json.loads((c / "state.json").read_text()) for c in sorted((fold / "checkpoints").glob("step*"))]
    assert [(s["epoch"], s["batch_in_epoch"]) for s in states] == [(1, 0), (2, 0), (3, 0)]
    # stage 0 (the preset's): the module weights of epochs 0 and 1, averaged tensor by tensor
    epoch0, epoch1 = (checkpoint_weights(c) for c in sorted((fold / "checkpoints").glob("step*"))[:2])
    averaged = torch.load(fold / "averaged.pth", weights_only=True)
    assert set(averaged) == set(epoch0) == set(torch.load(fold / "best.pth", weights_only=True))
    for k, v in averaged.items():
        torch.testing.assert_close(v, (epoch0[k] + epoch1[k]) / 2, rtol=0, atol=1e-7)
    assert any(not torch.equal(epoch0[k], epoch1[k]) for k in averaged)  # the epochs trained apart
    table = (run_dir / "results.md").read_text()
    assert "| epochs 0-1 averaged | 1 |" in table and "| best val uar, audio_missing_video mode | 1 |" in table


def test_eval_modes_are_cavmae_only_and_named():
    from hicmae_dist.config import ConfigError
    from hicmae_dist.train.finetune.fold import _check_eval_modes

    with pytest.raises(ConfigError, match="only CAV-MAE has test modes; this model is hicmae"):
        _check_eval_modes(["audio_missing_video"], "hicmae")
    with pytest.raises(ConfigError, match=r"unknown mode\(s\) \['audio_only'\]"):
        _check_eval_modes(["audio_only"], "cavmae")
    _check_eval_modes([], "hicmae")


def test_sigterm_mid_epoch_then_rerun_continues_the_fold(downstream, cli_env, tmp_path):
    """SIGTERM saves at the next step (inside an epoch); the same command resumes at that batch:
    every step once, one MLflow run for the fold, the results written at the end."""
    import signal
    import time

    splits = _small_splits(downstream, tmp_path / "splits", train=6, val=2, test=2)
    run_dir = tmp_path / "ft"
    cmd = CLI + [
        "finetune",
        "--preset",
        "finetune-tiny-cpu",
        "--splits",
        str(splits),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--from-scratch",
        "finetune.num_outputs=4",
        "finetune.epochs=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "finetune.test_num_segment=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    latest = run_dir / "fold01" / "checkpoints" / "latest"
    # Epoch 0's history row is written just before its checkpoint, and the stop is agreed at the next
    # step, after that save: signalling on the row (not on `latest`) keeps the save's time as margin,
    # so a loaded machine cannot run through epoch 1 before the signal lands.
    epoch0_done = run_dir / "fold01" / "history.json"
    deadline = time.time() + 600
    while not epoch0_done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]  # saved, not finished
    assert "interrupted in fold 1" in out
    state = json.loads((run_dir / "fold01" / "checkpoints" / latest.read_text() / "state.json").read_text())
    assert (
        state["epoch"] == 1 and 0 < state["batch_in_epoch"] < 3 and not (run_dir / "fold01" / "results.json").exists()
    )
    # other split files (one training label edited) do not continue this fold's checkpoint
    edited = tmp_path / "edited-splits"
    shutil.copytree(splits, edited)
    train_csv = edited / "split01" / "train.csv"
    rows = ds.read_annotations(train_csv)
    rows[0] = dataclasses.replace(rows[0], label=((rows[0].label[0] + 1) % 4,))
    ds.write_annotations(train_csv, rows)
    at = cmd.index("--splits") + 1
    r = subprocess.run(cmd[:at] + [str(edited)] + cmd[at + 1 :], capture_output=True, text=True, env=cli_env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("hicmae-dist finetune:")]
    assert "written on the splits train 6 / val 2 / test 2 clips under" in line and "another data set" in line, line

    r = _run(cmd[3:], cli_env)
    assert "| last epoch | 1 |" in r.stdout
    history = json.loads((run_dir / "fold01" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and history[-1]["step"] == 6  # 2 epochs x 3 steps, once
    runs = _mlflow_runs(run_dir)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # the protocol run and the fold's
