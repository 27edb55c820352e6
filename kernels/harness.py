"""The shared harness of the kernel microbenchmarks.

One record per (op, case, backend, direction), a plain dict ready for JSON:
    op, case, backend, direction ("fwd" | "bwd" | "fwd+bwd"), dtype, shape {...},
    status: "ok" | "oom" | "unavailable" | "error", reason (why, when not ok),
    flops and / or bytes (the op module's formulas, per call), time {median_ms, p25_ms,
    p75_ms, min_ms, max_ms, repeats, number}, tflops / gbps (from the median),
    peak_bytes + memory_method, estimate_bytes (the pre-flight estimate).
An out-of-memory case is a record with status "oom", never a crash: the pre-flight estimate
against the memory limit (default: MemAvailable, or the GPU's free memory) skips what cannot
fit, and torch.OutOfMemoryError / MemoryError / a failed CPU allocation during the run are
caught. A backend that cannot run here is "unavailable" with the reason; anything else that
raises is "error" (the run goes on; the exit status says so).

Timing: warm-up calls, then `repeats` timed repeats of `number` calls each (number calibrated so
a repeat lasts >= min_time), synchronising CUDA around each; median, quartiles, min and max per
call. Peak memory: CUDA torch.cuda.max_memory_allocated over one call; CPU in this process the
peak of torch's allocations over one call (profiler memory events; resident-set figures are
meaningless in a long-lived process whose allocator keeps freed pages), and in a fresh child
process (`run_isolated`, used where memory is the point) the rise of the peak resident set.

Outputs (`write_outputs`): results.json (schema `SCHEMA`, with the machine description),
results.md, PNG plots, optionally an MLflow run. `compare` prints per-record ratios of two JSONs.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("kernels")
SCHEMA = "hicmae-dist/kernel-bench/1"
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
STATUSES = ("ok", "oom", "unavailable", "error")
OPS = ("attention", "info_nce", "tokens", "patch_norm", "static")  # modules kernels.<op>
DEFAULT_OUT = Path("build") / "kernel-bench"


class Unavailable(Exception):
    """A backend that cannot run on this machine / input; the message says why."""


@dataclass
class Settings:
    """What every op module's `run` gets: the device, the dtype of attention / token ops,
    timing and memory settings, and all parsed options (op-specific ones included)."""
    device: torch.device
    dtype: torch.dtype
    quick: bool
    warmup: int
    repeats: int
    min_time: float  # seconds a timed repeat lasts at least
    mem_limit: int  # bytes
    threads: int
    args: argparse.Namespace = field(default_factory=argparse.Namespace)


# ----------------------------------------------------------------------------------------------
# Out of memory, timing, memory
# ----------------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "can't allocate memory" in text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], s: Settings) -> dict:
    """Per-call time of fn(): {median_ms, p25_ms, p75_ms, min_ms, max_ms, repeats, number}."""
    took = 0.0
    for _ in range(max(s.warmup, 1)):  # the last warm-up call calibrates `number`
        sync(s.device)
        t0 = time.perf_counter()
        fn()
        sync(s.device)
        took = time.perf_counter() - t0
    number = max(1, math.ceil(s.min_time / took)) if took > 0 else 1
    times = []
    for _ in range(s.repeats):
        sync(s.device)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync(s.device)
        times.append((time.perf_counter() - t0) / number)
    return summarize_times(times, number)


def summarize_times(times: list[float], number: int = 1) -> dict:
    ms = sorted(1e3 * t for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": ms[0],
            "max_ms": ms[-1], "repeats": len(ms), "number": number}


def directional(forward: Callable[[], torch.Tensor], leaves: tuple, direction: str,
                out: torch.Tensor | None = None) -> Callable[[], Any]:
    """The callable to time for `direction`: the forward; its backward alone (one graph built,
    the backward repeated with retain_graph, as flash-attention's benchmark_backward); or both.
    `out`: a forward output already computed (saves a call)."""
    if direction == "fwd":
        return forward
    out = forward() if out is None else out
    dout = torch.randn_like(out)
    if direction == "bwd":
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), leaves, dout)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """(peak bytes one fn() call allocates above what was allocated before, method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - base, 0), "torch.cuda.max_memory_allocated"
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start / stop chatter
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative, in time order
        live += nbytes
        peak = max(peak, live)
    return peak, "peak of torch CPU allocations (profiler memory events)"


def measure(s: Settings, *, op: str, case: str, backend: str, direction: str, make: Callable[[], Callable],
            shape: dict, dtype: str, flops: float | None = None, bytes_: float | None = None,
            estimate: int | None = None, extra: dict | None = None) -> dict:
    """Time and measure one point. make() builds the inputs and returns the callable to time
    (it raises Unavailable when the backend cannot run). The pre-flight `estimate` (bytes)
    above the memory limit gives status "oom" without running anything."""
    rec = new_record(op, case, backend, direction, dtype, shape, flops=flops, bytes_=bytes_,
                     estimate=estimate, **(extra or {}))
    if estimate is not None and estimate > s.mem_limit:
        return set_status(rec, "oom", f"estimated {fmt_bytes(estimate)} > memory limit "
                                      f"{fmt_bytes(s.mem_limit)}: not attempted")
    fn, failed = None, False
    try:
        fn = make()
        rec["time"] = time_calls(fn, s)
        rec["peak_bytes"], rec["memory_method"] = peak_memory(fn, s.device)
        add_rates(rec)
    except Unavailable as err:
        set_status(rec, "unavailable", str(err))
    except Exception as err:  # noqa: BLE001  (recorded, the benchmark goes on)
        if is_oom(err):
            set_status(rec, "oom", f"{type(err).__name__}: {str(err).split(chr(10))[0][:300]}")
        else:
            log.exception("%s %s %s %s failed", op, case, backend, direction)
            set_status(rec, "error", f"{type(err).__name__}: {str(err)[:500]}")
        failed = True
    del fn
    if failed:
        gc.collect()  # the failure's traceback frames held the inputs (slow: only then)
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    log_record(rec)
    return rec


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def new_record(op: str, case: str, backend: str, direction: str, dtype: str, shape: dict, *,
               flops: float | None = None, bytes_: float | None = None,
               estimate: int | None = None, **extra) -> dict:
    return {"op": op, "case": case, "backend": backend, "direction": direction, "dtype": dtype,
            "shape": shape, "status": "ok", "reason": None, "flops": flops, "bytes": bytes_,
            "time": None, "tflops": None, "gbps": None, "peak_bytes": None, "memory_method": None,
            "estimate_bytes": estimate, **extra}


def set_status(rec: dict, status: str, reason: str) -> dict:
    rec["status"], rec["reason"] = status, reason
    return rec


def add_rates(rec: dict) -> None:
    """TFLOP/s and GB/s from the median time and the per-call FLOPs / bytes."""
    seconds = rec["time"]["median_ms"] / 1e3
    if rec["flops"]:
        rec["tflops"] = rec["flops"] / seconds / 1e12
    if rec["bytes"]:
        rec["gbps"] = rec["bytes"] / seconds / 1e9


def log_record(rec: dict) -> None:
    if rec["status"] == "ok":
        rate = f" {rec['tflops']:.4g} TFLOP/s" if rec["tflops"] else ""
        rate += f" {rec['gbps']:.4g} GB/s" if rec["gbps"] else ""
        log.info("%s | %s | %s | %s: %.3f ms%s, peak %s", rec["op"], rec["case"], rec["backend"],
                 rec["direction"], rec["time"]["median_ms"], rate, fmt_bytes(rec["peak_bytes"]))
    else:
        log.info("%s | %s | %s | %s: %s (%s)", rec["op"], rec["case"], rec["backend"],
                 rec["direction"], rec["status"], rec["reason"])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def parse_bytes(text: str) -> int:
    """'512MB', '2GB', '1.5GiB', '1000000' -> bytes (binary units: 1 GB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 20GB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


# ----------------------------------------------------------------------------------------------
# Fresh child processes (forked from a server that has torch imported: no 4 s import per point)
# ----------------------------------------------------------------------------------------------
_mp = None


def _context():
    global _mp
    if _mp is None:
        _mp = multiprocessing.get_context("forkserver")
        _mp.set_forkserver_preload(["torch", "hicmae_dist.ops", "kernels.harness"])
    return _mp


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def _child(conn, module: str, func: str, kwargs: dict, mem_limit: int, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        # a real allocation beyond the limit fails (and is reported as oom) instead of
        # swapping or waking the OOM killer: address space now + the limit + slack for threads
        cap = _status_kb("VmSize") * 1024 + mem_limit + 2 ** 30
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
        result = getattr(importlib.import_module(module), func)(**kwargs)
        conn.send(("ok", result))
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        conn.send(("oom" if is_oom(err) else "error", f"{type(err).__name__}: {str(err)[:500]}"))
    finally:
        conn.close()


def run_isolated(module: str, func: str, kwargs: dict, s: Settings) -> tuple[str, Any]:
    """Call module.func(**kwargs) in a fresh process (address space capped near the memory
    limit). Returns ("ok", result) or (status, reason) with status "oom" or "error"."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, module, func, kwargs, s.mem_limit, s.threads))
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:  # died without a word
        status, payload = None, None
    proc.join()
    if status is None:
        if proc.exitcode == -9:
            return "oom", "child killed by SIGKILL (the kernel's OOM killer)"
        return "error", f"child exited with status {proc.exitcode}"
    return status, payload


# ----------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
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
    repo = Path(__file__).resolve().parents[1]
    commit = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    desc = {
        "device": str(device),
        "cpu": {"model": cpu_model, "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "memory_total_bytes": meminfo("MemTotal"),
                "memory_available_bytes": meminfo("MemAvailable"),
                "load_average": list(os.getloadavg())},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "triton": _version("triton"),
                     "xformers": _version("xformers"), "hicmae_dist": _version("hicmae-dist"),
                     "commit": (commit + ("+dirty" if dirty else "")) if commit else None},
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "sm_count": props.multi_processor_count, "memory_bytes": props.total_memory,
               "cudnn": torch.backends.cudnn.version()}
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
        smi = _run(["nvidia-smi", f"--id={device.index or 0}", f"--query-gpu={query}",
                    "--format=csv,noheader"])
        if smi:
            gpu.update(zip(("driver", "clock_sm", "clock_sm_max", "clock_mem", "clock_mem_max",
                            "power_limit"), (v.strip() for v in smi.split(","))))
        desc["gpu"] = gpu
    return desc


