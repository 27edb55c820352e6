"""The kernel microbenchmarks end to end: `hicmae-dist bench kernels --quick` on tiny sizes
writes results of the documented schema, every backend that exists here reports a number, the
ones that cannot run say why, and out-of-memory is recorded (by estimate, by exception, by a
failed allocation in a capped child process), never raised. No timed assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hicmae_dist.bench import report
from hicmae_dist.bench.kernels import attention as kattn
from hicmae_dist.bench.kernels import harness
from hicmae_dist.ops import gather as ops_gather
from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

REPO = Path(__file__).resolve().parents[2]
MEM_LIMIT = "250MB"  # above every case below but the naive local loss at 4096 (~270 MB)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        "-m",
        "hicmae_dist.cli",
        "bench",
        "kernels",
        "--quick",
        "--threads",
        "1",
        "--models",
        "hicmae-t",
        "--anchor-n",
        "256",
        "--head-dims",
        "64",
        "--nce-batch",
        "1024",
        "4096",
        "--nce-dim",
        "64",
        "--mem-limit",
        MEM_LIMIT,
        "--kernel-report",
        str(out / "absent.json"),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text()), out, run.stdout


def _records(res: dict, op: str) -> list[dict]:
    return res["ops"][op]["records"]


def _sdpa_flash_on_cpu() -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 4, 8)
    try:
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            warnings.simplefilter("ignore")
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


def test_schema_and_outputs(results):
    res, out, stdout = results
    assert res["schema"] == harness.SCHEMA and res["quick"] is True
    m = res["machine"]
    assert m["device"] == "cpu" and m["cpu"]["usable_cores"] >= 1 and m["versions"]["torch"] == torch.__version__
    assert res["settings"]["mem_limit_bytes"] == harness.parse_bytes(MEM_LIMIT)
    assert set(res["ops"]) == set(harness.OPS)
    required = {
        "op",
        "case",
        "backend",
        "direction",
        "dtype",
        "shape",
        "status",
        "reason",
        "flops",
        "bytes",
        "time",
        "tflops",
        "gbps",
        "peak_bytes",
        "memory_method",
        "estimate_bytes",
    }
    for op in harness.OPS:
        for r in _records(res, op):
            assert required <= set(r), (op, set(required) - set(r))
            assert r["status"] in harness.STATUSES and r["direction"] in harness.DIRECTIONS
            assert r["status"] != "error", r
            if r["status"] == "ok":
                t = r["time"]
                assert 0 < t["min_ms"] <= t["p25_ms"] <= t["median_ms"] <= t["p75_ms"] <= t["max_ms"], r
                assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0, r
                assert (r["tflops"] or 0) > 0 or (r["gbps"] or 0) > 0, r
            else:
                assert r["reason"], r
    md = (out / "results.md").read_text()
    assert all(f"## {op}" in md for op in harness.OPS) and "## attention" in stdout
    for png in ("attention_tflops.png", "info_nce_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_every_backend_here_reports(results):
    res, _, _ = results
    recs = _records(res, "attention")
    here = {"reference", "sdpa-math"} | ({"sdpa-flash"} if _sdpa_flash_on_cpu() else set())
    cases = {r["case"] for r in recs}
    assert any(c.startswith("hicmae-t dense") for c in cases) and any(c.startswith("hicmae-t varlen") for c in cases)
    assert {"anchor dense N256 d64", "anchor varlen N256 d64"} <= cases
    for case in cases:
        for backend in kattn.BACKENDS:
            got = {r["direction"]: r for r in recs if r["case"] == case and r["backend"] == backend}
            assert set(got) == set(harness.DIRECTIONS), (case, backend)
            for r in got.values():
                if backend in here:
                    assert r["status"] == "ok" and r["tflops"] > 0, r
                else:  # triton and xformers need CUDA; SDPA's efficient / cuDNN kernels too
                    assert r["status"] == "unavailable" and r["reason"], r
    triton = next(r for r in recs if r["backend"] == "triton")
    assert "CUDA" in triton["reason"]
    # the FLOP convention: 4 B H Nq Nk D forward, 2.5x backward
    r = next(r for r in recs if r["case"] == "anchor dense N256 d64" and r["backend"] == "reference")
    sh = r["shape"]
    fwd = 4 * sh["batch"] * sh["heads"] * 256 * 256 * 64
    assert r["flops"] == {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[r["direction"]]


def test_attention_flops_match_torch_flop_counter():
    """The forward formula is the two matmuls torch counts in the reference attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from hicmae_dist.ops.attention import attention_reference

    q = torch.randn(2, 3, 40, 16)
    k = torch.randn(2, 3, 24, 16)
    with FlopCounterMode(display=False) as counter:
        attention_reference(q, k, k)
    assert counter.get_total_flops() == kattn.fwd_flops(3, 16, (40, 40), (24, 24))


