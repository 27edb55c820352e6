"""info_nce: ours (blockwise, hicmae_dist.ops.info_nce) against the naive full-logits loss,
local and global negatives, forward + backward, symmetric, fp32 features (as the models' loss).

Backends: "triton" and "torch" (ours: the Triton kernels on CUDA, the chunked PyTorch path;
the Triton one is "unavailable" on a CPU), "naive" (logits materialised: info_nce_reference
for local negatives, the same cross-entropy over this rank's rows x all columns for global).
Negatives:
  local:  one process holds the batch B: B x B problem (`info_nce(..., negatives="local")`).
  global: the view of rank 0 of `--nce-world` W ranks with global batch B: B / W rows against
          all B gathered columns. The public `info_nce(..., negatives="global")` runs with the
          process group simulated (world size W; the all-gather returns this rank's features
          followed by the other ranks', leaf tensors standing for what the collective brings):
          the same code path as training, without the communication.
Every point runs in a fresh child process (memory is the point): peak memory is the rise of
the peak resident set over the process's footprint once the inputs exist (CUDA:
max_memory_allocated), i.e. what the loss and its backward add. On the CPU the memory is the
figure that transfers to the GPU: ours never holds B_rows x B_cols logits.
FLOPs per call (the registered formula of hicmae_dist::info_nce_fwd): forward 2 * rows * cols * d
per direction, backward twice that (dx and dy), two directions.

    python -m kernels.info_nce --quick
    python -m kernels.info_nce --nce-batch 4096 8192 16384 65536 --nce-dim 256 --nce-negatives local
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn.functional as F

from hicmae_dist.bench import report, timing
from hicmae_dist.bench.kernels import harness
from hicmae_dist.ops.info_nce import DEFAULT_CHUNK, _info_nce_fwd_flops, info_nce, info_nce_reference, resolve_backend

OPS_MODULE = sys.modules["hicmae_dist.ops.info_nce"]  # (hicmae_dist.ops.info_nce is the function)

NAME = "info_nce"
BACKENDS = ("triton", "torch", "naive")
NEGATIVES = ("local", "global")
BATCHES = tuple(1024 * 2**i for i in range(9))  # 1k ... 256k
DIMS = (256, 512)
QUICK = dict(batches=(1024, 4096), dims=(64,))
TEMPERATURE = 0.07
# fp32 B_rows x B_cols matrices the naive loss holds at its peak: the logits, the two
# directions' log-softmax outputs and the logits' gradient (measured: ~3.9, see `calibrate`)
NAIVE_MATRICES = 4
CHUNK_TILES = 6  # chunk x chunk fp32 tiles the torch path holds at once (scores, exp, dz, ...)


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------
def shape(negatives: str, batch: int, dim: int, world: int, chunk: int) -> dict:
    rows = batch // world if negatives == "global" else batch
    return {
        "negatives": negatives,
        "batch": batch,
        "rows": rows,
        "cols": batch,
        "dim": dim,
        "world": world if negatives == "global" else 1,
        "chunk": chunk,
        "symmetric": True,
    }


def flops(sh: dict) -> float:
    """Forward + backward, both directions: 2 x (fwd + 2 fwd)."""
    fwd = _info_nce_fwd_flops((sh["rows"], sh["dim"]), (sh["cols"], sh["dim"]))
    return 2 * 3 * fwd


def estimate_bytes(backend: str, sh: dict) -> int:
    """Pre-flight estimate: features (rows and gathered columns, both modalities) and their
    gradients, plus the naive loss's logits-sized matrices or our torch path's tiles."""
    feats = 2 * 4 * sh["dim"] * 2 * (sh["rows"] + sh["cols"])
    if backend == "naive":
        return feats + NAIVE_MATRICES * 4 * sh["rows"] * sh["cols"]
    if backend == "torch":
        return feats + CHUNK_TILES * 4 * sh["chunk"] ** 2
    return feats


# ----------------------------------------------------------------------------------------------
# One point, in a child process
# ----------------------------------------------------------------------------------------------
def _naive_global(a, b, gathered, temperature):
    """The full-logits loss of rank 0: its rows (M, D) against all gathered columns (N, D)."""
    d = a.shape[1]
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (
        F.cross_entropy(a @ gathered[:, d:].T / temperature, target)
        + F.cross_entropy(b @ gathered[:, :d].T / temperature, target)
    )


def loss_fn(backend: str, sh: dict, a, b, others):
    """The scalar loss rank 0 computes. a, b (rows, d); others (cols - rows, 2d): the other
    ranks' [a | b] features as the all-gather would bring them (None for local)."""
    if others is None:
        if backend == "naive":
            return info_nce_reference(a, b, TEMPERATURE)
        return info_nce(a, b, TEMPERATURE, backend=backend, chunk=sh["chunk"])
    gather = lambda x, group=None: (torch.cat([x, others]), 0)  # noqa: E731  (rank 0 first)
    if backend == "naive":
        return _naive_global(a, b, gather(torch.cat([a, b], dim=1))[0], TEMPERATURE)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(OPS_MODULE, "world", lambda group=None: (0, sh["world"])))
        stack.enter_context(mock.patch.object(OPS_MODULE, "all_gather_with_grad", gather))
        return info_nce(a, b, TEMPERATURE, negatives="global", backend=backend, chunk=sh["chunk"])


