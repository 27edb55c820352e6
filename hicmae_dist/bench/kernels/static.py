"""Static sm_90 report and on-paper H100 roofline: what the kernels must reach on a GPU, written
down before anyone has one.

Triton kernels (ours): for each sm_90 config the kernels use (attention fwd / fwd_short /
bwd_pre / bwd_dkdv / bwd_dq at d 64 and 128, fp16 and bf16, plus the d 64 mask / varlen
variants; the info_nce kernels for every input group), registers, spills, shared memory and
wgmma from the AOT compile report (hicmae_dist.ops.triton.aot, written by tests/ops/triton_aot
to build/kernel_report.json). Configs missing from the report (none yet, or changed since) are
compiled here, in a child process without the Triton interpreter (it is fixed at import).
CUDA kernels of csrc/ (sm_90a): from build/csrc_report.json when tests/ops/test_csrc_nvcc.py
wrote it.

Roofline, per kernel and call, for a representative shape (the anchor N=512 for the attention
kernels, the models' shortest attention call for fwd_short, 64k global batch / 8 ranks / d 256
for info_nce, the models' calls for csrc): executed FLOPs (the backward recomputes: dK/dV
8, dQ 6 matmul units of B H N^2 D to the convention's 10; info_nce's gradient programs recompute
the scores once per BLOCK_DO slice of D) and compulsory bytes (each input read once, each output
written once); time floors at the H100 figures below; which bound dominates. Anchors: FA2
forward + backward 215 TFLOP/s and FA3 forward 333 TFLOP/s at N=512, d=64 on an H100.

    python -m kernels.static --quick
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hicmae_dist.bench import report
from hicmae_dist.bench.kernels import harness

NAME = "static"
REPO = Path(__file__).resolve().parents[1]
# H100 floors: bf16 / fp16 dense tensor-core ~790 TFLOP/s and ~3.0 TB/s copy bandwidth (the
# issue's figures); tf32 half the 16-bit rate and fp32 FMA 67 TFLOP/s (NVIDIA's H100 SXM ratios).
H100_FLOPS = {"16": 790e12, "tf32": 395e12, "ieee": 67e12}
H100_BYTES = 3.0e12
ANCHORS = (("FA2 fwd+bwd", "fwd+bwd", 215e12), ("FA3 fwd", "fwd", 333e12))
ANCHOR = dict(batch=32, heads=32, n=512, head_dim=64)  # 16k tokens, width 2048 (attention.py)
NCE = dict(batch=65536, world=8, dim=256)
MODEL = "hicmae-b"  # whose calls stand for the short attention and the csrc kernels, at its preset batch
CSRC_REPORT = REPO / "build" / "csrc_report.json"


# ----------------------------------------------------------------------------------------------
# Which compile records
# ----------------------------------------------------------------------------------------------
def sm90_jobs(quick: bool) -> list[dict]:
    """quick: d 64 bf16 attention and the bf16 / fp32 info_nce kernels; else d 64 and 128,
    fp16 and bf16, with the d 64 layout variants, and every info_nce group."""
    import torch

    from hicmae_dist.ops.triton import aot

    dims, dtypes = ((64,), (torch.bfloat16,)) if quick else ((64, 128), (torch.float16, torch.bfloat16))
    jobs = [
        j
        for j in aot.attention_jobs()
        if j["arch"] == "sm90" and j["head_dim"] in dims and j["dtype"] in dtypes and (j["kpm"] or not quick)
    ]
    jobs += [j for j in aot.info_nce_jobs() if j["arch"] == "sm90" and (j["dtype"] != torch.float16 or not quick)]
    return jobs


def compile_child() -> None:
    """`python -c "from hicmae_dist.bench.kernels.static import compile_child; compile_child()" OUT ID...`:
    compile the jobs with these ids, write their records (or errors) to OUT."""
    from hicmae_dist.ops.triton import aot

    out, ids = sys.argv[1], set(sys.argv[2:])
    records = []
    for job in aot.attention_jobs() + aot.info_nce_jobs():
        if aot.job_id(job) in ids:
            try:
                records.append(aot.compile_record(job))
            except Exception as err:  # noqa: BLE001  (one failed compile is one error row)
                records.append({"id": aot.job_id(job), "error": f"{type(err).__name__}: {err}"})
    Path(out).write_text(json.dumps(records))


def compile_missing(ids: list[str]) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from hicmae_dist.bench.kernels.static import compile_child; compile_child()",
                str(out),
                *ids,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(f"compile child failed (exit {run.returncode}): {run.stderr[-1500:]}")
        return {r["id"]: r for r in json.loads(out.read_text())}


def triton_rows(s: harness.Settings) -> tuple[list[dict], str]:
    from hicmae_dist.ops import triton as triton_pkg

    if triton_pkg.import_error():
        return [], f"triton cannot be imported ({triton_pkg.import_error()})"
    from hicmae_dist.ops.triton import aot

    path = Path(s.args.kernel_report or aot.REPORT)
    try:
        report = {r["id"]: r for r in json.loads(path.read_text())["records"]}
        source = f"{path} ({json.loads(path.read_text()).get('generated')})"
    except (OSError, ValueError, KeyError):
        report, source = {}, f"{path} absent"
    jobs = sm90_jobs(s.quick)
    missing = [aot.job_id(j) for j in jobs if aot.job_id(j) not in report]
    why_missing = None
    if missing and s.args.no_compile:
        why_missing = f"not in {path} and --no-compile given"
    elif missing:
        ptxas, err = aot.ptxas()
        if ptxas is None:
            why_missing = f"not in {path}, and ptxas is not available to compile it ({err})"
        else:
            report.update(compile_missing(missing))
            source += f"; compiled here: {len(missing)}"
    rows = []
    for job in jobs:
        rec = report.get(aot.job_id(job))
        row = {
            "id": aot.job_id(job),
            "op": job["op"],
            "kind": job["kind"] if job["op"] == "attention" else f"nce_{job['kind']}",
            "dtype": str(job["dtype"])[6:],
            "precision": job["precision"],
            "group": job["group"],
            "head_dim": job.get("head_dim", "any"),
            "layout": (("varlen" if job["varlen"] else "dense") + ("+kpm" if job["kpm"] else ""))
            if job["op"] == "attention"
            else "-",
            "config": aot.config_text(_config_dict(job["config"])),
        }
        if rec is None:
            row.update(status="unavailable", reason=why_missing)
        elif "error" in rec:
            row.update(status="error", reason=rec["error"])
        else:
            row.update(
                status="ok",
                reason=None,
                **{k: rec[k] for k in ("registers", "spill_stores", "spill_loads", "shared_bytes", "wgmma")},
            )
        row.update(roofline(job))
        rows.append(row)
    return rows, source


def _config_dict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# On-paper roofline
# ----------------------------------------------------------------------------------------------
def _short_call() -> dict:
    """MODEL's shortest dense self-attention call (HiCMAE-B: the audio encoder's) at its batch."""
    from hicmae_dist.bench.kernels.shapes import model_calls, preset_batch

    calls = [
        c
        for c in model_calls((MODEL,))
        if c["op"] == "attention" and c["layout"] == "dense" and c["seqlens_q"] == c["seqlens_k"]
    ]
    c = min(calls, key=lambda c: c["seqlens_q"][0])
    return dict(batch=preset_batch(MODEL), heads=c["heads"], n=c["seqlens_q"][0], head_dim=c["head_dim"])


def attention_kernel_cost(
    kind: str, batch: int, heads: int, n: int, d: int, elem: int, block_m: int = 1, block_n: int = 1
) -> tuple[float, float]:
    """(executed FLOPs, compulsory bytes) of one launch on (B, H, N, d), non-causal. mm = B H N^2 d
    with the query rows padded to block_m and the key rows to block_n (the tiles compute them):
    fwd 4 mm (q k^T, p v); bwd_pre 2 B H N d (delta = rowsum(dO o)); bwd_dkdv 8 mm (recomputed
    q k^T, dO v^T, p^T dO, dS^T q); bwd_dq 6 mm (q k^T, dO v^T, dS k). Bytes: fwd q k v o + lse;
    bwd_pre o dO + delta; bwd_dkdv q k v dO + lse, delta + dk dv; bwd_dq q k v dO + lse, delta + dq."""
    bhn = batch * heads * n
    mm = batch * heads * math.ceil(n / block_m) * block_m * math.ceil(n / block_n) * block_n * d
    return {
        "fwd": (4 * mm, elem * 4 * bhn * d + 4 * bhn),
        "fwd_short": (4 * mm, elem * 4 * bhn * d + 4 * bhn),
        "bwd_pre": (2 * bhn * d, elem * 2 * bhn * d + 4 * bhn),
        "bwd_dkdv": (8 * mm, elem * 6 * bhn * d + 8 * bhn),
        "bwd_dq": (6 * mm, elem * 5 * bhn * d + 8 * bhn),
    }[kind]


def nce_kernel_cost(kind: str, m: int, n: int, d: int, elem: int, block_do: int) -> tuple[float, float]:
    """(executed FLOPs, compulsory bytes), rows x (m, d) against columns y (n, d): fwd 2 m n d;
    each gradient program recomputes the scores (2 m n d per BLOCK_DO slice of d) and adds its
    matmul (2 m n d). Bytes: x, y once, plus lse / loss / gradient vectors and dx or dy."""
    slices = math.ceil(d / block_do) if block_do else 1
    xy = elem * (m + n) * d
    return {
        "fwd": (2 * m * n * d, xy + 8 * m),
        "bwd_dx": ((2 * slices + 2) * m * n * d, xy + 12 * m + elem * m * d),
        "bwd_dy": ((2 * slices + 2) * m * n * d, xy + 8 * m + elem * n * d),
    }[kind]


def _floors(flops: float, nbytes: float, group: str) -> dict:
    t_flop, t_mem = flops / H100_FLOPS[group], nbytes / H100_BYTES
    return {
        "gflop": flops / 1e9,
        "mbytes": nbytes / 1e6,
        "intensity": flops / max(nbytes, 1),
        "floor_compute_us": t_flop * 1e6,
        "floor_memory_us": t_mem * 1e6,
        "bound": "compute" if t_flop >= t_mem else "memory",
    }


def roofline(job: dict) -> dict:
    elem = 2 if job["group"] == "16" else 4
    group = "16" if job["group"] == "16" else (job["precision"] or "ieee")
    if job["op"] == "attention":
        d = job["head_dim"]
        sh = _short_call() if job["kind"] == "fwd_short" else dict(ANCHOR)
        sh["heads"] = sh["heads"] * sh["head_dim"] // d  # the same width at this head dim
        c = job["config"]
        f, b = attention_kernel_cost(job["kind"], sh["batch"], sh["heads"], sh["n"], d, elem, c.block_m, c.block_n)
        shape = f"B{sh['batch']} H{sh['heads']} N{sh['n']} d{d}"
    else:
        m = NCE["batch"] // NCE["world"]
        f, b = nce_kernel_cost(job["kind"], m, NCE["batch"], NCE["dim"], elem, job["config"].block_do)
        shape = f"{m}x{NCE['batch']} d{NCE['dim']}"
    return {"shape": shape, **_floors(f, b, group)}


def anchor_rows() -> list[dict]:
    """The gap to close: at the anchor (B32 H32 N512 d64 bf16) the useful FLOPs (convention:
    fwd 4 mm, fwd+bwd 14 mm), the H100 floor, the FA anchors' times, and our kernels' summed
    on-paper floors (executed FLOPs: fwd+bwd 18 mm; N=512 fills every tile) with the best useful
    TFLOP/s they allow."""
    from hicmae_dist.bench.kernels.attention import BWD_FACTOR, fwd_flops

    a = ANCHOR
    useful_fwd = fwd_flops(a["heads"], a["head_dim"], (a["n"],) * a["batch"], (a["n"],) * a["batch"])
    kernels = {"fwd": ("fwd",), "fwd+bwd": ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq")}
    rows = []
    for name, direction, tflops in ANCHORS:
        useful = useful_fwd * (1 if direction == "fwd" else 1 + BWD_FACTOR)
        ours_us = 0.0
        for kind in kernels[direction]:
            f, b = attention_kernel_cost(kind, a["batch"], a["heads"], a["n"], a["head_dim"], 2)
            ours_us += max(f / H100_FLOPS["16"], b / H100_BYTES) * 1e6
        rows.append(
            {
                "anchor": name,
                "direction": direction,
                "shape": f"B{a['batch']} H{a['heads']} N{a['n']} d{a['head_dim']} bf16",
                "useful_gflop": useful / 1e9,
                "floor_us": useful / H100_FLOPS["16"] * 1e6,
                "anchor_tflops": tflops / 1e12,
                "anchor_us": useful / tflops * 1e6,
                "ours_floor_us": ours_us,
                "ours_best_tflops": useful / (ours_us * 1e-6) / 1e12,
            }
        )
    return rows


def csrc_rows(path: Path) -> tuple[list[dict], str]:
    """sm_90a rows of the nvcc report, one per kernel family, with the models' calls' bytes."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], f"{path} absent (pytest tests/ops/test_csrc_nvcc.py writes it)"
    from hicmae_dist.bench.kernels import tokens
    from hicmae_dist.bench.kernels.shapes import model_calls, preset_batch

    calls = model_calls((MODEL,))
    b = preset_batch(MODEL)
    gather = max((c for c in calls if c["op"] == "gather_visible" and c["grad"]), key=lambda c: c["tokens"])
    assemble = max((c for c in calls if c["op"] == "assemble_decoder_tokens"), key=lambda c: c["positions"])
    norm = max((c for c in calls if c["op"] == "patch_norm"), key=lambda c: c["rows"])
    numel = b * norm["rows"] * norm["frames"] * norm["pixels"] * norm["channels"]
    # bf16 activations (the models train in bf16); fp32 targets
    work = {
        "gather_rows_kernel": (
            tokens.io_bytes(gather, b, "fwd", 2),
            f"gather {gather['tokens']}->{gather['kept']} C{gather['width']} B{b} bf16",
        ),
        "gather_backward_kernel": (tokens.io_bytes(gather, b, "bwd", 2), "its backward"),
        "assemble_kernel": (
            tokens.io_bytes(assemble, b, "fwd", 2),
            f"assemble {assemble['visible']}+{assemble['masked']} C{assemble['width']} B{b} bf16",
        ),
        "patch_norm_kernel": (
            2 * 4 * numel,
            f"patch_norm ({b * norm['rows']}, {norm['frames']}, {norm['pixels']}, {norm['channels']}) fp32",
        ),
    }
    families: dict[str, list[dict]] = {}
    for r in report["records"]:
        if r["arch"] == "sm_90a":
            families.setdefault(r["kernel"].split("<")[0].replace("void ", ""), []).append(r)
    rows = []
    for name, recs in sorted(families.items()):
        nbytes, shape = work.get(name, (None, None))
        rows.append(
            {
                "kernel": name,
                "instantiations": len(recs),
                "registers": max(r["registers"] for r in recs),
                "spill_bytes": sum(r["spill_stores"] + r["spill_loads"] for r in recs),
                "shared_bytes": max(r["shared_bytes"] for r in recs),
                "stack_bytes": max(r["stack_bytes"] for r in recs),
                "shape": shape,
                "mbytes": nbytes / 1e6 if nbytes else None,
                "floor_memory_us": nbytes / H100_BYTES * 1e6 if nbytes else None,
            }
        )
    return rows, f"{path} ({report.get('generated')}, {report.get('nvcc')})"


