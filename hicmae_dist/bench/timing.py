"""The timing core of every benchmark: device sync, timed calls, summaries, peak memory.

time_calls: warm-up calls, then `repeats` timed repeats of `number` calls each (number
calibrated so a repeat lasts >= min_time), synchronising CUDA around each; median, quartiles,
min and max per call (flash-attention's benchmark helpers, one place).
Peak memory: on CUDA, torch.cuda.max_memory_allocated after a reset, minus what was allocated
before. On the CPU two measures for two questions: `peak_memory` (one call; the peak of torch's
allocations from the profiler's memory events: resident-set figures are meaningless in a
long-lived process whose allocator keeps freed pages) and `PeakMemory` (a region of a process,
from the resident set, as `bench model` and the isolated children of `bench kernels` need).
"""

from __future__ import annotations

import math
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, min_time: float) -> dict:
    """Per-call time of fn(): {median_ms, p25_ms, p75_ms, min_ms, max_ms, repeats, number}."""
    took = 0.0
    for _ in range(max(warmup, 1)):  # the last warm-up call calibrates `number`
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - t0
    number = max(1, math.ceil(min_time / took)) if took > 0 else 1
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / number)
    return summarize_times(times, number)


def summarize_times(times: list[float], number: int = 1) -> dict:
    ms = sorted(1e3 * t for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "repeats": len(ms),
        "number": number,
    }


class Stopwatch:
    """Wall-clock and CPU (process) seconds of a `with` block: .wall, .cpu."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM, VmSize ...); None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory over a region. CUDA: max_memory_allocated after a reset (minus what was
    allocated at the start). CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at the start; where the reset is not possible,
    the growth of ru_maxrss, which misses peaks below an earlier one."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.start = (status_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "peak RSS (VmHWM) - RSS at start"
        except OSError:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            self.peak = (status_kb("VmHWM") or 0) * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta = max(self.peak - self.start, 0)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """(peak bytes one fn() call allocates above what was allocated before, method)."""
    if device.type == "cuda":
        with PeakMemory(device) as memory:
            fn()
        return memory.delta, memory.method
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start / stop chatter
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative, in time order
        live += nbytes
        peak = max(peak, live)
    return peak, "peak of torch CPU allocations (profiler memory events)"