def machine_line(m: dict) -> str:
    cpu = m["cpu"]
    text = (f"{cpu['model']} ({cpu['usable_cores']} cores usable, {cpu['capability']}, "
            f"{fmt_bytes(cpu['memory_total_bytes'])} RAM), torch {m['versions']['torch']} "
            f"({m['torch_threads']} threads), triton {m['versions']['triton']}")
    if m["gpu"]:
        g = m["gpu"]
        text += (f"; GPU {g['name']} (sm_{g['capability'].replace('.', '')}, driver "
                 f"{g.get('driver', '?')}, SM clock {g.get('clock_sm', '?')} of {g.get('clock_sm_max', '?')})")
    else:
        text += "; no GPU"
    return text


# ----------------------------------------------------------------------------------------------
# Markdown, plots, MLflow, compare
# ----------------------------------------------------------------------------------------------
def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sig(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


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
        rows.append([r["case"], shape_text(r), r["backend"], r["direction"],
                     f"{t['median_ms']:.4g}" if ok else "-",
                     f"{t['p25_ms']:.3g}-{t['p75_ms']:.3g}" if ok else "-",
                     sig(r["tflops"]) if ok else "-", sig(r["gbps"]) if ok else "-",
                     fmt_bytes(r["peak_bytes"]) if ok else "-",
                     r["status"] if ok else f"{r['status']}: {r['reason']}"])
    text = md_table(["case", "shape", "backend", "dir", "median ms", "IQR ms", "TFLOP/s", "GB/s",
                     "peak mem", "status"], rows)
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

    return md_table(["case", "shape", "dir", *(f"{b}: ms ({unit})" for b in backends)],
                    [[*key, *(cell(by.get(b)) for b in backends)] for key, by in rows.items()])


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
    for ax in list(axes.flat)[len(panels):]:
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

    tracker = Tracker(True, uri, "kernel-bench", out_dir, run_name=f"kernels {results['machine']['device']}",
                      system_metrics_s=0)
    m = results["machine"]
    params = {"device": m["device"], "cpu": m["cpu"]["model"], "threads": m["torch_threads"],
              "gpu": (m["gpu"] or {}).get("name"), "driver": (m["gpu"] or {}).get("driver"),
              **{f"version.{k}": v for k, v in m["versions"].items()},
              **{f"setting.{k}": v for k, v in results["settings"].items()}}
    tracker.log_params(params)
    metrics = {}
    for op, section in results["ops"].items():
        for r in section["records"]:
            if r.get("status") != "ok" or not r.get("time"):
                continue
            key = (op, r["case"], r["backend"], r["direction"])
            metrics[_metric_name(*key, "median_ms")] = r["time"]["median_ms"]
            for name, value in (("tflops", r["tflops"]), ("gbps", r["gbps"]),
                                ("peak_mb", None if r["peak_bytes"] is None else r["peak_bytes"] / 2 ** 20)):
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
        rows.append([*key[:4], f"{tx:.4g}", f"{ty:.4g}", f"{ty / tx:.3f}", fmt_bytes(mx), fmt_bytes(my),
                     f"{my / mx:.3f}" if mx and my is not None else "-"])
    only = [k for k in ra if k not in rb] + [k for k in rb if k not in ra]
    text = (f"A: {path_a} ({a['created']}, {machine_line(a['machine'])})\n"
            f"B: {path_b} ({b['created']}, {machine_line(b['machine'])})\n\n"
            + md_table(["op", "case", "backend", "dir", "A ms", "B ms", "B/A time", "A mem", "B mem",
                        "B/A mem"], rows))
    if only:
        text += f"\n\n{len(only)} records in only one of the two (not compared)."
    return text


# ----------------------------------------------------------------------------------------------
# Command line: `python -m kernels[.<op>]` and `hicmae-dist bench kernels`
# ----------------------------------------------------------------------------------------------
def op_module(name: str):
    return importlib.import_module(f"kernels.{name}")


def add_arguments(p: argparse.ArgumentParser, ops: tuple[str, ...] = OPS) -> None:
    """The common options, then each op module's own (`add_arguments(parser)`)."""
    from hicmae_dist.models.info import MODELS
    from kernels.shapes import QUICK_MODELS

    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few repeats: the whole run in a couple of minutes on a CPU")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory of results.json, results.md and the plots (default {DEFAULT_OUT})")
    if len(ops) > 1:
        p.add_argument("--ops", nargs="+", choices=ops, default=list(ops), metavar="OP",
                       help=f"which benchmarks to run (default all: {' '.join(ops)})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="dtype of the attention and token ops (auto: bfloat16 on CUDA, as the models "
                        "train; float32 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--models", nargs="+", default=None, choices=tuple(MODELS), metavar="MODEL",
                   help="models whose attention / token / target-normalisation calls are benchmarked: "
                        f"{' '.join(MODELS)} (default all; --quick: {' '.join(QUICK_MODELS)})")
    p.add_argument("--model-batch", type=int, default=None,
                   help="batch of the model cases (default: each preset's per-GPU batch; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10, --quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds one timed repeat lasts at least; short calls are repeated within it "
                        "(default 0.01, --quick 0)")
    p.add_argument("--mem-limit", type=parse_bytes, default=None,
                   help="memory a case may use, e.g. 20GB; above it (pre-flight estimate) the case is "
                        "recorded as oom (default: MemAvailable, or the GPU's free memory)")
    p.add_argument("--mlflow", metavar="URI", default=None,
                   help="also log the results to MLflow (e.g. sqlite:///mlflow.db, http://host:5000)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print per-record ratios B/A of two results files and exit")
    for name in ops:
        op_module(name).add_arguments(p)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if args.mem_limit is not None:
        limit = args.mem_limit
    elif device.type == "cuda":
        limit = torch.cuda.mem_get_info(device)[0]
    else:
        limit = meminfo("MemAvailable") or 2 ** 34
    q = args.quick
    return Settings(device=device, dtype=dtype, quick=q,
                    warmup=args.warmup if args.warmup is not None else (1 if q else 2),
                    repeats=args.repeats if args.repeats is not None else (3 if q else 10),
                    min_time=args.min_time if args.min_time is not None else (0.0 if q else 0.01),
                    mem_limit=limit, threads=torch.get_num_threads(), args=args)


def run(args: argparse.Namespace, ops: tuple[str, ...], command: str) -> int:
    """Run the ops, write the outputs, print the markdown. Exit status 1 if a record is "error"."""
    if args.compare:
        print(compare(*args.compare))
        return 0
    ops = tuple(getattr(args, "ops", None) or ops)
    s = settings_from(args)
    log.info("kernel benchmarks %s on %s, dtype %s, %d threads, memory limit %s%s", " ".join(ops),
             s.device, str(s.dtype)[6:], s.threads, fmt_bytes(s.mem_limit), " (quick)" if s.quick else "")
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if s.device.type == "cpu" and s.threads > 1 and load > cores - s.threads + 0.5:
        log.warning("load average %.1f on %d cores: %d torch threads will contend with other work and "
                    "time far slower than alone (--threads 1 is steadier on a shared machine)",
                    load, cores, s.threads)
    results = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": command, "quick": s.quick,
               "machine": machine(s.device),
               "settings": {"device": str(s.device), "dtype": str(s.dtype)[6:], "warmup": s.warmup,
                            "repeats": s.repeats, "min_time_s": s.min_time, "mem_limit_bytes": s.mem_limit,
                            "threads": s.threads},
               "ops": {}}
    for name in ops:
        start = time.monotonic()
        results["ops"][name] = op_module(name).run(s)
        results["ops"][name]["seconds"] = round(time.monotonic() - start, 1)
    files = write_outputs(results, args.out)
    if args.mlflow:
        run_id = log_mlflow(args.mlflow, results, files, args.out)
        print(f"MLflow run {run_id} at {args.mlflow}")
    print(render_markdown(results))
    print(f"\nresults: {', '.join(str(f) for f in files)}")
    errors = [r for sec in results["ops"].values() for r in sec["records"] + sec.get("kernels", [])
              if r["status"] == "error"]
    return 1 if errors else 0


