"""`hicmae-dist doctor`: one command that proves a machine.

It records the versions and the GPUs, then runs every check this machine can run: attention and
info_nce backends against their references (flash-attention's 2x / 3x error rule), the native
kernels (csrc), optimizer steps per attention backend (train.*), ZeRO-2/3 over 2 NCCL ranks
(zero), `bench kernels --quick` and nvJPEG against the CPU decoder (jpeg_decode). What each check
does and its tolerances: docs/gpu-reports/README.md, "The checks".

Each check gives one record: name, backend, device ("cpu": runs everywhere; "cuda": needs a GPU),
status ("pass" | "fail" | "error": it raised | "not run": reason says why), reason, summary,
seconds, metrics. The run goes on after a failure; the exit status is 0 iff no check failed or
raised. Writes OUT/doctor.json (schema SCHEMA: created, command, hostname, versions, gpus,
machine, checks, summary, seconds, exit_status) and OUT/doctor.md.

This module imports torch alone; each check imports what it needs, and a missing package makes
that check "not run" with the package named.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

SCHEMA = "hicmae-dist/doctor/1"
STATUSES = ("pass", "fail", "error", "not run")
DEFAULT_OUT = Path("build") / "doctor"
MODELS = ("hicmae-b", "cavmae-base")  # names of hicmae_dist.models.info.MODELS
ATTENTION_BACKENDS = ("triton", "sdpa", "xformers")
SHAPE_BATCH = 2  # the op checks' batch: errors depend on the sequence shapes, not on the batch
# flash-attention's rule (tests/ops/triton_interp): error against fp64 <= 2x (forward) / 3x
# (gradients) the plain path's, plus a floor of this times (1 + the reference's largest value)
# so that "2x an error that happens to be ~0" stays meaningful
FWD_BOUND, BWD_BOUND = 2.0, 3.0
ATTENTION_FLOORS = (2.0**-22, 2.0**-18)
INFO_NCE_FLOORS = (2.0**-20, 2.0**-16)
INFO_NCE_NAMES = ("loss", "da", "db")  # the models' temperature is fixed: no gradient to check
TRAIN_BATCH, TRAIN_STEPS, TRAIN_WARMUP, TRAIN_LR = 8, 10, 2, 1e-4
# bf16 autocast against fp32 after 10 steps from the same weights on the same clips: the losses
# are means over 10^5-10^6 elements, where bf16's roundings (2^-8) mostly average out, and Adam(W)
# at 1e-4 moves a weight by at most 1e-3 in 10 steps. Measured on a CPU (batch 2, 5 steps): 4e-4
# relative for HiCMAE-B, 8e-5 for CAV-MAE. 2% leaves room for the GPU kernels' own rounding and
# still catches a run that drifts, diverges or turns NaN (the kernels' exactness is the
# attention check's job).
TRAIN_RTOL = 0.02
CPU_TRAIN_PRESET, CPU_TRAIN_BATCH, CPU_TRAIN_STEPS, CPU_TRAIN_LR = "tiny-cpu", 2, 4, 1e-3
ZERO_STAGES, ZERO_GLOBAL_BATCH, ZERO_STEPS, ZERO_LR = (2, 3), 4, 3, 1e-3
# fp32 (TF32 off) on both sides: what differs is the order of the gradient reductions (and
# kernels picked for batch 2 vs 4), ~1e-6 per step, which Adam can amplify for weights with ~0
# gradient; 1e-3 keeps 100x headroom while a lost or doubled shard moves the loss by a whole update
ZERO_RTOL, ZERO_ATOL = 1e-3, 1e-5
SPAWN_TIMEOUT_S, BENCH_TIMEOUT_S = 300, 300
# nvJPEG vs libjpeg-turbo on q90 frames, in grey levels: IDCT and chroma upsampling may differ by a
# level or two (and the device resize rounds its float result: 1 more); a swapped channel, frame
# or crop differs by tens
JPEG_MEAN_TOL, JPEG_MAX_TOL = 2.0, 32


class NotRun(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Result:
    summary: str
    metrics: dict[str, Any]
    failures: list[str] = field(default_factory=list)


@dataclass
class Check:
    name: str
    backend: str | None
    device: str  # "cpu" | "cuda"
    run: Callable[[], Result]
    without_cuda: str = ""  # added to the reason when a "cuda" check cannot run here


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def no_cuda_reason() -> str | None:
    if torch.version.cuda is None:
        return "no CUDA device: torch is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


def _package_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"{name} not installed"


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_rule(names: tuple[str, ...], got, ref, plain, floors: tuple[float, float]) -> tuple[dict, list[str]]:
    """The first tensor (the output) within 2x the plain path's error against `ref`, the others
    (gradients) within 3x, each plus floor * (1 + max |ref|). Returns (per tensor: error, plain
    error, their ratio, and `used`: error / allowed, <= 1 passes; failures)."""
    row, failures = {}, []
    for i, (name, g, r, p) in enumerate(zip(names, got, ref, plain)):
        bound, floor = (FWD_BOUND, floors[0]) if i == 0 else (BWD_BOUND, floors[1])
        if g.shape != r.shape:
            failures.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
            continue
        err, err_plain = _max_err(g, r), _max_err(p, r)
        allowed = bound * err_plain + floor * (1 + (r.abs().max().item() if r.numel() else 0.0))
        row[name] = {
            "err": err,
            "plain_err": err_plain,
            "ratio": err / err_plain if err_plain else None,
            "used": err / allowed,
        }
        if not err <= allowed:  # a NaN fails too
            failures.append(f"{name}: error {err:.3g} > {bound:g} x plain {err_plain:.3g} + floor")
    return row, failures


def _rule_summary(rows: list[dict], names: tuple[str, ...]) -> tuple[dict, str]:
    """The worst `used` of the outputs and of the gradients: metrics and a phrase."""
    worst = {}
    for key, part in (("fwd", names[:1]), ("bwd", names[1:])):
        worst[key] = max((r[n]["used"] for r in rows for n in part if n in r), default=None)
    parts = (("fwd", "2x plain"), ("bwd", "gradients, 3x"))
    text = "the worst error uses " + " and ".join(
        f"{100 * worst[key]:.0f}% of its bound ({what})" for key, what in parts if worst[key] is not None
    )
    return {"worst_used_fwd": worst["fwd"], "worst_used_bwd": worst["bwd"]}, text


def _fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> list[torch.Tensor]:
    """[fn(*inputs), d inputs] for the upstream gradient dout, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