def run(s: harness.Settings) -> dict:
    triton, triton_source = triton_rows(s)
    csrc, csrc_source = csrc_rows(Path(s.args.csrc_report))
    for row in triton:
        harness.log.info(
            "static | %s: %s",
            row["id"],
            row["status"]
            if row["status"] != "ok"
            else f"{row['registers']} regs, {row['spill_stores'] + row['spill_loads']} B spilled, "
            f"{row['shared_bytes'] / 1024:.1f} KB smem, wgmma {row['wgmma']}",
        )
    return {
        "records": [],
        "kernels": triton,
        "triton_source": triton_source,
        "csrc": csrc,
        "csrc_source": csrc_source,
        "anchors": anchor_rows(),
        "h100": {"flops": H100_FLOPS, "bytes_per_s": H100_BYTES},
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(section: dict) -> str:
    rows = []
    for r in section["kernels"]:
        if r["status"] == "ok":
            stats = [
                r["registers"],
                r["spill_stores"] + r["spill_loads"],
                f"{r['shared_bytes'] / 1024:.1f}",
                "yes" if r["wgmma"] else "no",
            ]
        else:
            stats = [f"{r['status']}: {r['reason']}", "", "", ""]
        dtype = r["dtype"] + (f"/{r['precision']}" if r["precision"] else "")
        kind = r["kind"] + (f" ({r['layout']})" if r["layout"] not in ("dense+kpm", "-") else "")
        rows.append(
            [
                kind,
                r["head_dim"],
                dtype,
                r["config"],
                *stats,
                r["shape"],
                f"{r['gflop']:.3g}",
                f"{r['mbytes']:.3g}",
                report.sig(r["intensity"]),
                f"{r['floor_compute_us']:.3g}",
                f"{r['floor_memory_us']:.3g}",
                r["bound"],
            ]
        )
    text = (
        f"Triton kernels, sm_90 ({section['triton_source']}). Config = block_m/block_n(/block_k/block_do)"
        f"/warps/stages. Floors on an H100: {H100_FLOPS['16'] / 1e12:.0f} TFLOP/s bf16/fp16, "
        f"{H100_FLOPS['tf32'] / 1e12:.0f} tf32, {H100_FLOPS['ieee'] / 1e12:.0f} fp32 FMA, "
        f"{H100_BYTES / 1e12:.1f} TB/s; FLOPs executed (recomputation included), bytes compulsory.\n\n"
    )
    text += report.md_table(
        [
            "kernel",
            "d",
            "dtype",
            "config",
            "regs",
            "spill B",
            "smem KB",
            "wgmma",
            "shape",
            "GFLOP",
            "MB",
            "FLOP/B",
            "compute floor µs",
            "memory floor µs",
            "bound",
        ],
        rows,
    )
    text += "\n\nAnchors (H100, N=512, d=64): the gap to close.\n\n" + report.md_table(
        [
            "anchor",
            "shape",
            "useful GFLOP",
            "H100 floor µs",
            "anchor TFLOP/s",
            "anchor µs",
            "ours: kernel floors µs",
            "ours: best useful TFLOP/s",
        ],
        [
            [
                a["anchor"],
                a["shape"],
                f"{a['useful_gflop']:.1f}",
                f"{a['floor_us']:.0f}",
                f"{a['anchor_tflops']:.0f}",
                f"{a['anchor_us']:.0f}",
                f"{a['ours_floor_us']:.0f}",
                f"{a['ours_best_tflops']:.0f}",
            ]
            for a in section["anchors"]
        ],
    )
    text += f"\n\nCUDA kernels of csrc/, sm_90a ({section['csrc_source']}): memory-bound, floor at 3.0 TB/s.\n\n"
    if section["csrc"]:
        text += report.md_table(
            ["kernel", "instantiations", "regs (max)", "spill B", "smem B", "stack B", "call", "MB", "floor µs"],
            [
                [
                    r["kernel"],
                    r["instantiations"],
                    r["registers"],
                    r["spill_bytes"],
                    r["shared_bytes"],
                    r["stack_bytes"],
                    r["shape"] or "-",
                    report.sig(r["mbytes"]),
                    report.sig(r["floor_memory_us"]),
                ]
                for r in section["csrc"]
            ],
        )
    return text


def add_arguments(p) -> None:
    g = p.add_argument_group("static")
    g.add_argument(
        "--kernel-report",
        type=Path,
        default=None,
        help="Triton AOT report to read (default build/kernel_report.json or $HICMAE_KERNEL_REPORT); "
        "sm_90 configs missing from it are compiled here",
    )
    g.add_argument("--csrc-report", type=Path, default=CSRC_REPORT, help=f"nvcc report (default {CSRC_REPORT})")
    g.add_argument("--no-compile", action="store_true", help="only read the reports; never compile")


def main(argv=None, prog: str | None = None) -> int:
    return harness.main(argv, (NAME,), prog)


if __name__ == "__main__":
    raise SystemExit(main())
