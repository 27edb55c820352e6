"""What benchmarks report: the machine, markdown tables, number formatting, plots, MLflow, compare.

A results document (`bench kernels`' results.json) holds `machine` (machine()), `settings`
and `ops: {name: {"records": [...]}}`, one record per (op, case, backend, direction): op, case,
backend, direction, dtype, shape, status ("ok" | "oom" | "unavailable" | "error"), reason,
flops / bytes per call, time (timing.time_calls), tflops / gbps, peak_bytes, memory_method.
timing_table / pivot_table render records, log_mlflow logs a document, compare two of them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def machine(device: torch.device) -> dict:
    """CPU, memory, GPU (name, capability, driver, clocks), library versions, source commit."""
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        cpu_model = platform.processor() or None
    repo = Path(__file__).resolve().parents[2]
    commit = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    desc = {
        "device": str(device),
        "cpu": {
            "model": cpu_model,
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "memory_total_bytes": meminfo("MemTotal"),
            "memory_available_bytes": meminfo("MemAvailable"),
            "load_average": list(os.getloadavg()),
        },
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": package_version("triton"),
            "xformers": package_version("xformers"),
            "hicmae_dist": package_version("hicmae-dist"),
            "commit": (commit + ("+dirty" if dirty else "")) if commit else None,
        },
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "cudnn": torch.backends.cudnn.version(),
        }
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
        smi = _run(["nvidia-smi", f"--id={device.index or 0}", f"--query-gpu={query}", "--format=csv,noheader"])
        if smi:
            gpu.update(
                zip(
                    ("driver", "clock_sm", "clock_sm_max", "clock_mem", "clock_mem_max", "power_limit"),
                    (v.strip() for v in smi.split(",")),
                )
            )
        desc["gpu"] = gpu
    return desc


def machine_line(m: dict) -> str:
    cpu = m["cpu"]
    text = (
        f"{cpu['model']} ({cpu['usable_cores']} cores usable, {cpu['capability']}, "
        f"{fmt_bytes(cpu['memory_total_bytes'])} RAM), torch {m['versions']['torch']} "
        f"({m['torch_threads']} threads), triton {m['versions']['triton']}"
    )
    if m["gpu"]:
        g = m["gpu"]
        text += (
            f"; GPU {g['name']} (sm_{g['capability'].replace('.', '')}, driver "
            f"{g.get('driver', '?')}, SM clock {g.get('clock_sm', '?')} of {g.get('clock_sm_max', '?')})"
        )
    else:
        text += "; no GPU"
    return text


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def sig(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timing_table(records: list[dict], shape_text: Callable[[dict], str]) -> str:
    """The default table of an op: one row per record; the unavailable ones listed once per
    (backend, reason) below it."""
    rows, unavailable = [], {}
    for r in records:
        if r["status"] == "unavailable":
            unavailable.setdefault((r["backend"], r["reason"]), []).append(r)
            continue
        ok = r["status"] == "ok"
        t = r["time"]
        rows.append(
            [
                r["case"],
                shape_text(r),
                r["backend"],
                r["direction"],
                f"{t['median_ms']:.4g}" if ok else "-",
                f"{t['p25_ms']:.3g}-{t['p75_ms']:.3g}" if ok else "-",
                sig(r["tflops"]) if ok else "-",
                sig(r["gbps"]) if ok else "-",
                fmt_bytes(r["peak_bytes"]) if ok else "-",
                r["status"] if ok else f"{r['status']}: {r['reason']}",
            ]
        )
    text = md_table(
        ["case", "shape", "backend", "dir", "median ms", "IQR ms", "TFLOP/s", "GB/s", "peak mem", "status"], rows
    )
    for (backend, reason), recs in unavailable.items():
        text += f"\n\nUnavailable here: **{backend}** ({len(recs)} records): {reason}"
    return text


def pivot_table(records: list[dict], shape_text: Callable[[dict], str], rate: str) -> str:
    """One row per (case, direction), one column per backend that ran: median ms and the rate
    ("tflops" or "gbps") of each, oom where it did not fit."""
    backends = list(dict.fromkeys(r["backend"] for r in records if r["status"] in ("ok", "oom")))
    rows: dict[tuple, dict] = {}
    for r in records:
        if r["backend"] in backends:
            rows.setdefault((r["case"], shape_text(r), r["direction"]), {})[r["backend"]] = r
    unit = {"tflops": "TFLOP/s", "gbps": "GB/s"}[rate]

    def cell(r: dict | None) -> str:
        if r is None or r["status"] not in ("ok", "oom"):
            return "-" if r is None else r["status"]
        return "oom" if r["status"] == "oom" else f"{r['time']['median_ms']:.3g} ms ({sig(r[rate])})"

    return md_table(
        ["case", "shape", "dir", *(f"{b}: ms ({unit})" for b in backends)],
        [[*key, *(cell(by.get(b)) for b in backends)] for key, by in rows.items()],
    )


def line_plot(path: Path, panels: list[dict], title: str) -> Path:
    """panels: [{"title", "xlabel", "ylabel", "series": {label: [(x, y), ...]}, "logy"}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, points in sorted(panel["series"].items()):
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_name(*parts: str) -> str:
    return re.sub(r"[^\w./ :-]", "_", "/".join(parts))[:250]


def log_mlflow(uri: str, results: dict, files: list[Path], out_dir: Path) -> str:
    """One MLflow run: the machine and settings as params, every ok record's median ms /
    TFLOP/s / GB/s / peak MB as metrics, the JSON, markdown and plots as artifacts."""
    from hicmae_dist.tracking import Tracker

    tracker = Tracker(
        True, uri, "kernel-bench", out_dir, run_name=f"kernels {results['machine']['device']}", system_metrics_s=0
    )
    m = results["machine"]
    params = {
        "device": m["device"],
        "cpu": m["cpu"]["model"],
        "threads": m["torch_threads"],
        "gpu": (m["gpu"] or {}).get("name"),
        "driver": (m["gpu"] or {}).get("driver"),
        **{f"version.{k}": v for k, v in m["versions"].items()},
        **{f"setting.{k}": v for k, v in results["settings"].items()},
    }
    tracker.log_params(params)
    metrics = {}
    for op, section in results["ops"].items():
        for r in section["records"]:
            if r.get("status") != "ok" or not r.get("time"):
                continue
            key = (op, r["case"], r["backend"], r["direction"])
            metrics[_metric_name(*key, "median_ms")] = r["time"]["median_ms"]
            for name, value in (
                ("tflops", r["tflops"]),
                ("gbps", r["gbps"]),
                ("peak_mb", None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20),
            ):
                if value is not None:
                    metrics[_metric_name(*key, name)] = value
    tracker.log_metrics(0, metrics)
    for f in files:
        tracker.log_artifact(f)
    tracker.finish()
    return tracker.run_id


def _key(r: dict) -> tuple:
    return (r["op"], r["case"], r["backend"], r["direction"], r["dtype"])


def compare(path_a: Path, path_b: Path) -> str:
    """Markdown: per record present in both, B / A of the median time and the peak memory."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    ra = {_key(r): r for s in a["ops"].values() for r in s["records"]}
    rb = {_key(r): r for s in b["ops"].values() for r in s["records"]}
    rows = []
    for key in [k for k in ra if k in rb]:
        x, y = ra[key], rb[key]
        if x["status"] != "ok" or y["status"] != "ok":
            rows.append([*key[:4], "-", "-", f"{x['status']} -> {y['status']}", "-", "-", "-"])
            continue
        tx, ty = x["time"]["median_ms"], y["time"]["median_ms"]
        mx, my = x["peak_bytes"], y["peak_bytes"]
        rows.append(
            [
                *key[:4],
                f"{tx:.4g}",
                f"{ty:.4g}",
                f"{ty / tx:.3f}",
                fmt_bytes(mx),
                fmt_bytes(my),
                f"{my / mx:.3f}" if mx and my is not None else "-",
            ]
        )
    only = [k for k in ra if k not in rb] + [k for k in rb if k not in ra]
    text = (
        f"A: {path_a} ({a['created']}, {machine_line(a['machine'])})\n"
        f"B: {path_b} ({b['created']}, {machine_line(b['machine'])})\n\n"
        + md_table(["op", "case", "backend", "dir", "A ms", "B ms", "B/A time", "A mem", "B mem", "B/A mem"], rows)
    )
    if only:
        text += f"\n\n{len(only)} records in only one of the two (not compared)."
    return text
