"""Ahead-of-time compilation of every shipped flash-attention config for sm_90 and sm_80 (and
sm_86, the consumer-GPU family with less shared memory), no GPU.

hicmae_dist.ops.triton.aot compiles each (kernel, config, head dim, dtype, arch) job and reads
registers and spills (ptxas -v), shared memory and wgmma use. Checks: everything compiles, with
no register spills and shared memory within the per-block limit of its arch; on sm_90, wgmma in
the PTX of the fp16 / bf16 forward. The records go to $HICMAE_KERNEL_REPORT or
build/kernel_report.json (and its .txt table), which the benchmarks (hicmae_dist/bench/kernels/static.py) reuse.
"""

from __future__ import annotations

import pytest

from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import aot  # noqa: E402
from hicmae_dist.ops.triton import attention as fa  # noqa: E402

JOBS = aot.attention_jobs()
_records: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    aot.write_report(_records, aot.kernel_names("attention"))


def test_ptxas_is_available():
    path, err = aot.ptxas()
    require("ptxas from triton's nvidia backend", path is not None, err or "")


@pytest.mark.parametrize("job", JOBS, ids=aot.job_id)
def test_compiles_within_limits(job):
    path, err = aot.ptxas()
    require("ptxas from triton's nvidia backend", path is not None, err or "")
    record = aot.compile_record(job)
    _records.append(record)
    cap = aot.CAPABILITY[job["arch"]]
    assert record["shared_bytes"] <= aot.SMEM_LIMIT[cap], record
    assert record["spill_stores"] == 0 and record["spill_loads"] == 0, record
    if cap == 90 and job["kind"] in ("fwd", "fwd_short") and job["group"] == "16":
        assert record["wgmma"], f"no wgmma in the sm_90 fp16/bf16 forward: {record}"


def test_every_config_has_a_job():
    covered = {key for j in JOBS for key in j["covers"]}
    assert covered == set(fa.CONFIGS)
