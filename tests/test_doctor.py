"""`hicmae-dist doctor` on this machine, with the GPUs hidden: every CPU check passes, every GPU
check is listed as not run with its reason, both reports are written and the JSON has the
documented fields; a failing or raising check makes the exit status non-zero, the run goes on."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hicmae_dist import doctor
from hicmae_dist.ops.gather import native_available

RECORD_FIELDS = {"name", "backend", "device", "status", "reason", "summary", "seconds", "metrics"}
VERSION_FIELDS = {"python", "torch", "cuda_runtime", "driver", "nccl", "cudnn", "triton", "deepspeed", "xformers"}
CPU_CHECKS = {
    ("attention", "sdpa"),
    ("info_nce.local", "torch"),
    ("info_nce.global", "torch"),
    ("csrc", "native"),
    (f"train.fp32.{doctor.CPU_TRAIN_PRESET}", "sdpa"),
}
GPU_CHECKS = (
    {("attention", b) for b in doctor.ATTENTION_BACKENDS}
    | {("info_nce.local", "triton"), ("info_nce.global", "triton"), ("csrc", "native")}
    | {(f"train.bf16.{m}", b) for m in doctor.MODELS for b in doctor.ATTENTION_BACKENDS}
    | {("zero", "nccl"), ("bench-kernels", None), ("jpeg_decode", "nvjpeg")}
)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU-only machine, also where a GPU is
    proc = subprocess.run(
        [sys.executable, "-m", "hicmae_dist.cli", "doctor", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return out, proc


def test_exit_zero_and_both_reports(cpu_run):
    out, proc = cpu_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "doctor.json").read_text())
    assert report["schema"] == doctor.SCHEMA and report["exit_status"] == 0
    assert report["command"].startswith("hicmae-dist doctor --out ")
    assert report["hostname"] and report["created"] and report["seconds"] > 0
    assert VERSION_FIELDS <= set(report["versions"]) and report["versions"]["torch"] == torch.__version__
    assert report["gpus"] == []
    checks = report["checks"]
    assert all(set(c) == RECORD_FIELDS for c in checks)
    assert report["summary"] == {s: sum(c["status"] == s for c in checks) for s in ("pass", "fail", "error", "not run")}
    # one progress line per check on stderr
    progress = re.compile(r"doctor: \S+( \[\w+\])? \((cpu|cuda)\): (pass|fail|error|not run) in [\d.]+ s")
    assert sum(bool(progress.match(line)) for line in proc.stderr.splitlines()) == len(checks)
    md = (out / "doctor.md").read_text()
    assert "Exit status 0" in md and all(c["name"] in md for c in checks)


def test_every_cpu_check_passes(cpu_run):
    out, _ = cpu_run
    checks = json.loads((out / "doctor.json").read_text())["checks"]
    cpu = {(c["name"], c["backend"]): c for c in checks if c["device"] == "cpu"}
    assert set(cpu) == CPU_CHECKS
    for key, c in cpu.items():
        if key == ("csrc", "native") and not native_available():
            assert c["status"] == "not run" and "not built" in c["reason"]
            continue
        assert c["status"] == "pass", (key, c["reason"])
        assert c["summary"] and c["seconds"] > 0
    attention = cpu[("attention", "sdpa")]["metrics"]
    kinds = " ".join(case["case"] for case in attention["cases"])
    assert "dense" in kinds and "key padding" in kinds and "varlen" in kinds
    assert 0 <= attention["worst_used_fwd"] <= 1 and 0 <= attention["worst_used_bwd"] <= 1
    train = cpu[(f"train.fp32.{doctor.CPU_TRAIN_PRESET}", "sdpa")]["metrics"]
    assert len(train["losses"]) == doctor.CPU_TRAIN_STEPS and train["clips_per_s"] > 0


def test_every_gpu_check_not_run_with_its_reason(cpu_run):
    out, _ = cpu_run
    checks = json.loads((out / "doctor.json").read_text())["checks"]
    gpu = [c for c in checks if c["device"] == "cuda"]
    assert {(c["name"], c["backend"]) for c in gpu} >= GPU_CHECKS
    for c in gpu:
        assert c["status"] == "not run" and "no CUDA device" in c["reason"], c


def _stub(status):
    def run():
        if status == "fail":
            return doctor.Result("planted", {}, ["a planted failure"])
        if status == "error":
            raise RuntimeError("a planted exception")
        raise doctor.NotRun("planted: not installed")

    return run


@pytest.mark.parametrize("status, exit_status", [("fail", 1), ("error", 1), ("not run", 0)])
def test_a_failing_check_makes_the_exit_status_non_zero(status, exit_status, tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "no_cuda_reason", lambda: "no CUDA device: hidden by the test")
    monkeypatch.setattr(doctor, "check_csrc_cpu", _stub(status))
    ran_after = []
    monkeypatch.setattr(doctor, "check_train_cpu", lambda: ran_after.append(1) or doctor.Result("ok", {}))
    rc = doctor.run_doctor(tmp_path, skip=["attention", "info_nce", "bench-kernels"], command="test")
    assert rc == exit_status
    report = json.loads((tmp_path / "doctor.json").read_text())
    by_name = {(c["name"], c["device"]): c for c in report["checks"]}
    assert by_name[("csrc", "cpu")]["status"] == status
    assert "planted" in by_name[("csrc", "cpu")]["reason"]
    assert ran_after and by_name[(f"train.fp32.{doctor.CPU_TRAIN_PRESET}", "cpu")]["status"] == "pass"
    assert by_name[("attention", "cpu")]["reason"] == "skipped (--skip attention)"
    assert report["exit_status"] == exit_status and (tmp_path / "doctor.md").exists()


def test_a_skip_naming_no_check_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--skip atention: no check of that name"):
        doctor.run_doctor(tmp_path, skip=["atention"])
    assert not (tmp_path / "doctor.json").exists()


def test_imports_without_the_packages_the_gpu_image_lacks():
    """The doctor and the CLI parser import with torch alone: no DeepSpeed, MLflow, torchcodec,
    WebDataset, submitit, PyAV or xformers at import time."""
    blocked = ("deepspeed", "mlflow", "torchcodec", "webdataset", "submitit", "av", "xformers")
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import hicmae_dist.doctor, hicmae_dist.cli\n"
        "args = hicmae_dist.cli.build_parser().parse_args(['doctor', '--skip', 'zero'])\n"
        "assert args.func is hicmae_dist.cli.cmd_doctor and args.skip == ['zero']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_jpeg_decode_check_runs_its_comparison_on_the_cpu():
    """The GPU decode check's plumbing (hand-made JPEG batch, to_device, grey-level differences),
    run with the CPU on both sides: every difference is zero."""
    r = doctor.check_jpeg_decode(torch.device("cpu"))
    assert not r.failures and [c["case"] for c in r.metrics["cases"]] == ["decode", "to_device"]
    assert all(c["max"] == 0 for c in r.metrics["cases"])