@contextlib.contextmanager
def _no_tf32():
    """fp32 means fp32: no TF32 matmuls or convolutions while a reference runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn: Callable, nprocs: int, args: tuple, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """fn(rank, *args) in `nprocs` fresh processes; raises when a rank fails or time runs out."""
    import torch.multiprocessing as mp

    procs = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} ranks still running after {timeout_s} s (a hung collective?)")


def _preset_config(name: str):
    """The full Config of a model name of hicmae_dist.models.info.MODELS."""
    from hicmae_dist.config import load_config
    from hicmae_dist.models.info import MODELS as PRESETS

    return load_config(PRESETS[name])


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _attention_cases(device: torch.device, dtype: torch.dtype):
    """(name, q, k, v, attention kwargs) for each of the models' attention calls (the kernel
    benchmark's model cases and inputs), and each dense call again with a key padding mask."""
    from hicmae_dist.bench.kernels import attention as bench
    from hicmae_dist.bench.kernels import harness

    s = harness.Settings(
        device=device,
        dtype=dtype,
        quick=True,
        warmup=0,
        repeats=1,
        min_time=0.0,
        mem_limit=0,
        threads=torch.get_num_threads(),
        args=argparse.Namespace(models=list(MODELS), model_batch=SHAPE_BATCH),
    )
    for case in bench.model_cases(s):
        q, k, v, kw = bench._inputs(case, s, grad=False)
        yield case.name, q, k, v, kw
        if case.layout == "dense":
            g = torch.Generator(device=device).manual_seed(len(case.name))
            kpm = torch.rand(k.shape[0], k.shape[2], generator=g, device=device) > 0.3
            kpm[:, 0] = True  # every query keeps a valid key
            yield f"{case.name} key padding", q, k, v, {"key_padding_mask": kpm}


