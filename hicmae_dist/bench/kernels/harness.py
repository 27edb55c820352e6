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

Timing and peak memory come from hicmae_dist.bench.timing (time_calls, peak_memory; in a fresh
child process, `run_isolated`, used where memory is the point, the rise of the peak resident set);
the machine description, tables, plots, MLflow and compare from hicmae_dist.bench.report.

Outputs (`write_outputs`): results.json (schema `SCHEMA`, with the machine description),
results.md, PNG plots, optionally an MLflow run. `--compare` prints per-record ratios of two JSONs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import multiprocessing
import os
import re
import resource
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hicmae_dist.bench.report import compare, fmt_bytes, log_mlflow, machine, machine_line, meminfo
from hicmae_dist.bench.timing import is_oom, peak_memory, status_kb, time_calls

log = logging.getLogger("kernels")
SCHEMA = "hicmae-dist/kernel-bench/1"
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
STATUSES = ("ok", "oom", "unavailable", "error")
OPS = ("attention", "info_nce", "tokens", "patch_norm", "static")  # modules hicmae_dist.bench.kernels.<op>
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
# One measured point
# ----------------------------------------------------------------------------------------------
def directional(
    forward: Callable[[], torch.Tensor], leaves: tuple, direction: str, out: torch.Tensor | None = None
) -> Callable[[], Any]:
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


def measure(
    s: Settings,
    *,
    op: str,
    case: str,
    backend: str,
    direction: str,
    make: Callable[[], Callable],
    shape: dict,
    dtype: str,
    flops: float | None = None,
    bytes_: float | None = None,
    estimate: int | None = None,
    extra: dict | None = None,
) -> dict:
    """Time and measure one point. make() builds the inputs and returns the callable to time
    (it raises Unavailable when the backend cannot run). The pre-flight `estimate` (bytes)
    above the memory limit gives status "oom" without running anything."""
    rec = new_record(
        op, case, backend, direction, dtype, shape, flops=flops, bytes_=bytes_, estimate=estimate, **(extra or {})
    )
    if estimate is not None and estimate > s.mem_limit:
        return set_status(
            rec, "oom", f"estimated {fmt_bytes(estimate)} > memory limit {fmt_bytes(s.mem_limit)}: not attempted"
        )
    fn, failed = None, False
    try:
        fn = make()
        rec["time"] = time_calls(fn, s.device, warmup=s.warmup, repeats=s.repeats, min_time=s.min_time)
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
def new_record(
    op: str,
    case: str,
    backend: str,
    direction: str,
    dtype: str,
    shape: dict,
    *,
    flops: float | None = None,
    bytes_: float | None = None,
    estimate: int | None = None,
    **extra,
) -> dict:
    return {
        "op": op,
        "case": case,
        "backend": backend,
        "direction": direction,
        "dtype": dtype,
        "shape": shape,
        "status": "ok",
        "reason": None,
        "flops": flops,
        "bytes": bytes_,
        "time": None,
        "tflops": None,
        "gbps": None,
        "peak_bytes": None,
        "memory_method": None,
        "estimate_bytes": estimate,
        **extra,
    }


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
        log.info(
            "%s | %s | %s | %s: %.3f ms%s, peak %s",
            rec["op"],
            rec["case"],
            rec["backend"],
            rec["direction"],
            rec["time"]["median_ms"],
            rate,
            fmt_bytes(rec["peak_bytes"]),
        )
    else:
        log.info(
            "%s | %s | %s | %s: %s (%s)",
            rec["op"],
            rec["case"],
            rec["backend"],
            rec["direction"],
            rec["status"],
            rec["reason"],
        )


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
        _mp.set_forkserver_preload(["torch", "hicmae_dist.ops", "hicmae_dist.bench.kernels.harness"])
    return _mp