def render_markdown(results: dict) -> str:
    parts = [f"# Kernel microbenchmarks ({results['created']})", "",
             f"Command: `{results['command']}`", "", f"Machine: {machine_line(results['machine'])}", ""]
    for name, section in results["ops"].items():
        parts += [f"## {name} ({section['seconds']} s)", "", op_module(name).markdown(section), ""]
    return "\n".join(parts)


def write_outputs(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    files[1].write_text(render_markdown(results) + "\n")
    for name, section in results["ops"].items():
        plot = getattr(op_module(name), "plot", None)
        if plot is not None:
            files += plot(section, out)
    return files


def main(argv: list[str] | None = None, ops: tuple[str, ...] = OPS) -> int:
    """`python -m kernels` (all ops) and `python -m kernels.<op>` (one)."""
    argv = sys.argv[1:] if argv is None else argv
    name = "kernels" if len(ops) > 1 else f"kernels.{ops[0]}"
    doc = op_module(ops[0]).__doc__ if len(ops) == 1 else __doc__
    p = argparse.ArgumentParser(prog=f"python -m {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ops)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args, ops, shell_command(f"python -m {name}", argv))


def shell_command(program: str, argv: list[str]) -> str:
    return " ".join([program, *(shlex.quote(a) for a in argv)])