def test_info_nce_numbers_and_oom(results):
    res, _, _ = results
    recs = {(r["case"], r["backend"]): r for r in _records(res, "info_nce")}
    oom = recs[("local B4096 d64", "naive")]
    assert oom["status"] == "oom" and "not attempted" in oom["reason"]
    assert oom["estimate_bytes"] > harness.parse_bytes(MEM_LIMIT)
    for (case, backend), r in recs.items():
        if backend == "triton":
            assert r["status"] == "unavailable" and "CUDA" in r["reason"], r
        elif (case, backend) != ("local B4096 d64", "naive"):
            assert r["status"] == "ok" and r["peak_bytes"] > 0 and "fresh process" in r["memory_method"], r
    summary = {(r["case"], r["backend"]): r for r in res["ops"]["info_nce"]["summary"]["memory_vs_naive"]}
    row = summary[("local B4096 d64", "torch")]
    assert row["naive_source"].startswith("estimate") and row["ratio"] > 1
    assert summary[("global B4096 d64", "torch")]["naive_source"] == "measured"


def test_token_ops_and_patch_norm_report(results):
    require("hicmae_dist._C", ops_gather.native_available(), "pip install -e . builds it")
    res, _, _ = results
    for op in ("tokens", "patch_norm"):
        recs = _records(res, op)
        assert {r["backend"] for r in recs} == {"native", "reference"}
        assert all(r["status"] == "ok" and r["gbps"] > 0 for r in recs), [r for r in recs if r["status"] != "ok"]
    tokens = _records(res, "tokens")
    assert {r["direction"] for r in tokens if "assemble" in r["case"]} == set(harness.DIRECTIONS)
    assert {r["direction"] for r in tokens if "800->720" in r["case"]} == {"fwd"}  # the targets: no gradient


def test_static_sm90_report(results):
    res, _, _ = results
    st = res["ops"]["static"]
    assert {a["anchor"] for a in st["anchors"]} == {"FA2 fwd+bwd", "FA3 fwd"}
    assert all(a["ours_floor_us"] >= a["floor_us"] * 0.99 for a in st["anchors"])
    kinds = {r["kind"] for r in st["kernels"]}
    assert {"fwd", "fwd_short", "bwd_pre", "bwd_dkdv", "bwd_dq", "nce_fwd", "nce_bwd_dx", "nce_bwd_dy"} <= kinds
    for r in st["kernels"]:
        assert r["bound"] in ("compute", "memory") and r["floor_compute_us"] >= 0
        assert r["status"] in ("ok", "unavailable"), r
    require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
    from hicmae_dist.ops.triton import aot

    require("ptxas", aot.ptxas()[0] is not None, str(aot.ptxas()[1]))
    # the report path was absent: every row was compiled here, in a child process
    assert "compiled here" in st["triton_source"]
    for r in st["kernels"]:
        assert r["status"] == "ok" and r["registers"] > 0 and r["spill_stores"] == 0, r
        if r["kind"] in ("fwd", "fwd_short") and r["dtype"] == "bfloat16":
            assert r["wgmma"], r


def test_compare_prints_ratios(results, tmp_path):
    res, out, _ = results
    text = report.compare(out / "results.json", out / "results.json")
    assert "B/A time" in text and "| 1.000 |" in text


def _settings(mem_limit: int) -> harness.Settings:
    return harness.Settings(
        device=torch.device("cpu"),
        dtype=torch.float32,
        quick=True,
        warmup=1,
        repeats=2,
        min_time=0.0,
        mem_limit=mem_limit,
        threads=1,
    )


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory"),
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
    ],
)
def test_oom_during_a_call_is_recorded(error):
    def make():
        def call():
            raise error

        return call

    rec = harness.measure(
        _settings(2**30), op="t", case="c", backend="b", direction="fwd", make=make, shape={}, dtype="float32"
    )
    assert rec["status"] == "oom" and rec["time"] is None


def test_oom_by_estimate_is_not_attempted():
    def make():
        raise AssertionError("must not run")

    rec = harness.measure(
        _settings(2**20),
        op="t",
        case="c",
        backend="b",
        direction="fwd",
        make=make,
        shape={},
        dtype="float32",
        estimate=2**21,
    )
    assert rec["status"] == "oom" and "not attempted" in rec["reason"]


def allocate(nbytes: int) -> int:
    """Runs in a capped child process (run_isolated)."""
    return int(torch.ones(nbytes, dtype=torch.uint8).sum())


def test_failed_allocation_in_a_child_is_oom():
    status, reason = harness.run_isolated(__name__, "allocate", {"nbytes": 8 * 2**30}, _settings(2**26))
    assert status == "oom", reason
    status, total = harness.run_isolated(__name__, "allocate", {"nbytes": 2**20}, _settings(2**26))
    assert (status, total) == ("ok", 2**20)
