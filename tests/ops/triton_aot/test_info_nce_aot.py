"""Ahead-of-time compilation of every shipped InfoNCE kernel config for sm_90 and sm_80 (and
sm_86), no GPU: compiles to PTX and cubin, ptxas -v gives registers and spills, the metadata
shared memory. Checks: no spills, shared memory within the arch's per-block limit. The records
are merged into the same report as the attention kernels' ($HICMAE_KERNEL_REPORT or
build/kernel_report.json, plus the .txt table), replacing earlier info_nce records.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import info_nce as tn  # noqa: E402
from tests.ops.triton_aot import test_aot_compile as attn_aot  # noqa: E402  (ptxas helpers)

CAPABILITY = {"sm90": 90, "sm80": 80, "sm86": 86}
GROUP_DTYPES = {"16": (torch.float16, torch.bfloat16), "tf32": (torch.float32,),
                "ieee": (torch.float32,)}


def _jobs():
    jobs = []
    for (arch, kind, group), cfg in sorted(tn.CONFIGS.items()):
        for dtype in GROUP_DTYPES[group]:
            jobs.append(dict(arch=arch, kind=kind, group=group, dtype=dtype, config=cfg,
                             precision=None if group == "16" else group))
    return jobs


def _job_id(job):
    c = job["config"]
    prec = f"-{job['precision']}" if job["precision"] else ""
    return (f"{job['arch']}-nce_{job['kind']}-{str(job['dtype'])[6:]}{prec}-"
            f"m{c.block_m}n{c.block_n}k{c.block_k}do{c.block_do}w{c.num_warps}s{c.num_stages}")


JOBS = _jobs()
_records: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report = attn_aot.REPORT
    report.parent.mkdir(parents=True, exist_ok=True)
    try:
        payload = json.loads(report.read_text())
    except (OSError, ValueError):
        payload = {"records": []}
    ours = {k.__name__ for k in tn.KERNELS.values()}
    records = [r for r in payload.get("records", []) if r.get("kernel") not in ours]
    payload.update(generated=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   triton=__import__("triton").__version__,
                   records=sorted(records + _records, key=lambda r: r["id"]))
    report.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"{'kernel':<22}{'arch':<6}{'d':>4} {'dtype':<14}{'config':<18}{'regs':>5}{'spill':>7}"
             f"{'smem KB':>9} wgmma"]
    for r in payload["records"]:
        c = r["config"]
        cfg = "%d/%d/w%d/s%d" % (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"])
        if "block_k" in c:
            cfg = "%d/%d/%d/%d/w%d/s%d" % (c["block_m"], c["block_n"], c["block_k"],
                                           c["block_do"], c["num_warps"], c["num_stages"])
        layout = r.get("layout", "dense+kpm")
        dtype = r["dtype"] + ("/" + r["precision"] if r["precision"] else "")
        lines.append(f"{r['kind'] + ('/' + layout if layout != 'dense+kpm' else ''):<22}"
                     f"{r['arch']:<6}{r.get('head_dim', '-'):>4} {dtype:<14}{cfg:<18}"
                     f"{r['registers']:>5}{r['spill_stores'] + r['spill_loads']:>7}"
                     f"{r['shared_bytes'] / 1024:>9.1f} {'yes' if r['wgmma'] else 'no'}")
    report.with_suffix(".txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("job", JOBS, ids=_job_id)
def test_info_nce_compiles_within_limits(job):
    path, _, err = attn_aot._ptxas()
    require("ptxas from triton's nvidia backend", path is not None, err or str(path))
    cap = CAPABILITY[job["arch"]]
    start = time.perf_counter()
    compiled = tn.aot_compile(job["kind"], job["dtype"], job["config"], cap,
                              precision=job["precision"])
    ptx = compiled.asm["ptx"]
    assert compiled.asm.get("cubin"), "no cubin"
    stats = attn_aot._ptxas_report(ptx, cap)
    c = job["config"]
    record = {
        "id": _job_id(job), "kernel": tn.KERNELS[job["kind"]].__name__,
        "kind": f"nce_{job['kind']}", "arch": f"sm_{cap}", "head_dim": "any",
        "dtype": str(job["dtype"])[6:], "precision": job["precision"], "layout": "dense+kpm",
        "config": {"block_m": c.block_m, "block_n": c.block_n, "block_k": c.block_k,
                   "block_do": c.block_do, "num_warps": c.num_warps,
                   "num_stages": c.num_stages},
        **stats, "shared_bytes": int(compiled.metadata.shared), "wgmma": "wgmma" in ptx,
        "compile_seconds": round(time.perf_counter() - start, 2),
    }
    _records.append(record)
    assert record["shared_bytes"] <= attn_aot.SMEM_LIMIT[cap], record
    assert record["spill_stores"] == 0 and record["spill_loads"] == 0, record


def test_every_config_has_a_job():
    assert {(j["arch"], j["kind"], j["group"]) for j in JOBS} == set(tn.CONFIGS)