def point(backend: str, sh: dict, device: str, repeats: int) -> dict:
    """Child process: the first full-size forward + backward gives the peak memory and a time;
    more timed calls follow when it was short (< 1 s)."""

    dev = torch.device(device)

    def inputs(rows: int, cols: int):
        g = torch.Generator(device=dev).manual_seed(0)

        def leaf(n: int, width: int):
            return F.normalize(torch.randn(n, width, generator=g, device=dev), dim=-1).requires_grad_()

        others = leaf(cols - rows, 2 * sh["dim"]) if sh["negatives"] == "global" else None
        return leaf(rows, sh["dim"]), leaf(rows, sh["dim"]), others

    def call(a, b, others):
        loss = loss_fn(backend, sh, a, b, others)
        loss.backward()
        return float(loss.detach())

    # the code paths once on a tiny problem: their one-off allocations are not the loss's
    call(*inputs(min(sh["rows"], 32), min(sh["cols"], 32 * sh["world"])))
    a, b, others = inputs(sh["rows"], sh["cols"])
    times = []
    with timing.PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        loss = call(a, b, others)
        timing.sync(dev)
        times.append(time.perf_counter() - t0)
    while times[0] < 1.0 and len(times) < repeats:
        for x in (a, b, others):
            if x is not None:
                x.grad = None
        t0 = time.perf_counter()
        call(a, b, others)
        timing.sync(dev)
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak_bytes": mem.delta, "memory_method": f"fresh process: {mem.method}", "loss": loss}


def measure_point(s: harness.Settings, backend: str, sh: dict) -> dict:
    case = f"{sh['negatives']} B{sh['batch']} d{sh['dim']}"
    est = estimate_bytes(backend, sh)
    rec = harness.new_record(NAME, case, backend, "fwd+bwd", "float32", sh, flops=flops(sh), estimate=est)
    if backend != "naive":
        try:
            resolve_backend(backend, torch.empty(0, device=s.device))
        except RuntimeError as err:
            harness.set_status(rec, "unavailable", str(err))
            harness.log_record(rec)
            return rec
    if est > s.mem_limit:
        harness.set_status(
            rec,
            "oom",
            f"estimated {report.fmt_bytes(est)} > memory limit {report.fmt_bytes(s.mem_limit)}: not attempted",
        )
    else:
        kwargs = dict(backend=backend, sh=sh, device=str(s.device), repeats=s.repeats)
        status, payload = harness.run_isolated("hicmae_dist.bench.kernels.info_nce", "point", kwargs, s)
        if status == "ok":
            rec["time"] = timing.summarize_times(payload["times"])
            rec["peak_bytes"], rec["memory_method"] = payload["peak_bytes"], payload["memory_method"]
            rec["loss"] = payload["loss"]
            harness.add_rates(rec)
        else:
            harness.set_status(rec, status, payload)
    harness.log_record(rec)
    return rec


def run(s: harness.Settings) -> dict:
    a = s.args
    batches = a.nce_batch or (QUICK["batches"] if s.quick else BATCHES)
    dims = a.nce_dim or (QUICK["dims"] if s.quick else DIMS)
    records = [
        measure_point(s, backend, shape(neg, batch, dim, a.nce_world, a.nce_chunk))
        for neg in a.nce_negatives
        for dim in dims
        for batch in batches
        for backend in a.nce_backends
    ]
    return {"records": records, "summary": summarize(records)}


# ----------------------------------------------------------------------------------------------
# Summary: memory against the naive loss, measured or (calibrated) estimated
# ----------------------------------------------------------------------------------------------
def calibrate(records: list[dict]) -> dict | None:
    """Logits-sized fp32 matrices the naive loss really holds: median over its measured points
    of peak / (4 rows cols), from the largest problems (>= 4096^2 logits) when there are any."""
    naive = [r for r in records if r["backend"] == "naive" and r["status"] == "ok" and r["peak_bytes"]]
    big = [r for r in naive if r["shape"]["rows"] * r["shape"]["cols"] >= 4096**2] or naive
    if not big:
        return None
    per = [r["peak_bytes"] / (4 * r["shape"]["rows"] * r["shape"]["cols"]) for r in big]
    return {"matrices": statistics.median(per), "from": sorted(r["case"] for r in big)}