def _child(conn, module: str, func: str, kwargs: dict, mem_limit: int, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        # a real allocation beyond the limit fails (and is reported as oom) instead of
        # swapping or waking the OOM killer: address space now + the limit + slack for threads
        cap = status_kb("VmSize") * 1024 + mem_limit + 2**30
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
# Command line: `python -m hicmae_dist.bench.kernels[.<op>]` and `hicmae-dist bench kernels`
# ----------------------------------------------------------------------------------------------
def op_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def add_arguments(p: argparse.ArgumentParser, ops: tuple[str, ...] = OPS) -> None:
    """The common options, then each op module's own (`add_arguments(parser)`)."""
    from hicmae_dist.bench.kernels.shapes import QUICK_MODELS
    from hicmae_dist.models.info import MODELS

    p.add_argument(
        "--quick", action="store_true", help="tiny shapes, few repeats: the whole run in a couple of minutes on a CPU"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory of results.json, results.md and the plots (default {DEFAULT_OUT})",
    )
    if len(ops) > 1:
        p.add_argument(
            "--ops",
            nargs="+",
            choices=ops,
            default=list(ops),
            metavar="OP",
            help=f"which benchmarks to run (default all: {' '.join(ops)})",
        )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="dtype of the attention and token ops (auto: bfloat16 on CUDA, as the models train; float32 on the CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=tuple(MODELS),
        metavar="MODEL",
        help="models whose attention / token / target-normalisation calls are benchmarked: "
        f"{' '.join(MODELS)} (default all; --quick: {' '.join(QUICK_MODELS)})",
    )
    p.add_argument(
        "--model-batch",
        type=int,
        default=None,
        help="batch of the model cases (default: each preset's per-GPU batch; --quick 2)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10, --quick 3)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds one timed repeat lasts at least; short calls are repeated within it (default 0.01, --quick 0)",
    )
    p.add_argument(
        "--mem-limit",
        type=parse_bytes,
        default=None,
        help="memory a case may use, e.g. 20GB; above it (pre-flight estimate) the case is "
        "recorded as oom (default: MemAvailable, or the GPU's free memory)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        default=None,
        help="also log the results to MLflow (e.g. sqlite:///mlflow.db, http://host:5000)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="print per-record ratios B/A of two results files and exit",
    )
    for name in ops:
        op_module(name).add_arguments(p)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
    }[args.dtype]
    if args.mem_limit is not None:
        limit = args.mem_limit
    elif device.type == "cuda":
        limit = torch.cuda.mem_get_info(device)[0]
    else:
        limit = meminfo("MemAvailable") or 2**34
    q = args.quick
    return Settings(
        device=device,
        dtype=dtype,
        quick=q,
        warmup=args.warmup if args.warmup is not None else (1 if q else 2),
        repeats=args.repeats if args.repeats is not None else (3 if q else 10),
        min_time=args.min_time if args.min_time is not None else (0.0 if q else 0.01),
        mem_limit=limit,
        threads=torch.get_num_threads(),
        args=args,
    )


def run(args: argparse.Namespace, ops: tuple[str, ...], command: str) -> int:
    """Run the ops, write the outputs, print the markdown. Exit status 1 if a record is "error"."""
    if args.compare:
        print(compare(*args.compare))
        return 0
    ops = tuple(getattr(args, "ops", None) or ops)
    s = settings_from(args)
    log.info(
        "kernel benchmarks %s on %s, dtype %s, %d threads, memory limit %s%s",
        " ".join(ops),
        s.device,
        str(s.dtype)[6:],
        s.threads,
        fmt_bytes(s.mem_limit),
        " (quick)" if s.quick else "",
    )
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if s.device.type == "cpu" and s.threads > 1 and load > cores - s.threads + 0.5:
        log.warning(
            "load average %.1f on %d cores: %d torch threads will contend with other work and "
            "time far slower than alone (--threads 1 is steadier on a shared machine)",
            load,
            cores,
            s.threads,
        )
    results = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "quick": s.quick,
        "machine": machine(s.device),
        "settings": {
            "device": str(s.device),
            "dtype": str(s.dtype)[6:],
            "warmup": s.warmup,
            "repeats": s.repeats,
            "min_time_s": s.min_time,
            "mem_limit_bytes": s.mem_limit,
            "threads": s.threads,
        },
        "ops": {},
    }
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
    errors = [
        r for sec in results["ops"].values() for r in sec["records"] + sec.get("kernels", []) if r["status"] == "error"
    ]
    return 1 if errors else 0


def render_markdown(results: dict) -> str:
    parts = [
        f"# Kernel microbenchmarks ({results['created']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {machine_line(results['machine'])}",
        "",
    ]
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


def main(argv: list[str] | None = None, ops: tuple[str, ...] = OPS, prog: str | None = None) -> int:
    """`python -m hicmae_dist.bench.kernels[.<op>]`, and the checkout's `python -m kernels[.<op>]`
    (which passes its own `prog`): every op, or one."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or f"python -m {__package__}" + ("" if len(ops) > 1 else f".{ops[0]}")
    doc = op_module(ops[0]).__doc__ if len(ops) == 1 else __doc__
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ops)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args, ops, shell_command(prog, argv))


def shell_command(program: str, argv: list[str]) -> str:
    return " ".join([program, *(shlex.quote(a) for a in argv)])
