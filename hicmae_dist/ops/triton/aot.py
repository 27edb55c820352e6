"""Ahead-of-time compile reports of the Triton kernels (no GPU needed).

For each job (kernel, config, head dim, dtype, arch): Triton compiles to PTX and cubin for a
CUDA compute capability; `ptxas -v` on the PTX gives registers and spills (Triton drops that
log, and its metadata only gets them from a GPU driver), the compiled metadata gives shared
memory, and the PTX tells whether wgmma (sm_90 tensor-core MMA) is used. One record per job.

Used by tests/ops/triton_aot (every shipped config for sm_90 / sm_80 / sm_86, with checks) and
by bench/kernels/static.py (the sm_90 rows of the benchmark report). Compile in a process where the
Triton interpreter is off: TRITON_INTERPRET is read once, when Triton is imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from hicmae_dist.ops.triton import attention as fa
from hicmae_dist.ops.triton import info_nce as tn
from hicmae_dist.ops.triton.launch import ARCH_CAPABILITY

REPO = Path(__file__).resolve().parents[3]
REPORT = Path(os.environ.get("HICMAE_KERNEL_REPORT") or REPO / "build" / "kernel_report.json")
CAPABILITY = ARCH_CAPABILITY  # sm90 -> 90, sm80 -> 80, sm86 -> 86
# Largest shared memory one block may use (opt-in): H100 227 KB of its 228 KB per SM, A100
# 163 KB of 164 KB, RTX 30xx / 40xx (sm_86 / sm_89) 99 KB of 100 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024}
GROUP_DTYPES = {"16": (torch.float16, torch.bfloat16), "tf32": (torch.float32,), "ieee": (torch.float32,)}


def ptxas() -> tuple[str | None, str | None]:
    """(path of the ptxas Triton ships, None) or (None, why not)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as err:  # noqa: BLE001  (any failure means: no ptxas)
        return None, f"{type(err).__name__}: {err}"
    if not Path(path).exists():
        return None, f"{path} does not exist"
    return path, None