def summarize(records: list[dict]) -> dict:
    cal = calibrate(records)
    rows = []
    for ours in (r for r in records if r["backend"] != "naive" and r["status"] == "ok"):
        sh = ours["shape"]
        naive = next((r for r in records if r["backend"] == "naive" and r["case"] == ours["case"]), None)
        if naive is not None and naive["status"] == "ok":
            naive_bytes, source = naive["peak_bytes"], "measured"
        elif cal is not None:
            naive_bytes = cal["matrices"] * 4 * sh["rows"] * sh["cols"]
            source = f"estimate: {cal['matrices']:.2f} x 4 rows cols bytes"
        else:
            naive_bytes, source = NAIVE_MATRICES * 4 * sh["rows"] * sh["cols"], "estimate (uncalibrated)"
        rows.append(
            {
                "case": ours["case"],
                "backend": ours["backend"],
                "ours_bytes": ours["peak_bytes"],
                "ours_s": ours["time"]["median_ms"] / 1e3,
                "naive_bytes": naive_bytes,
                "naive_source": source,
                "naive_s": naive["time"]["median_ms"] / 1e3 if naive and naive["status"] == "ok" else None,
                "ratio": naive_bytes / max(ours["peak_bytes"], 1),
            }
        )
    return {"calibration": cal, "memory_vs_naive": rows}


def shape_text(r: dict) -> str:
    sh = r["shape"]
    return f"{sh['rows']}x{sh['cols']} d{sh['dim']}" + (f" W{sh['world']}" if sh["world"] > 1 else "")


def markdown(section: dict) -> str:
    summary = section["summary"]
    cal = summary["calibration"]
    rows = [
        [
            r["case"],
            r["backend"],
            report.fmt_bytes(r["ours_bytes"]),
            report.fmt_bytes(r["naive_bytes"]),
            r["naive_source"],
            f"{r['ratio']:.0f}x",
            f"{r['ours_s']:.3g}",
            report.sig(r["naive_s"]),
        ]
        for r in summary["memory_vs_naive"]
    ]
    text = (
        "Forward + backward, symmetric, fp32; memory = peak rise in a fresh process (CUDA: "
        "max_memory_allocated).\n\n" + report.timing_table(section["records"], shape_text)
    )
    text += (
        "\n\nMemory against the naive loss"
        + (
            f" (naive calibrated: {cal['matrices']:.2f} logits-sized fp32 matrices, from {', '.join(cal['from'])})"
            if cal
            else ""
        )
        + ":\n\n"
    )
    return text + report.md_table(
        ["case", "ours", "ours mem", "naive mem", "naive from", "naive / ours", "ours s", "naive s"], rows
    )


def plot(section: dict, out) -> list:
    ok = [r for r in section["records"] if r["status"] == "ok"]
    if not ok:
        return []
    mem, secs = {}, {}
    for r in ok:
        label = f"{r['backend']} {r['shape']['negatives']} d{r['shape']['dim']}"
        mem.setdefault(label, []).append((r["shape"]["batch"], r["peak_bytes"] / 2**20))
        secs.setdefault(label, []).append((r["shape"]["batch"], r["time"]["median_ms"] / 1e3))
    panels = [
        {"title": "peak memory", "xlabel": "global batch", "ylabel": "MB", "series": mem, "logy": True},
        {"title": "time (fwd + bwd)", "xlabel": "global batch", "ylabel": "s", "series": secs, "logy": True},
    ]
    return [report.line_plot(out / "info_nce_memory.png", panels, "info_nce vs naive")]


def add_arguments(p) -> None:
    g = p.add_argument_group("info_nce")
    g.add_argument(
        "--nce-batch",
        nargs="+",
        type=int,
        default=None,
        help="global batches (default 1k 2k ... 256k; --quick 1024 4096)",
    )
    g.add_argument("--nce-dim", nargs="+", type=int, default=None, help="feature dims (default 256 512; --quick 64)")
    g.add_argument("--nce-negatives", nargs="+", choices=NEGATIVES, default=list(NEGATIVES))
    g.add_argument("--nce-backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    g.add_argument("--nce-world", type=int, default=8, help="ranks of the global-negatives view (default 8)")
    g.add_argument(
        "--nce-chunk", type=int, default=DEFAULT_CHUNK, help=f"tile of the torch path (default {DEFAULT_CHUNK})"
    )


def main(argv=None, prog: str | None = None) -> int:
    return harness.main(argv, (NAME,), prog)


if __name__ == "__main__":
    raise SystemExit(main())
