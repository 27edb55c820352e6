"""Attention: every backend of hicmae_dist.ops.attention over the models' calls and the
standard anchor grid, forward, backward and both, dense and packed varlen.

Backends (each through the public `attention(...)`; no fall-back: a backend that cannot run is
recorded "unavailable" with the reason):
  triton          ours (hicmae_dist/ops/triton/attention.py); CUDA only here (the Triton
                  interpreter runs it on the CPU in the tests, which says nothing about speed)
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                  backend "sdpa" with torch.nn.attention.sdpa_kernel pinned to one kernel
  xformers        memory_efficient_attention (CUDA, when installed)
  reference       softmax(q k^T / sqrt(D)) v, fp32 scores
Cases:
  model:  every distinct call of the shipped models' pretraining forward (shapes.py):
          encoder, fusion (dense, or packed varlen with execution.pack_fusion) and decoder
          attention, at each preset's per-GPU batch; N from 26 to 800, head dim 64 (32 in the
          CAV-MAE decoder).
  anchor: flash-attention's grid: a fixed budget of 16k tokens (batch = 16384 / N), model width
          2048 (heads = 2048 / d), N 512 ... 16k, d 64 and 128; "dense" (every sequence N long)
          and "varlen" (ragged lengths, uniform in [N/2, N], packed).
FLOPs (flash-attention's convention, stated once here): forward 4 * H * sum_b Nq_b * Nk_b * D
(q k^T and p v, 2 FLOPs per multiply-add; non-causal, nothing halved), backward 2.5 x forward
(5 matmuls to the forward's 2), forward + backward 3.5 x forward. Padding the varlen
backends add is not counted: it shows as lower TFLOP/s.

    python -m kernels.attention --quick
    python -m kernels.attention --anchor-n 512 1024 --head-dims 64 --backends sdpa-flash reference
"""

from __future__ import annotations

import random
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from hicmae_dist.bench import report
from hicmae_dist.bench.kernels import harness
from hicmae_dist.bench.kernels.shapes import batch_of, chosen_models, model_calls
from hicmae_dist.ops.attention import attention, resolve_backend

