"""Ahead-of-time compilation of every shipped InfoNCE kernel config for sm_90 and sm_80 (and
sm_86), no GPU: hicmae_dist.ops.triton.aot compiles each job and reads registers, spills
(ptxas -v) and shared memory. Checks: no spills, shared memory within the arch's per-block
limit. The records are merged into the same report as the attention kernels'
($HICMAE_KERNEL_REPORT or build/kernel_report.json, plus the .txt table), replacing earlier
info_nce records.
"""

from __future__ import annotations

import pytest

from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import aot  # noqa: E402
from hicmae_dist.ops.triton import info_nce as tn  # noqa: E402

JOBS = aot.info_nce_jobs()
_records: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    aot.write_report(_records, aot.kernel_names("info_nce"))


@pytest.mark.parametrize("job", JOBS, ids=aot.job_id)
def test_info_nce_compiles_within_limits(job):
    path, err = aot.ptxas()
    require("ptxas from triton's nvidia backend", path is not None, err or "")
    record = aot.compile_record(job)
    _records.append(record)
    assert record["shared_bytes"] <= aot.SMEM_LIMIT[aot.CAPABILITY[job["arch"]]], record
    assert record["spill_stores"] == 0 and record["spill_loads"] == 0, record


def test_every_config_has_a_job():
    assert {(j["arch"], j["kind"], j["group"]) for j in JOBS} == set(tn.CONFIGS)