def ptxas_stats(ptx: str, capability: int) -> dict:
    """Registers and spill bytes of one kernel's PTX, from `ptxas -v`."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    path, err = ptxas()
    if path is None:
        raise RuntimeError(f"ptxas is not available: {err}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [
                path,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(capability)}",
                str(src),
                "-o",
                str(src.with_suffix(".cubin")),
            ],
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    if not (regs and spills):
        raise RuntimeError(f"unparsed ptxas output: {run.stderr[-2000:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
def attention_jobs() -> list[dict]:
    """One compile per distinct (kernel, head dim, dtype, precision, config, arch), plus the
    other layout / mask variants of each kernel at its default 16-bit config (d 64, bf16)."""
    jobs = {}
    for (arch, kind, head_dim, group), cfg in sorted(fa.CONFIGS.items()):
        for dtype in GROUP_DTYPES[group]:
            precision = None if group == "16" or kind == "bwd_pre" else group
            key = (fa.kernel_of(kind).__name__, head_dim, str(dtype), precision, cfg, arch, False, True)
            job = jobs.setdefault(
                key,
                dict(
                    op="attention",
                    kind=kind,
                    head_dim=head_dim,
                    dtype=dtype,
                    group=group,
                    precision=precision,
                    config=cfg,
                    arch=arch,
                    varlen=False,
                    kpm=True,
                    covers=[],
                ),
            )
            job["covers"].append((arch, kind, head_dim, group))
    for arch in ("sm90", "sm80"):
        for kind in ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"):
            cfg = fa.CONFIGS[(arch, kind, 64, "16")]
            for varlen, kpm in ((True, False), (False, False)):
                if kind == "bwd_pre" and not varlen:
                    continue  # bwd_pre has no mask flag: (False, *) is the main job
                key = (fa.kernel_of(kind).__name__, 64, str(torch.bfloat16), None, cfg, arch, varlen, kpm)
                jobs.setdefault(
                    key,
                    dict(
                        op="attention",
                        kind=kind,
                        head_dim=64,
                        dtype=torch.bfloat16,
                        group="16",
                        precision=None,
                        config=cfg,
                        arch=arch,
                        varlen=varlen,
                        kpm=kpm,
                        covers=[],
                    ),
                )
    return list(jobs.values())


def info_nce_jobs() -> list[dict]:
    jobs = []
    for (arch, kind, group), cfg in sorted(tn.CONFIGS.items()):
        for dtype in GROUP_DTYPES[group]:
            jobs.append(
                dict(
                    op="info_nce",
                    arch=arch,
                    kind=kind,
                    group=group,
                    dtype=dtype,
                    config=cfg,
                    precision=None if group == "16" else group,
                )
            )
    return jobs


def job_id(job: dict) -> str:
    c = job["config"]
    prec = f"-{job['precision']}" if job["precision"] else ""
    dtype = str(job["dtype"])[6:]
    if job["op"] == "info_nce":
        return (
            f"{job['arch']}-nce_{job['kind']}-{dtype}{prec}-"
            f"m{c.block_m}n{c.block_n}k{c.block_k}do{c.block_do}w{c.num_warps}s{c.num_stages}"
        )
    layout = ("varlen" if job["varlen"] else "dense") + ("+kpm" if job["kpm"] else "")
    return (
        f"{job['arch']}-{job['kind']}-d{job['head_dim']}-{dtype}{prec}-"
        f"m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}-{layout}"
    )


def kernel_names(op: str) -> set[str]:
    """The Triton kernel function names of one op ("attention" or "info_nce")."""
    return {k.__name__ for k in (fa.KERNELS if op == "attention" else tn.KERNELS).values()}


# ----------------------------------------------------------------------------------------------
# Compile one job -> record
# ----------------------------------------------------------------------------------------------
def compile_record(job: dict) -> dict:
    """Compile `job` for its arch and return its record: registers, spills (ptxas), shared
    memory (Triton metadata), wgmma in the PTX, compile time."""
    cap = CAPABILITY[job["arch"]]
    c = job["config"]
    start = time.perf_counter()
    if job["op"] == "info_nce":
        compiled = tn.aot_compile(job["kind"], job["dtype"], c, cap, precision=job["precision"])
        record = {
            "kernel": tn.KERNELS[job["kind"]].__name__,
            "kind": f"nce_{job['kind']}",
            "head_dim": "any",
            "layout": "dense+kpm",
            "config": {
                "block_m": c.block_m,
                "block_n": c.block_n,
                "block_k": c.block_k,
                "block_do": c.block_do,
                "num_warps": c.num_warps,
                "num_stages": c.num_stages,
            },
        }
    else:
        compiled = fa.aot_compile(
            job["kind"],
            job["head_dim"],
            job["dtype"],
            c,
            cap,
            varlen=job["varlen"],
            kpm=job["kpm"],
            precision=job["precision"],
        )
        record = {
            "kernel": fa.kernel_of(job["kind"]).__name__,
            "kind": job["kind"],
            "head_dim": job["head_dim"],
            "covers": ["/".join(map(str, k)) for k in job["covers"]],
            "layout": ("varlen" if job["varlen"] else "dense") + ("+kpm" if job["kpm"] else ""),
            "config": {
                "block_m": c.block_m,
                "block_n": c.block_n,
                "num_warps": c.num_warps,
                "num_stages": c.num_stages,
            },
        }
    ptx = compiled.asm["ptx"]
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{job_id(job)}: Triton produced no cubin")
    return {
        "id": job_id(job),
        **record,
        "arch": f"sm_{cap}",
        "dtype": str(job["dtype"])[6:],
        "precision": job["precision"],
        **ptxas_stats(ptx, cap),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma" in ptx,
        "compile_seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------------------------
# The report: build/kernel_report.json and its .txt table
# ----------------------------------------------------------------------------------------------
def config_text(config: dict) -> str:
    c = config
    if "block_k" in c:
        return f"{c['block_m']}/{c['block_n']}/{c['block_k']}/{c['block_do']}/w{c['num_warps']}/s{c['num_stages']}"
    return f"{c['block_m']}/{c['block_n']}/w{c['num_warps']}/s{c['num_stages']}"


def write_report(records: list[dict], kernels: set[str], path: Path = REPORT) -> dict:
    """Merge `records` into the report at `path`, replacing the earlier records of `kernels`
    (the kernel names these records come from), and rewrite its .txt table. Returns the payload."""
    import triton

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        payload = {"records": []}
    kept = [r for r in payload.get("records", []) if r.get("kernel") not in kernels]
    payload.update(
        generated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        triton=triton.__version__,
        records=sorted(kept + records, key=lambda r: r["id"]),
    )
    path.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        f"{'kernel':<22}{'arch':<6}{'d':>4} {'dtype':<14}{'config':<18}{'regs':>5}{'spill':>7}{'smem KB':>9} wgmma"
    ]
    for r in payload["records"]:
        layout = r.get("layout", "dense+kpm")
        dtype = r["dtype"] + ("/" + r["precision"] if r["precision"] else "")
        lines.append(
            f"{r['kind'] + ('/' + layout if layout != 'dense+kpm' else ''):<22}"
            f"{r['arch']:<6}{r.get('head_dim', '-'):>4} {dtype:<14}{config_text(r['config']):<18}"
            f"{r['registers']:>5}{r['spill_stores'] + r['spill_loads']:>7}"
            f"{r['shared_bytes'] / 1024:>9.1f} {'yes' if r['wgmma'] else 'no'}"
        )
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return payload