NAME = "attention"
BACKENDS = ("triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "xformers", "reference")
LAYOUTS = ("dense", "varlen")
ANCHOR_TOKENS, ANCHOR_WIDTH = 16384, 2048
ANCHOR_N = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_ANCHOR = dict(tokens=1024, width=256, n=(256, 512))
BWD_FACTOR = 2.5


@dataclass(frozen=True)
class Case:
    """seqlens_q / seqlens_k: one length per sequence (dense: all equal)."""

    name: str
    group: str  # "model" | "anchor"
    layout: str  # "dense" | "varlen"
    heads: int
    head_dim: int
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    calls_per_step: int | None = None
    n: int | None = None  # anchors: the nominal N (varlen lengths are at most N)

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------
def fwd_flops(heads: int, head_dim: int, seqlens_q, seqlens_k) -> int:
    """4 * H * sum_b Nq_b * Nk_b * D: q k^T and p v, non-causal."""
    return 4 * heads * head_dim * sum(nq * nk for nq, nk in zip(seqlens_q, seqlens_k))


def flops(case: Case, direction: str) -> float:
    f = fwd_flops(case.heads, case.head_dim, case.seqlens_q, case.seqlens_k)
    return {"fwd": f, "bwd": BWD_FACTOR * f, "fwd+bwd": (1 + BWD_FACTOR) * f}[direction]


def io_bytes(case: Case, direction: str, elem: int) -> float:
    """Compulsory traffic: forward reads q, k, v and writes o (+ fp32 lse); backward reads
    q, k, v, o, dO, lse and writes dq, dk, dv."""
    tq, tk = sum(case.seqlens_q) * case.heads, sum(case.seqlens_k) * case.heads
    d = case.head_dim
    fwd = elem * d * (2 * tq + 2 * tk) + 4 * tq
    bwd = elem * d * (4 * tq + 4 * tk) + 4 * tq
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def estimate_bytes(case: Case, backend: str, direction: str, elem: int) -> int:
    """Pre-flight memory estimate. The materialising backends hold (B, H, Nq, Nk) fp32 scores,
    padded to the longest sequence for varlen: scores and probabilities in the forward, their
    gradients too with the backward; the flash-style ones O(N * D) beyond the tensors."""
    io = io_bytes(case, "fwd+bwd", elem)
    if backend in ("reference", "sdpa-math"):
        scores = 4 * case.batch * case.heads * max(case.seqlens_q) * max(case.seqlens_k)
        return int(2 * io + (2 if direction == "fwd" else 4) * scores)
    return int(2 * io)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def model_cases(s: harness.Settings) -> list[Case]:
    """The chosen models' attention calls at their batch (shapes.py); a shape two models
    share (the HiCMAE sizes differ in heads only) is listed once per model."""
    cases = []
    for call in model_calls(chosen_models(s)):
        if call["op"] != "attention":
            continue
        b = batch_of(call["model"], s)
        sq, sk = call["seqlens_q"], call["seqlens_k"]
        shape = "x".join(f"{q}/{k}" if q != k else str(q) for q, k in zip(sq, sk))
        name = f"{call['model']} {call['layout']} {shape} h{call['heads']}"
        # the packed launch holds, per sample, each of its segments (see blocks._cu_seqlens)
        cases.append(
            Case(
                name,
                "model",
                call["layout"],
                call["heads"],
                call["head_dim"],
                tuple(q for q in sq for _ in range(b)),
                tuple(k for k in sk for _ in range(b)),
                call["count"],
            )
        )
    return cases


def anchor_cases(ns, head_dims, layouts, tokens: int, width: int) -> list[Case]:
    cases = []
    rng = random.Random(0)
    for d in head_dims:
        for n in ns:
            b = max(tokens // n, 1)
            for layout in layouts:
                lens = (n,) * b if layout == "dense" else tuple(rng.randint(n // 2, n) for _ in range(b))
                cases.append(Case(f"anchor {layout} N{n} d{d}", "anchor", layout, width // d, d, lens, lens, n=n))
    return cases


# ----------------------------------------------------------------------------------------------
# Running one point
# ----------------------------------------------------------------------------------------------
def _sdpa_kernel(backend: str):
    if not backend.startswith("sdpa-"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend[5:]]
    return sdpa_kernel([kind])


def _inputs(case: Case, s: harness.Settings, grad: bool):
    """q, k, v (dense (B, H, N, D), varlen (total, H, D)) and the varlen keywords."""
    g = torch.Generator(device=s.device).manual_seed(0)
    H, D = case.heads, case.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=s.device, dtype=s.dtype).requires_grad_(grad)

    if case.layout == "dense":
        B, nq, nk = case.batch, case.seqlens_q[0], case.seqlens_k[0]
        return rand(B, H, nq, D), rand(B, H, nk, D), rand(B, H, nk, D), {}
    cu = [
        torch.tensor([0, *lens], device=s.device).cumsum(0).to(torch.int32) for lens in (case.seqlens_q, case.seqlens_k)
    ]
    kw = dict(
        cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=max(case.seqlens_q), max_seqlen_k=max(case.seqlens_k)
    )
    return rand(sum(case.seqlens_q), H, D), rand(sum(case.seqlens_k), H, D), rand(sum(case.seqlens_k), H, D), kw


def make_call(case: Case, backend: str, direction: str, s: harness.Settings):
    """The callable timing measures; raises harness.Unavailable when `backend` cannot run."""
    grad = direction != "fwd"
    q, k, v, kw = _inputs(case, s, grad)
    name = "sdpa" if backend.startswith("sdpa-") else backend
    try:
        resolve_backend(name, s.device, q)
    except RuntimeError as err:
        raise harness.Unavailable(str(err)) from None

    def forward():
        with _sdpa_kernel(backend):
            return attention(q, k, v, backend=name, **kw)

    with warnings.catch_warnings(record=True) as caught:  # SDPA says why a kernel cannot run
        warnings.simplefilter("always")
        try:
            out = forward()
        except RuntimeError as err:
            if "No available kernel" in str(err) or "No viable backend" in str(err):
                why = "; ".join(str(w.message) for w in caught) or str(err).split(".")[0]
                raise harness.Unavailable(
                    f"torch SDPA has no {backend[5:]} kernel for this input on {s.device.type} ({why})"
                ) from None
            raise
    return harness.directional(forward, (q, k, v), direction, out)


def run(s: harness.Settings) -> dict:
    a = s.args
    cases = model_cases(s)
    grid = QUICK_ANCHOR if s.quick else dict(tokens=ANCHOR_TOKENS, width=ANCHOR_WIDTH, n=ANCHOR_N)
    cases += anchor_cases(
        grid["n"] if a.anchor_n is None else a.anchor_n,
        a.head_dims,
        a.layouts,
        a.anchor_tokens or grid["tokens"],
        grid["width"],
    )
    cases = [c for c in cases if c.layout in a.layouts]
    elem = torch.finfo(s.dtype).bits // 8
    records = []
    for case in cases:
        shape = {k: v for k, v in asdict(case).items() if k not in ("name", "seqlens_q", "seqlens_k")}
        shape.update(
            batch=case.batch,
            max_seqlen_q=max(case.seqlens_q),
            max_seqlen_k=max(case.seqlens_k),
            tokens_q=sum(case.seqlens_q),
            tokens_k=sum(case.seqlens_k),
        )
        for backend in a.backends:
            for direction in a.directions:
                records.append(
                    harness.measure(
                        s,
                        op=NAME,
                        case=case.name,
                        backend=backend,
                        direction=direction,
                        make=lambda: make_call(case, backend, direction, s),
                        shape=shape,
                        dtype=str(s.dtype)[6:],
                        flops=flops(case, direction),
                        bytes_=io_bytes(case, direction, elem),
                        estimate=estimate_bytes(case, backend, direction, elem),
                    )
                )
    return {"records": records}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def shape_text(r: dict) -> str:
    sh = r["shape"]
    n = (
        f"{sh['max_seqlen_q']}"
        if sh["max_seqlen_q"] == sh["max_seqlen_k"]
        else f"{sh['max_seqlen_q']}/{sh['max_seqlen_k']}"
    )
    return f"B{sh['batch']} H{sh['heads']} N{'<=' if sh['layout'] == 'varlen' else ''}{n} d{sh['head_dim']}"


def markdown(section: dict) -> str:
    return (
        "FLOPs per call: fwd 4·H·Σ Nq·Nk·D, bwd 2.5× fwd (non-causal). TFLOP/s from the median; "
        "IQR = 25th-75th percentile.\n\n"
        + report.pivot_table(section["records"], shape_text, "tflops")
        + "\n\nEvery record:\n\n"
        + report.timing_table(section["records"], shape_text)
    )


def plot(section: dict, out) -> list:
    """TFLOP/s vs N per backend over the anchor grid: a panel per (layout, d, direction)."""
    anchors = [r for r in section["records"] if r["shape"]["group"] == "anchor" and r["status"] == "ok"]
    if not anchors:
        return []
    panels = {}
    for r in anchors:
        sh = r["shape"]
        key = (sh["layout"], sh["head_dim"], r["direction"])
        panel = panels.setdefault(
            key,
            {
                "title": f"{key[0]} d{key[1]} {key[2]}",
                "xlabel": "N (tokens per sequence)",
                "ylabel": "TFLOP/s",
                "series": {},
            },
        )
        panel["series"].setdefault(r["backend"], []).append((sh["n"], r["tflops"]))
    order = sorted(panels, key=lambda k: (k[0], k[1], harness.DIRECTIONS.index(k[2])))
    return [
        report.line_plot(out / "attention_tflops.png", [panels[k] for k in order], f"attention, {anchors[0]['dtype']}")
    ]


def add_arguments(p) -> None:
    g = p.add_argument_group("attention")
    g.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        metavar="BACKEND",
        help=f"attention backends (default all: {' '.join(BACKENDS)})",
    )
    g.add_argument("--directions", nargs="+", choices=harness.DIRECTIONS, default=list(harness.DIRECTIONS))
    g.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    g.add_argument(
        "--anchor-n",
        nargs="*",
        type=int,
        default=None,
        help=f"anchor sequence lengths (default {' '.join(map(str, ANCHOR_N))}; --quick "
        f"{' '.join(map(str, QUICK_ANCHOR['n']))} with a 1k-token budget; none: no anchors)",
    )
    g.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], help="anchor head dims (default 64 128)")
    g.add_argument(
        "--anchor-tokens",
        type=int,
        default=None,
        help=f"anchor token budget, batch = budget / N (default {ANCHOR_TOKENS}; --quick {QUICK_ANCHOR['tokens']})",
    )


def main(argv=None, prog: str | None = None) -> int:
    return harness.main(argv, (NAME,), prog)


if __name__ == "__main__":
    raise SystemExit(main())