def check_attention(backend: str, device: torch.device) -> Result:
    from hicmae_dist.ops.attention import attention, attention_plain, attention_reference, resolve_backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ("out", "dq", "dk", "dv")
    rows, failures = [], []
    for case, q, k, v, kw in _attention_cases(device, dtype):
        try:
            resolve_backend(backend, device, q)
        except RuntimeError as err:
            raise NotRun(str(err)) from None
        masks = {key: kw[key] for key in ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k") if key in kw}
        dout = torch.randn(q.shape, generator=torch.Generator(device=device).manual_seed(1), device=device, dtype=dtype)
        got = _fwd_bwd(lambda q, k, v: attention(q, k, v, backend=backend, **kw), (q, k, v), dout)
        ref = _fwd_bwd(
            lambda q, k, v: attention_reference(q, k, v, **masks), (q.double(), k.double(), v.double()), dout.double()
        )
        plain = _fwd_bwd(lambda q, k, v: attention_plain(q, k, v, **masks), (q, k, v), dout)
        row, bad = error_rule(names, got, ref, plain, ATTENTION_FLOORS)
        rows.append({"case": case, **row})
        failures += [f"{case}: {b}" for b in bad]
    worst, text = _rule_summary(rows, names)
    return Result(
        f"{len(rows)} calls (dense, key padding, varlen), {str(dtype)[6:]}, vs fp64: {text}",
        {"dtype": str(dtype)[6:], "batch": SHAPE_BATCH, **worst, "cases": rows},
        failures,
    )


# ----------------------------------------------------------------------------------------------
# info_nce
# ----------------------------------------------------------------------------------------------
def _contrastive_problems() -> list[dict]:
    """The models' contrastive losses at each preset's per-GPU batch (+ 256 rows: several
    kernel tiles): rows, dim, temperature, symmetric."""
    from hicmae_dist.models import get_spec

    out = []
    for name in MODELS:
        cfg = _preset_config(name)
        m = cfg.model
        symmetric = get_spec(m.arch).symmetric_contrastive(m)  # as the models call it
        out.append(
            dict(model=name, rows=cfg.data.batch_size, dim=m.width, temperature=m.temperature, symmetric=symmetric)
        )
    out.append({**out[0], "model": f"{out[0]['model']} x256 rows", "rows": 256})
    return out


def _paired_features(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 L2-normalised (a, b), b a noisy copy of a (the positives stand out, as after training)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    b = a + torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return F.normalize(a, dim=-1).float(), F.normalize(b, dim=-1).float()


def _info_nce_baselines(a: torch.Tensor, b: torch.Tensor, temperature: float, symmetric: bool):
    """(fp64 reference, same-precision plain path): [loss, da, db] of the full-logits loss."""
    from hicmae_dist.ops.info_nce import info_nce_reference

    one = torch.ones((), device=a.device)
    loss = partial(info_nce_reference, temperature=temperature, symmetric=symmetric)
    return _fwd_bwd(loss, (a.double(), b.double()), one.double()), _fwd_bwd(loss, (a, b), one)


def check_info_nce_local(backend: str, device: torch.device) -> Result:
    from hicmae_dist.ops.info_nce import info_nce, resolve_backend

    rows, failures = [], []
    for p in _contrastive_problems():
        a, b = (t.to(device) for t in _paired_features(p["rows"], p["dim"], seed=p["rows"]))
        try:
            resolve_backend(backend, a)
        except RuntimeError as err:
            raise NotRun(str(err)) from None
        t, sym, one = p["temperature"], p["symmetric"], torch.ones((), device=device)
        got = _fwd_bwd(lambda a, b: info_nce(a, b, t, symmetric=sym, backend=backend), (a, b), one)
        ref, plain = _info_nce_baselines(a, b, t, sym)
        row, bad = error_rule(INFO_NCE_NAMES, got, ref, plain, INFO_NCE_FLOORS)
        case = f"{p['model']} B{p['rows']} D{p['dim']} {'symmetric' if sym else 'one direction'}"
        rows.append({"case": case, **row})
        failures += [f"{case}: {x}" for x in bad]
    worst, text = _rule_summary(rows, INFO_NCE_NAMES)
    return Result(
        f"{len(rows)} losses, fp32 features, vs fp64 (plain: fp32 full logits): {text}",
        {**worst, "cases": rows},
        failures,
    )


def _global_negatives(backend: str, p: dict, world: int, device: torch.device) -> list[torch.Tensor]:
    """What `world` ranks of p["rows"] rows each compute with global negatives, in one process:
    info_nce's process group simulated (its `world` and all-gather patched, the gathered features
    being the global leaves A, B). One backward of the ranks' summed losses then gives each
    rank's rows the sum over ranks that the all-gather's backward all-reduces. Returns [the mean
    loss over ranks, dA / W, dB / W]: what DDP / DeepSpeed make of it, and what the single-process
    loss over the whole batch gives (ops/info_nce.py)."""
    from hicmae_dist.ops.info_nce import info_nce

    ops = sys.modules["hicmae_dist.ops.info_nce"]  # (hicmae_dist.ops.info_nce is the function)
    rows = p["rows"]
    A, B = (x.to(device).requires_grad_() for x in _paired_features(world * rows, p["dim"], seed=rows))
    total = torch.zeros((), device=device)
    for r in range(world):

        def gather(x, group=None):  # symmetric: [a | b] of every rank; one direction: b
            return (torch.cat([A, B], dim=1) if x.shape[1] == 2 * A.shape[1] else B), r * rows

        mine = slice(r * rows, (r + 1) * rows)
        with (
            mock.patch.object(ops, "world", lambda group=None: (r, world)),
            mock.patch.object(ops, "all_gather_with_grad", gather),
        ):
            total = total + info_nce(
                A[mine], B[mine], p["temperature"], symmetric=p["symmetric"], negatives="global", backend=backend
            )
    total.backward()
    return [total.detach() / world, A.grad / world, B.grad / world]


def check_info_nce_global(backend: str, device: torch.device, world: int = 4) -> Result:
    from hicmae_dist.ops.info_nce import resolve_backend

    rows, failures = [], []
    for p in _contrastive_problems():
        a, b = (x.to(device) for x in _paired_features(world * p["rows"], p["dim"], seed=p["rows"]))
        try:
            resolve_backend(backend, a)
        except RuntimeError as err:
            raise NotRun(str(err)) from None
        sym = p["symmetric"]
        got = _global_negatives(backend, p, world, device)
        ref, plain = _info_nce_baselines(a, b, p["temperature"], sym)
        row, bad = error_rule(INFO_NCE_NAMES, got, ref, plain, INFO_NCE_FLOORS)
        case = f"{p['model']} {world} ranks x B{p['rows']} D{p['dim']} {'symmetric' if sym else 'one direction'}"
        rows.append({"case": case, **row})
        failures += [f"{case}: {x}" for x in bad]
    worst, text = _rule_summary(rows, INFO_NCE_NAMES)
    return Result(
        f"{len(rows)} losses, {world} simulated ranks, vs one fp64 process over the whole batch (plain: "
        f"fp32 full logits): {text}",
        {"ranks": world, **worst, "cases": rows},
        failures,
    )


# ----------------------------------------------------------------------------------------------
# csrc: hicmae_dist._C
# ----------------------------------------------------------------------------------------------
def _token_op_cases(dtype: torch.dtype):
    """(name, op, reference, inputs, grad flags) for each of the models' token-op calls at batch
    SHAPE_BATCH, CPU tensors of `dtype` (indices: a random split of the tokens per sample)."""
    from hicmae_dist.bench.kernels.shapes import model_calls
    from hicmae_dist.ops.gather import gather_visible_reference
    from hicmae_dist.ops.tokens import assemble_decoder_tokens_reference, patch_norm_reference

    g = torch.Generator().manual_seed(0)
    B = SHAPE_BATCH

    def split(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.rand(B, n, generator=g).argsort(dim=1)
        return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    for c in model_calls(MODELS):
        ops = torch.ops.hicmae_dist
        if c["op"] == "gather_visible":
            name = f"{c['model']} gather_visible N{c['tokens']} Nv{c['kept']} C{c['width']}"
            yield (
                name,
                ops.gather_visible,
                gather_visible_reference,
                (rand(B, c["tokens"], c["width"]), split(c["tokens"], c["kept"])[0]),
                (c["grad"], False),
            )
        elif c["op"] == "assemble_decoder_tokens":
            n = c["positions"]
            name = f"{c['model']} assemble_decoder_tokens Nv{c['visible']} N{n} C{c['width']}"
            yield (
                name,
                ops.assemble_decoder_tokens,
                assemble_decoder_tokens_reference,
                (rand(B, c["visible"], c["width"]), rand(c["width"]), rand(n, c["width"]), *split(n, c["visible"])),
                (*c["grad"], False, False),
            )
        elif c["op"] == "patch_norm":
            name = f"{c['model']} patch_norm R{c['rows'] * B} F{c['frames']} S{c['pixels']} C{c['channels']}"
            yield (
                name,
                partial(ops.patch_norm, frame_diff=c["frame_diff"]),
                partial(patch_norm_reference, frame_diff=c["frame_diff"]),
                (rand(c["rows"] * B, c["frames"], c["pixels"], c["channels"]),),
                (False,),
            )


def _run_op(fn: Callable, inputs: tuple, grads: tuple[bool, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """[fn(*inputs), the gradients of the inputs flagged in `grads`] for a seeded upstream
    gradient rounded to `dtype` (the same values whatever the inputs' dtype and device)."""
    inputs = tuple(
        t.detach().clone().requires_grad_(need) if t.is_floating_point() else t for t, need in zip(inputs, grads)
    )
    out = fn(*inputs)
    leaves = [t for t, need in zip(inputs, grads) if need]
    if not leaves:
        return [out.detach()]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(out.device, out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _native_error() -> str | None:
    from hicmae_dist.bench.kernels.tokens import _native_error as why

    return why()


def check_csrc_cpu() -> Result:
    if (why := _native_error()) is not None:
        raise NotRun(why)
    rows, failures = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for name, op, reference, inputs, grads in _token_op_cases(dtype):
            got, want = _run_op(op, inputs, grads, dtype), _run_op(reference, inputs, grads, dtype)
            equal = all(torch.equal(a, b) for a, b in zip(got, want))
            rows.append({"case": f"{name} {str(dtype)[6:]}", "tensors": len(got), "bit_identical": equal})
            if not equal:
                failures.append(
                    f"{name} {str(dtype)[6:]}: differs from the PyTorch maths "
                    f"(max error {max(_max_err(a, b) for a, b in zip(got, want)):.3g})"
                )
    return Result(
        f"{len(rows)} calls (fp32, bf16), values and gradients: "
        f"{sum(r['bit_identical'] for r in rows)} bit-identical to the PyTorch maths",
        {"cases": rows},
        failures,
    )


def check_csrc_cuda(device: torch.device) -> Result:
    from hicmae_dist.ops.gather import native_built_with_cuda

    if (why := _native_error()) is not None:
        raise NotRun(why)
    if not native_built_with_cuda():
        raise NotRun(
            "hicmae_dist._C was built without its CUDA kernels: build it on this machine "
            "(`pip install --no-build-isolation --no-deps -e .`, nvcc and a CUDA torch)"
        )
    names = ("out", "grad0", "grad1", "grad2")
    rows, failures = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for name, op, reference, inputs, grads in _token_op_cases(dtype):
            cpu = _run_op(op, inputs, grads, dtype)
            cuda = [t.cpu() for t in _run_op(op, tuple(t.to(device) for t in inputs), grads, dtype)]
            exact = _run_op(reference, tuple(t.double() if t.is_floating_point() else t for t in inputs), grads, dtype)
            row, bad = error_rule(names[: len(cpu)], cuda, exact, cpu, ATTENTION_FLOORS)
            case = f"{name} {str(dtype)[6:]}"
            rows.append({"case": case, **row})
            failures += [f"{case}: {b}" for b in bad]
    worst, text = _rule_summary(rows, names)
    return Result(
        f"{len(rows)} calls (fp32, bf16), vs fp64 (plain: the CPU kernels): {text}", {**worst, "cases": rows}, failures
    )


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------
def train_run(
    cfg,
    device: torch.device,
    backend: str,
    *,
    batch: int,
    steps: int,
    lr: float,
    bf16: bool,
    same_batch: bool = False,
    warmup: int = 1,
) -> dict:
    """`steps` optimizer steps (torch AdamW / Adam per the preset, no DeepSpeed) of the
    pretraining model from the seed's weights on seeded random clips (the same ones whatever the
    backend; one clip batch repeated with `same_batch`): per-step losses, the median step time
    after `warmup` steps, clips/s, MFU and peak memory."""
    from hicmae_dist.bench.timing import PeakMemory, sync
    from hicmae_dist.models import build_model
    from hicmae_dist.models.info import example_inputs
    from hicmae_dist.train.accounting import model_flops_per_sample, peak_flops
    from hicmae_dist.train.engine import build_optimizer, set_lr

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, dataclasses.replace(cfg.execution, attention_backend=backend)).to(device).train()
    optimizer = build_optimizer(model, cfg)
    set_lr(optimizer, lr)
    losses, times = [], []
    with PeakMemory(device) as memory:
        for step in range(steps):
            g = torch.Generator().manual_seed(0 if same_batch else step)
            video, audio = example_inputs(cfg.model, batch, device, g)
            video_mask, audio_mask = (m.to(device) for m in model.make_masks(batch, g))
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(video, audio, video_mask, audio_mask)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out["loss"].item())  # syncs
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:] or times)
    clips_per_s = batch / step_s
    peak, peak_source = peak_flops(device, bf16)
    flops = model_flops_per_sample(cfg)
    del model, optimizer
    return {
        "backend": backend,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "batch": batch,
        "steps": steps,
        "lr": lr,
        "losses": losses,
        "step_ms": 1e3 * step_s,
        "step_ms_all": [round(1e3 * t, 2) for t in times],
        "clips_per_s": clips_per_s,
        "tflops_per_s": clips_per_s * flops / 1e12,
        "mfu": clips_per_s * flops / peak if peak else None,
        "mfu_peak": peak_source,
        "peak_memory_bytes": memory.peak,
        "memory_method": memory.method,
    }


def _train_summary(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
    return (
        f"{r['precision']}, batch {r['batch']}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
        f"{r['step_ms']:.1f} ms/step, {r['clips_per_s']:.1f} clips/s{mfu}, "
        f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


def check_train_cpu() -> Result:
    from hicmae_dist.config import load_config

    cfg = load_config(CPU_TRAIN_PRESET)
    r = train_run(
        cfg,
        torch.device("cpu"),
        "sdpa",
        batch=CPU_TRAIN_BATCH,
        steps=CPU_TRAIN_STEPS,
        lr=CPU_TRAIN_LR,
        bf16=False,
        same_batch=True,
    )
    failures = []
    if not all(math.isfinite(x) for x in r["losses"]):
        failures.append(f"non-finite loss: {r['losses']}")
    elif not r["losses"][-1] < r["losses"][0]:
        failures.append(f"the loss on one repeated batch did not fall in {CPU_TRAIN_STEPS} steps: {r['losses']}")
    return Result(f"{CPU_TRAIN_PRESET}, {CPU_TRAIN_STEPS} steps on one batch, " + _train_summary(r), r, failures)


def check_train_fp32(model: str, device: torch.device, cache: dict) -> Result:
    with _no_tf32():
        r = train_run(
            _preset_config(model),
            device,
            "sdpa",
            batch=TRAIN_BATCH,
            steps=TRAIN_STEPS,
            lr=TRAIN_LR,
            bf16=False,
            warmup=TRAIN_WARMUP,
        )
    r["precision"] = "fp32 (TF32 off)"  # a reference: its MFU is against the TF32 peak
    failures = [] if all(math.isfinite(x) for x in r["losses"]) else [f"non-finite loss: {r['losses']}"]
    if not failures:
        cache[model] = r["losses"]
    return Result(_train_summary(r), r, failures)


def check_train_bf16(model: str, backend: str, device: torch.device, cache: dict) -> Result:
    from hicmae_dist.ops.attention import resolve_backend

    try:
        resolve_backend(backend, device, torch.empty(1, 1, 1, 64, device=device, dtype=torch.bfloat16))
    except RuntimeError as err:
        raise NotRun(str(err)) from None
    if model not in cache:
        raise NotRun(f"no fp32 reference losses (check train.fp32.{model} did not pass)")
    r = train_run(
        _preset_config(model),
        device,
        backend,
        batch=TRAIN_BATCH,
        steps=TRAIN_STEPS,
        lr=TRAIN_LR,
        bf16=True,
        warmup=TRAIN_WARMUP,
    )
    r["fp32_losses"] = reference = cache[model]
    r["max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], reference))
    failures = []
    if not r["max_rel_diff"] <= TRAIN_RTOL:
        failures.append(
            f"losses {[f'{x:.4f}' for x in r['losses']]} vs fp32 {[f'{x:.4f}' for x in reference]}: "
            f"relative difference {r['max_rel_diff']:.3g} > {TRAIN_RTOL:g}"
        )
    return Result(
        _train_summary(r) + f", max |bf16 - fp32| / fp32 loss {r['max_rel_diff']:.2g} (<= {TRAIN_RTOL:g})", r, failures
    )


# ----------------------------------------------------------------------------------------------
# GPU JPEG decode (data.decode_on cuda)
# ----------------------------------------------------------------------------------------------
def _jpeg_batch(clips: int = 2, frames: int = 4) -> dict:
    """A data.decode_on=cuda batch (data/loader.py's docstring) by hand: whole 224 frames of
    shapes on gradients with noise, JPEG q90, the 160 face crop, one box resized and one not."""
    from hicmae_dist.data import video

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    jpegs, offsets, sizes, at = [], [], [], 0
    for n in range(clips * frames):
        cy, cx = 60 + 5 * n, 90 + 3 * n
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < 900).float()
        rgb = torch.stack([xx, yy, 224 - xx]) + 120 * disc * torch.tensor([1.0, -0.5, 0.3]).view(3, 1, 1)
        rgb = (rgb + 6 * torch.randn(3, 224, 224, generator=g)).clamp(0, 255).to(torch.uint8)
        blob, (size,) = video.encode_jpegs(rgb[None], quality=90)
        jpegs.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        offsets.append(at), sizes.append(size)
        at += size
    return {
        "jpeg": torch.cat(jpegs),
        "jpeg_offsets": torch.tensor(offsets).view(clips, frames),
        "jpeg_sizes": torch.tensor(sizes).view(clips, frames),
        "face": torch.tensor([video.face_box(224, 160)] * clips),
        "crop": torch.tensor([[10, 20, 120, 105], [0, 0, 160, 160]] * clips)[:clips],
    }


def _grey_diff(name: str, got: torch.Tensor, ref: torch.Tensor) -> tuple[dict, list[str]]:
    d = (got.double().cpu() - ref.double().cpu()).abs()
    row = {"case": name, "max": round(d.max().item(), 3), "mean": round(d.mean().item(), 4)}
    bad = (
        [f"{name}: |GPU - CPU| mean {row['mean']} > {JPEG_MEAN_TOL} or max {row['max']} > {JPEG_MAX_TOL} grey levels"]
        if row["mean"] > JPEG_MEAN_TOL or row["max"] > JPEG_MAX_TOL
        else []
    )
    return row, bad


def check_jpeg_decode(device: torch.device) -> Result:
    """device.decode_jpegs and to_device on `device` against the CPU decoder, same bytes."""
    from hicmae_dist.data import video
    from hicmae_dist.data.device import decode_jpegs, to_device

    batch = _jpeg_batch()
    flat = batch["jpeg"]
    jpegs = [
        flat[o : o + n]
        for o, n in zip(batch["jpeg_offsets"].flatten().tolist(), batch["jpeg_sizes"].flatten().tolist())
    ]
    raw_row, failures = _grey_diff(
        "decode", torch.stack(decode_jpegs(jpegs, device)), torch.stack(decode_jpegs(jpegs, torch.device("cpu")))
    )
    std = torch.tensor(video.IMAGENET_STD).view(1, 3, 1, 1, 1) * 255  # normalised -> grey levels
    got, ref = (to_device(batch, d, keys=("video",))["video"].cpu() * std for d in (device, torch.device("cpu")))
    batch_row, bad = _grey_diff("to_device", got, ref)
    rows = [raw_row, batch_row]
    return Result(
        f"{len(jpegs)} JPEG frames (224px, q90), GPU vs CPU decoder, grey levels: "
        + "; ".join(f"{r['case']} mean {r['mean']}, max {r['max']}" for r in rows)
        + f" (<= {JPEG_MEAN_TOL}, {JPEG_MAX_TOL})",
        {"cases": rows},
        failures + bad,
    )


# ----------------------------------------------------------------------------------------------
# ZeRO over NCCL
# ----------------------------------------------------------------------------------------------
def _zero_worker(rank: int, world: int, port: int, preset: str, out_dir: str) -> None:
    """The trainer's own step (train.step.train_step: agreed skip, explicit accumulation
    boundary) over NCCL: ZERO_STEPS steps, then one whose loss is NaN on the last rank only
    (every rank must refuse it), then one more; plus a CPU and a GPU flag through comm.agree
    (a plain "nccl" group fails on the CPU one)."""
    from hicmae_dist import comm
    from hicmae_dist.config import load_config
    from hicmae_dist.models.info import example_inputs
    from hicmae_dist.train.engine import build_engine, build_model_for_engine, set_lr
    from hicmae_dist.train.step import train_step

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    env = comm.init_distributed()
    last = rank == world - 1
    results = {
        "process_group": str(torch.distributed.get_backend()),
        "agree_cpu_and_cuda": comm.agree([last], "cpu") + comm.agree([torch.tensor(last)], env.device),
    }
    per = ZERO_GLOBAL_BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    for stage in ZERO_STAGES:
        # fp32, and global negatives: the contrastive term is then the same whatever the world size
        cfg = load_config(
            preset,
            [f"train.zero_stage={stage}", f"data.batch_size={per}", "train.bf16=false", "model.negatives=global"],
        )
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(build_model_for_engine(cfg, world), cfg, world)
        set_lr(engine.optimizer, ZERO_LR)
        losses, refused = [], []
        for step in range(ZERO_STEPS + 2):
            g = torch.Generator().manual_seed(step)  # the same global batch on every rank
            video, audio = example_inputs(cfg.model, ZERO_GLOBAL_BATCH, "cpu", g)
            vmask, amask = engine.module.make_masks(ZERO_GLOBAL_BATCH, g)
            batch = (video[mine].to(engine.device), audio[mine].to(engine.device), vmask[mine], amask[mine])
            poison = step == ZERO_STEPS and last

            def forward(b):
                loss = engine(*b)["loss"]
                return {"loss": loss * float("nan") if poison else loss}

            result = train_step(engine, 1, lambda: batch, forward, stop_requested=False)
            refused.append(result.nonfinite)
            if not result.nonfinite:  # this rank's loss; the ranks' mean is the global batch's
                losses.append(float(result.parts[0]))
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        state = sum(
            t.numel() * t.element_size()
            for st in inner.state.values()
            for t in st.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        results[stage] = {"losses": losses, "refused": refused, "optimizer_state_bytes": state}
        engine = inner = None  # freed before the next stage builds its engine
        torch.cuda.empty_cache()
    torch.save(results, Path(out_dir) / f"world{world}-rank{rank}.pt")
    # no rank tears the group down while another still uses it (files: hicmae_dist.comm owns the collectives)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not all((Path(out_dir) / f"world{world}-rank{r}.pt").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other ranks never finished")
        time.sleep(0.1)
    torch.distributed.destroy_process_group()


def check_zero(preset: str = "hicmae-b-vox2") -> Result:
    if (n := torch.cuda.device_count()) < 2:
        raise NotRun(f"needs 2 or more GPUs, this machine has {n}")
    if (why := _package_missing("deepspeed")) is not None:
        raise NotRun(why)
    with tempfile.TemporaryDirectory(prefix="doctor-zero-") as tmp:
        for world in (1, 2):
            _spawn(_zero_worker, world, (world, _free_port(), preset, tmp))
        one = torch.load(Path(tmp) / "world1-rank0.pt")
        two = [torch.load(Path(tmp) / f"world2-rank{r}.pt") for r in range(2)]
    failures = []
    metrics = {
        "preset": preset,
        "global_batch": ZERO_GLOBAL_BATCH,
        "lr": ZERO_LR,
        "process_group": two[0]["process_group"],
    }
    for rank, r in enumerate(two):
        if r["agree_cpu_and_cuda"] != [True, True]:
            failures.append(f"rank {rank}: comm.agree over CPU and CUDA flags gave {r['agree_cpu_and_cuda']}")
    expected_refused = [False] * ZERO_STEPS + [True, False]
    for stage in ZERO_STAGES:
        single = one[stage]["losses"]
        for rank, r in enumerate(two):
            if r[stage]["refused"] != expected_refused:
                failures.append(
                    f"ZeRO-{stage} rank {rank}: refused steps {r[stage]['refused']}, expected "
                    f"{expected_refused} (a NaN on rank 1 only must skip the step on both)"
                )
        mean = [sum(r[stage]["losses"][i] for r in two) / 2 for i in range(len(single))]
        metrics[f"zero{stage}"] = {"one_rank": one[stage], "two_ranks": [r[stage] for r in two], "mean": mean}
        if any(abs(x - y) > ZERO_ATOL + ZERO_RTOL * abs(y) for x, y in zip(mean, single)):
            failures.append(f"ZeRO-{stage}: 2-rank losses {mean} vs 1 rank {single}")
        for rank, r in enumerate(two):
            # stages 2 and 3 partition the Adam moments: each of 2 ranks holds half (up to padding)
            share = r[stage]["optimizer_state_bytes"] / one[stage]["optimizer_state_bytes"]
            if abs(share - 0.5) > 0.01:
                failures.append(f"ZeRO-{stage} rank {rank}: holds {share:.3f} of the optimizer state, expected 0.5")
    return Result(
        f"{preset}, fp32, global batch {ZERO_GLOBAL_BATCH}, {ZERO_STEPS} steps: ZeRO-"
        f"{'/'.join(map(str, ZERO_STAGES))} over 2 ranks ({metrics['process_group']}) vs 1 rank "
        f"(rtol {ZERO_RTOL:g}), a NaN on one rank refused on both, optimizer state halved",
        metrics,
        failures,
    )


# ----------------------------------------------------------------------------------------------
# bench kernels --quick
# ----------------------------------------------------------------------------------------------
def check_bench_kernels(out: Path) -> Result:
    import hicmae_dist

    root = Path(hicmae_dist.__file__).resolve().parents[1]  # importable uninstalled too (a bare checkout)
    bench_out = out / "kernel-bench"
    cmd = [sys.executable, "-m", "hicmae_dist.bench.kernels", "--quick", "--out", str(bench_out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    (out / "kernel-bench.log").write_text(proc.stdout + proc.stderr)
    results = bench_out / "results.json"
    counts: dict[str, int] = {}
    if results.exists():
        for section in json.loads(results.read_text())["ops"].values():
            for r in section["records"] + section.get("kernels", []):
                counts[r["status"]] = counts.get(r["status"], 0) + 1
    metrics = {
        "command": " ".join(cmd),
        "exit_status": proc.returncode,
        "records": counts,
        "results": str(results),
        "log": str(out / "kernel-bench.log"),
    }
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    failures = (
        [f"{counts.get('error', 0)} benchmark records with status error (see {results})"] if proc.returncode else []
    )
    return Result(
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" records; {bench_out}", metrics, failures
    )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def plan(out: Path) -> list[Check]:
    """Every check, in report order; "cuda" checks get the first GPU (None without one)."""
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0) if no_cuda_reason() is None else None
    cache: dict[str, list[float]] = {}  # fp32 reference losses per model, for the bf16 runs
    checks = [Check("attention", "sdpa", "cpu", partial(check_attention, "sdpa", cpu))]
    checks += [Check("attention", b, "cuda", partial(check_attention, b, gpu)) for b in ATTENTION_BACKENDS]
    checks += [
        Check("info_nce.local", "torch", "cpu", partial(check_info_nce_local, "torch", cpu)),
        Check("info_nce.local", "triton", "cuda", partial(check_info_nce_local, "triton", gpu)),
        Check("info_nce.local", "torch", "cuda", partial(check_info_nce_local, "torch", gpu)),
        Check("info_nce.global", "torch", "cpu", partial(check_info_nce_global, "torch", cpu)),
        Check("info_nce.global", "triton", "cuda", partial(check_info_nce_global, "triton", gpu)),
        Check("csrc", "native", "cpu", check_csrc_cpu),
        Check("csrc", "native", "cuda", partial(check_csrc_cuda, gpu)),
        Check("jpeg_decode", "nvjpeg", "cuda", partial(check_jpeg_decode, gpu)),
        Check(f"train.fp32.{CPU_TRAIN_PRESET}", "sdpa", "cpu", check_train_cpu),
    ]
    for model in MODELS:
        checks.append(Check(f"train.fp32.{model}", "sdpa", "cuda", partial(check_train_fp32, model, gpu, cache)))
        checks += [
            Check(f"train.bf16.{model}", b, "cuda", partial(check_train_bf16, model, b, gpu, cache))
            for b in ATTENTION_BACKENDS
        ]
    checks += [
        Check("zero", "nccl", "cuda", check_zero),
        Check(
            "bench-kernels",
            None,
            "cuda",
            partial(check_bench_kernels, out),
            "; on a CPU `hicmae-dist bench kernels --quick` takes ~40 s on 2 cores: run it on its own",
        ),
    ]
    return checks


def _skipped_by(check: Check, skip: list[str]) -> str | None:
    """The --skip entry naming `check`: its name, a dotted prefix of it, or NAME:BACKEND."""
    for s in skip:
        if check.name == s or check.name.startswith(s + ".") or f"{check.name}:{check.backend}" == s:
            return s
    return None


def run_check(check: Check, skip: list[str], no_cuda: str | None) -> dict:
    rec = {
        "name": check.name,
        "backend": check.backend,
        "device": check.device,
        "status": "not run",
        "reason": None,
        "summary": None,
        "seconds": 0.0,
        "metrics": {},
    }
    start = time.monotonic()
    if (s := _skipped_by(check, skip)) is not None:
        rec["reason"] = f"skipped (--skip {s})"
    elif check.device == "cuda" and no_cuda is not None:
        rec["reason"] = no_cuda + check.without_cuda
    else:
        try:
            result = check.run()
            rec.update(status="fail" if result.failures else "pass", summary=result.summary, metrics=result.metrics)
            if result.failures:
                more = len(result.failures) - 3
                rec["reason"] = "; ".join(result.failures[:3]) + (f" (+{more} more)" if more > 0 else "")
                rec["metrics"]["failures"] = result.failures
        except NotRun as err:
            rec["reason"] = str(err)
        except Exception as err:  # noqa: BLE001  (recorded; the run goes on)
            rec.update(
                status="error",
                reason=f"{type(err).__name__}: {str(err)[:1000]}",
                metrics={"traceback": traceback.format_exc()[-4000:]},
            )
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    rec["seconds"] = round(time.monotonic() - start, 2)
    what = check.name + (f" [{check.backend}]" if check.backend else "") + f" ({check.device})"
    reason = f": {rec['reason']}" if rec["reason"] else ""
    print(f"doctor: {what}: {rec['status']} in {rec['seconds']:.1f} s{reason}", file=sys.stderr, flush=True)
    return rec


def environment() -> dict:
    """versions, gpus and the machine (hicmae_dist.bench.report.machine: CPU, platform, the first GPU's
    driver and clocks, the source commit)."""
    from hicmae_dist.bench.report import machine, package_version

    gpus = []
    if no_cuda_reason() is None:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_bytes": p.total_memory,
                    "capability": f"{p.major}.{p.minor}",
                    "sm_count": p.multi_processor_count,
                }
            )
    m = machine(torch.device("cuda", 0) if gpus else torch.device("cpu"))
    nccl = None
    if gpus and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    versions = {
        "python": m["versions"]["python"],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "driver": (m["gpu"] or {}).get("driver"),
        "nccl": nccl,
        "cudnn": torch.backends.cudnn.version() if gpus else None,
        "triton": m["versions"]["triton"],
        "deepspeed": package_version("deepspeed"),
        "xformers": m["versions"]["xformers"],
        "hicmae_dist": m["versions"]["hicmae_dist"],
        "commit": m["versions"]["commit"],
    }
    return {"versions": versions, "gpus": gpus, "machine": m}


def render_markdown(report: dict) -> str:
    from hicmae_dist.bench.report import fmt_bytes, md_table

    v = report["versions"]
    s = report["summary"]
    lines = [
        f"# hicmae-dist doctor: {report['hostname']}, {report['created']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Exit status {report['exit_status']}: {s['pass']} pass, {s['fail']} fail, {s['error']} error, "
        f"{s['not run']} not run, in {report['seconds']:.0f} s.",
        "",
        "## Versions",
        "",
        md_table(list(v), [[x if x is not None else "-" for x in v.values()]]),
        "",
        "## GPUs",
        "",
    ]
    if report["gpus"]:
        lines.append(
            md_table(
                ["#", "name", "memory", "capability", "SMs"],
                [
                    [g["index"], g["name"], fmt_bytes(g["memory_bytes"]), g["capability"], g["sm_count"]]
                    for g in report["gpus"]
                ],
            )
        )
    else:
        lines.append(f"None ({no_cuda_reason()}).")
    lines += [
        "",
        "## Checks",
        "",
        md_table(
            ["check", "backend", "device", "status", "s", "result"],
            [
                [
                    c["name"],
                    c["backend"] or "-",
                    c["device"],
                    f"**{c['status']}**" if c["status"] in ("fail", "error") else c["status"],
                    f"{c['seconds']:.1f}",
                    (c["summary"] or "") + (f" — {c['reason']}" if c["summary"] and c["reason"] else c["reason"] or ""),
                ]
                for c in report["checks"]
            ],
        ),
    ]
    broken = [c for c in report["checks"] if c["status"] in ("fail", "error")]
    for c in broken:
        lines += ["", f"### {c['name']} [{c['backend']}] ({c['device']}): {c['status']}", ""]
        lines += [f"- {f}" for f in c["metrics"].get("failures", [c["reason"]])]
        if "traceback" in c["metrics"]:
            lines += ["", "```", c["metrics"]["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def run_doctor(out: Path = DEFAULT_OUT, skip: list[str] | tuple[str, ...] = (), command: str | None = None) -> int:
    """Run every check, write OUT/doctor.json and OUT/doctor.md; 0 iff no check failed or raised."""
    start = time.monotonic()
    out = Path(out)
    checks = plan(out)
    for s in skip:
        if not any(_skipped_by(c, [s]) for c in checks):
            names = sorted({c.name for c in checks})
            raise ValueError(f"--skip {s}: no check of that name (checks: {', '.join(names)})")
    out.mkdir(parents=True, exist_ok=True)
    no_cuda = no_cuda_reason()
    report = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(["hicmae-dist", *map(shlex.quote, sys.argv[1:])]),
        "hostname": socket.gethostname(),
        **environment(),
    }
    v = report["versions"]
    gpus = ", ".join(g["name"] for g in report["gpus"]) or no_cuda
    print(
        f"doctor: torch {v['torch']} (CUDA {v['cuda_runtime']}), triton {v['triton']}, deepspeed {v['deepspeed']}, "
        f"xformers {v['xformers']}; GPUs: {gpus}",
        file=sys.stderr,
        flush=True,
    )
    report["checks"] = [run_check(c, list(skip), no_cuda) for c in checks]
    report["summary"] = {s: sum(c["status"] == s for c in report["checks"]) for s in STATUSES}
    report["seconds"] = round(time.monotonic() - start, 1)
    report["exit_status"] = 1 if report["summary"]["fail"] or report["summary"]["error"] else 0
    (out / "doctor.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "doctor.md").write_text(render_markdown(report))
    s = report["summary"]
    print(
        f"doctor: {s['pass']} pass, {s['fail']} fail, {s['error']} error, {s['not run']} not run in "
        f"{report['seconds']:.0f} s; report: {out / 'doctor.md'}, {out / 'doctor.json'}",
        file=sys.stderr,
    )
    return report["exit_status"]
