"""Ahead-of-time compilation of every shipped flash-attention config for sm_90 and sm_80 (and
sm_86, the consumer-GPU family with less shared memory), no GPU.

For each (kernel, config, head dim, dtype, arch): Triton compiles to PTX and cubin; ptxas -v on
the PTX gives registers and spills (Triton drops that log, and its metadata only gets them from
a GPU driver), the compiled metadata gives shared memory. Checks: everything compiles, with no
register spills and shared memory within the per-block limit of its arch; on sm_90, wgmma in the
PTX of the fp16 / bf16 forward. The report goes to $HICMAE_KERNEL_REPORT or build/kernel_report.json,
one record per compile, for the benchmarks to reuse.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import attention as fa  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
REPORT = Path(os.environ.get("HICMAE_KERNEL_REPORT") or REPO / "build" / "kernel_report.json")
CAPABILITY = fa.ARCH_CAPABILITY  # sm90 -> 90, sm80 -> 80, sm86 -> 86
# Largest shared memory one block may use (opt-in): H100 227 KB of its 228 KB per SM, A100
# 163 KB of 164 KB, RTX 30xx / 40xx (sm_86 / sm_89) 99 KB of 100 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024}
GROUP_DTYPES = {"16": (torch.float16, torch.bfloat16), "tf32": (torch.float32,),
                "ieee": (torch.float32,)}


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        path = get_ptxas(90).path
    except Exception as err:  # noqa: BLE001
        return None, None, f"{type(err).__name__}: {err}"
    return path, sm_arch_from_capability, None


def _jobs():
    """One compile per distinct (kernel, head dim, dtype, precision, config, arch), plus the
    other layout / mask variants of each kernel at its default 16-bit config."""
    jobs = {}
    for (arch, kind, head_dim, group), cfg in sorted(fa.CONFIGS.items()):
        for dtype in GROUP_DTYPES[group]:
            precision = None if group == "16" or kind == "bwd_pre" else group
            kernel = fa.kernel_of(kind).__name__
            key = (kernel, head_dim, str(dtype), precision, cfg, arch, False, True)
            job = jobs.setdefault(key, dict(kind=kind, head_dim=head_dim, dtype=dtype,
                                            group=group, precision=precision, config=cfg,
                                            arch=arch, varlen=False, kpm=True, covers=[]))
            job["covers"].append((arch, kind, head_dim, group))
    for arch in ("sm90", "sm80"):
        for kind in ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"):
            cfg = fa.CONFIGS[(arch, kind, 64, "16")]
            for varlen, kpm in ((True, False), (False, False)):
                if kind == "bwd_pre" and not varlen:
                    continue  # bwd_pre has no mask flag: (False, *) is the main job
                key = (fa.kernel_of(kind).__name__, 64, str(torch.bfloat16), None, cfg, arch,
                       varlen, kpm)
                jobs.setdefault(key, dict(kind=kind, head_dim=64, dtype=torch.bfloat16, group="16",
                                          precision=None, config=cfg, arch=arch, varlen=varlen,
                                          kpm=kpm, covers=[]))
    return list(jobs.values())


def _job_id(job):
    c = job["config"]
    layout = ("varlen" if job["varlen"] else "dense") + ("+kpm" if job["kpm"] else "")
    prec = f"-{job['precision']}" if job["precision"] else ""
    return (f"{job['arch']}-{job['kind']}-d{job['head_dim']}-{str(job['dtype'])[6:]}{prec}-"
            f"m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}-{layout}")


JOBS = _jobs()
_records: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    payload = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "triton": __import__("triton").__version__,
               "records": sorted(_records, key=lambda r: r["id"])}
    REPORT.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"{'kernel':<22}{'arch':<6}{'d':>4} {'dtype':<14}{'config':<18}{'regs':>5}{'spill':>7}"
             f"{'smem KB':>9} wgmma"]
    for r in payload["records"]:
        c = r["config"]
        lines.append(f"{r['kind'] + ('/' + r['layout'] if r['layout'] != 'dense+kpm' else ''):<22}"
                     f"{r['arch']:<6}{r['head_dim']:>4} {r['dtype'] + ('/' + r['precision'] if r['precision'] else ''):<14}"
                     f"{'%d/%d/w%d/s%d' % (c['block_m'], c['block_n'], c['num_warps'], c['num_stages']):<18}"
                     f"{r['registers']:>5}{r['spill_stores'] + r['spill_loads']:>7}"
                     f"{r['shared_bytes'] / 1024:>9.1f} {'yes' if r['wgmma'] else 'no'}")
    (REPORT.with_suffix(".txt")).write_text("\n".join(lines) + "\n")


def _ptxas_report(ptx: str, capability: int) -> dict:
    path, arch_name, err = _ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch_name(capability)}", str(src), "-o",
                              str(src.with_suffix(".cubin"))], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    log = run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, log
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def test_ptxas_is_available():
    path, _, err = _ptxas()
    require("ptxas from triton's nvidia backend", path is not None and Path(path).exists(),
            err or str(path))


@pytest.mark.parametrize("job", JOBS, ids=_job_id)
def test_compiles_within_limits(job):
    path, _, err = _ptxas()
    require("ptxas from triton's nvidia backend", path is not None and Path(path).exists(),
            err or str(path))
    cap = CAPABILITY[job["arch"]]
    start = time.perf_counter()
    compiled = fa.aot_compile(job["kind"], job["head_dim"], job["dtype"], job["config"], cap,
                              varlen=job["varlen"], kpm=job["kpm"], precision=job["precision"])
    ptx = compiled.asm["ptx"]
    assert compiled.asm.get("cubin"), "no cubin"
    stats = _ptxas_report(ptx, cap)
    c = job["config"]
    record = {
        "id": _job_id(job), "kernel": fa.kernel_of(job["kind"]).__name__, "kind": job["kind"],
        "arch": f"sm_{cap}", "head_dim": job["head_dim"], "dtype": str(job["dtype"])[6:],
        "precision": job["precision"], "covers": ["/".join(map(str, k)) for k in job["covers"]],
        "layout": ("varlen" if job["varlen"] else "dense")
        + ("+kpm" if job["kpm"] else ""),
        "config": {"block_m": c.block_m, "block_n": c.block_n, "num_warps": c.num_warps,
                   "num_stages": c.num_stages},
        **stats, "shared_bytes": int(compiled.metadata.shared), "wgmma": "wgmma" in ptx,
        "compile_seconds": round(time.perf_counter() - start, 2),
    }
    _records.append(record)
    assert record["shared_bytes"] <= SMEM_LIMIT[cap], record
    assert record["spill_stores"] == 0 and record["spill_loads"] == 0, record
    if cap == 90:
        if job["kind"] in ("fwd", "fwd_short") and job["group"] == "16":
            assert record["wgmma"], f"no wgmma in the sm_90 fp16/bf16 forward: {record}"


def test_every_config_has_a_job():
    covered = {key for j in JOBS for key in j["covers"]}
    assert covered == set(fa.CONFIGS)
