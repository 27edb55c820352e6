"""Benchmark (not a test): peak memory and time of ops.info_nce's chunked CPU path against the
naive full-logits loss, forward + backward, symmetric, fp32, on the CPU.

Each measurement runs in a fresh child process; memory is the rise of the process's peak RSS
(getrusage ru_maxrss) over its RSS once the inputs exist, i.e. what the loss and its backward
add on top of the features. Usage:
    python kernels/info_nce.py                      # batches 4096 8192 16384, d 256
    python kernels/info_nce.py --batch 16384 65536 --skip-naive-above 16384
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, batch: int, dim: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hicmae_dist.ops.info_nce import info_nce, info_nce_reference

    torch.manual_seed(0)
    a = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    # warm up the code paths on a tiny problem so their one-off allocations are not counted
    small = (a[:64].detach().clone().requires_grad_(), b[:64].detach().clone().requires_grad_())
    info_nce(*small, 0.07, backend="torch", chunk=16).backward()
    info_nce_reference(*small, 0.07).backward()
    before = _rss_mb()
    start = time.perf_counter()
    if mode == "naive":
        loss = info_nce_reference(a, b, 0.07)
    else:
        loss = info_nce(a, b, 0.07, backend="torch", chunk=chunk)
    loss.backward()
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    return {"mode": mode, "batch": batch, "peak_mb": max(peak - before, 0.0), "seconds": took,
            "loss": float(loss)}


def run(mode, batch, dim, chunk) -> dict | None:
    cmd = [sys.executable, __file__, "--child", mode, "--batch", str(batch), "--dim", str(dim),
           "--chunk", str(chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{mode} B={batch} failed (exit {proc.returncode}): {proc.stderr[-500:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--skip-naive-above", type=int, default=16384,
                   help="do not run the naive loss above this batch (its logits alone are "
                        "4 * B^2 bytes); its column then shows that lower bound")
    p.add_argument("--child", choices=["naive", "ours"])
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch[0], args.dim, args.chunk)))
        return
    print(f"info_nce fwd+bwd, symmetric, fp32, CPU, d={args.dim}, chunk={args.chunk}")
    print(f"{'batch':>7} {'naive MB':>10} {'ours MB':>9} {'ratio':>7} {'naive s':>8} {'ours s':>7}"
          f" {'|dloss|':>9}")
    for batch in args.batch:
        ours = run("ours", batch, args.dim, args.chunk)
        if batch <= args.skip_naive_above:
            naive = run("naive", batch, args.dim, args.chunk)
        else:
            naive = None
        if ours is None:
            continue
        if naive is not None:
            naive_mb, naive_s = f"{naive['peak_mb']:.0f}", f"{naive['seconds']:.1f}"
            ratio = naive["peak_mb"] / max(ours["peak_mb"], 1e-9)
            dloss = f"{abs(naive['loss'] - ours['loss']):.1e}"
        else:
            bound = 4 * batch * batch / 2**20  # one fp32 logits matrix, a lower bound
            naive_mb, naive_s, dloss = f">{bound:.0f}", "-", "-"
            ratio = bound / max(ours["peak_mb"], 1e-9)
        print(f"{batch:>7} {naive_mb:>10} {ours['peak_mb']:>9.0f} {ratio:>6.0f}x {naive_s:>8}"
              f" {ours['seconds']:>7.1f} {dloss:>9}", flush=True)


if __name__ == "__main__":
    main()
