"""InfoNCE rows against columns in Triton: forward and backward, streaming log-sum-exp.

One direction of the contrastive loss, for rows x (M, D) against columns y (N, D), logits
z_ij = scale * x_i . y_j, the positive of row i being column `offset + i` (with global
negatives, this rank's rows sit at `offset` in the gathered columns):
    row_loss_i = logsumexp_j z_ij - z_{i, offset + i},   lse_i = logsumexp_j z_ij.
The M x N logits are never held: the forward streams column tiles through an online
log-sum-exp (running max and sum, exp2 with scale * log2(e)) and keeps only lse (M,) fp32.
The backward recomputes the probabilities tile by tile from lse, with the upstream gradient
g (M,) of row_loss, dz_ij = g_i * (p_ij - [j == offset + i]):
    dx = scale * dz @ y      (`_nce_bwd_dx`: one program per (row tile, D slice), loop over columns)
    dy = scale * dz^T @ x    (`_nce_bwd_dy`: one program per (column tile, D slice), loop over rows)
    dscale = sum_ij dz_ij * (x_i . y_j)  (per-row partial sums written by `_nce_bwd_dx`).
No atomics: deterministic. Any feature dim D: the scores loop over D in BLOCK_K slices, the
gradients are split over D in BLOCK_DO slices (the grid's second axis; each slice recomputes
the scores, which for D <= BLOCK_DO is no extra work).

Dtypes: x, y float16 / bfloat16 / float32 (the same), fp32 accumulation; lse, row_loss and
dscale fp32; dx, dy in the inputs' dtype. scale is a pointer to one fp32 value (a learnable
temperature stays on the device: no sync). Under the interpreter (TRITON_INTERPRET=1, CPU
tensors) loaded values are upcast to fp32 (its bf16 arithmetic is wrong), but dz is still
rounded to the input dtype before the second matmul, as on the GPU.

Configs per (arch family, kernel, input group), not autotuned; the AOT tests
(tests/ops/triton_aot/test_info_nce_aot.py) compile each for sm_90 and sm_80 and check spills.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from hicmae_dist.ops.backends import TRITON_DTYPES as DTYPES
from hicmae_dist.ops.triton import interpreting
from hicmae_dist.ops.triton.launch import (
    GRID_LIMIT,
    TRITON_DTYPE_NAMES,
    arch_family,
    check_ready,
    compile_ahead,
    device_guard,
    dot_precision,
    input_group,
    last_contiguous,
)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scores(
    X,
    Y,
    offs_m,
    offs_n,
    m_valid,
    n_valid,
    stride_xm,
    stride_yn,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """x[offs_m] . y[offs_n] over the whole feature dim, fp32 (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    y_ptrs = Y + offs_n.to(tl.int64)[:, None] * stride_yn + offs_k[None, :]
    for k0 in range(0, D, BLOCK_K):
        k_valid = (k0 + offs_k) < D
        x = tl.load(x_ptrs + k0, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        y = tl.load(y_ptrs + k0, mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _nce_fwd(
    X,
    Y,
    SCALE,
    LOSS,
    LSE,
    M,
    N,
    D,
    offset,
    stride_xm,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    target = offs_m + offset
    c = tl.load(SCALE).to(tl.float32) * 1.4426950408889634  # logits in log2 units
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        s = (
            _scores(
                X,
                Y,
                offs_m,
                offs_n,
                m_valid,
                n_valid,
                stride_xm,
                stride_yn,
                D,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                UPCAST,
                DOT_PRECISION,
            )
            * c
        )
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid column
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
        pos += tl.sum(tl.where(offs_n[None, :] == target[:, None], s, 0.0), 1)
        m_i = m_new
    lse2 = m_i + tl.math.log2(l_i)
    tl.store(LSE + offs_m, lse2 * 0.6931471805599453, mask=m_valid)
    # (m - pos) first: exact when the positive is the row's largest logit, so a small loss
    # keeps its relative precision (lse2 - pos would cancel two large numbers)
    tl.store(LOSS + offs_m, ((m_i - pos) + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_valid)


@triton.jit
def _nce_bwd_dx(
    X,
    Y,
    SCALE,
    GROW,
    LSE,
    DX,
    DSROW,
    M,
    N,
    D,
    offset,
    stride_xm,
    stride_yn,
    stride_dxm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    dtype = DX.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    target = offs_m + offset
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_valid = offs_do < D
    scale = tl.load(SCALE).to(tl.float32)
    c = scale * 1.4426950408889634
    lse2 = tl.load(LSE + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    g = tl.load(GROW + offs_m, mask=m_valid, other=0.0).to(tl.float32)  # 0 on padded rows
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        s = _scores(
            X,
            Y,
            offs_m,
            offs_n,
            m_valid,
            n_valid,
            stride_xm,
            stride_yn,
            D,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            DOT_PRECISION,
        )
        p = tl.where(n_valid[None, :], tl.math.exp2(s * c - lse2[:, None]), 0.0)
        dz = g[:, None] * (p - tl.where(offs_n[None, :] == target[:, None], 1.0, 0.0))
        dsum += tl.sum(dz * s, 1)
        y = tl.load(
            Y + offs_n.to(tl.int64)[:, None] * stride_yn + offs_do[None, :],
            mask=n_valid[:, None] & do_valid[None, :],
            other=0.0,
        )
        dz_in = dz.to(dtype)
        if UPCAST:
            y = y.to(tl.float32)
            dz_in = dz_in.to(tl.float32)
        acc = tl.dot(dz_in, y, acc, input_precision=DOT_PRECISION)
    tl.store(
        DX + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_do[None, :],
        (acc * scale).to(dtype),
        mask=m_valid[:, None] & do_valid[None, :],
    )
    if pid_d == 0:
        tl.store(DSROW + offs_m, dsum, mask=m_valid)


@triton.jit
def _nce_bwd_dy(
    X,
    Y,
    SCALE,
    GROW,
    LSE,
    DY,
    M,
    N,
    D,
    offset,
    stride_xm,
    stride_yn,
    stride_dym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    dtype = DY.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_valid = offs_do < D
    scale = tl.load(SCALE).to(tl.float32)
    c = scale * 1.4426950408889634
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        lse2 = tl.load(LSE + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        g = tl.load(GROW + offs_m, mask=m_valid, other=0.0).to(tl.float32)
        s = _scores(
            X,
            Y,
            offs_m,
            offs_n,
            m_valid,
            n_valid,
            stride_xm,
            stride_yn,
            D,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            DOT_PRECISION,
        )
        p = tl.math.exp2(s * c - lse2[:, None])
        dz = g[:, None] * (p - tl.where(offs_n[None, :] == (offs_m + offset)[:, None], 1.0, 0.0))
        x = tl.load(
            X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_do[None, :],
            mask=m_valid[:, None] & do_valid[None, :],
            other=0.0,
        )
        dz_in = dz.to(dtype)
        if UPCAST:
            x = x.to(tl.float32)
            dz_in = dz_in.to(tl.float32)
        acc = tl.dot(tl.trans(dz_in), x, acc, input_precision=DOT_PRECISION)
    tl.store(
        DY + offs_n.to(tl.int64)[:, None] * stride_dym + offs_do[None, :],
        (acc * scale).to(dtype),
        mask=n_valid[:, None] & do_valid[None, :],
    )


KERNELS = {"fwd": _nce_fwd, "bwd_dx": _nce_bwd_dx, "bwd_dy": _nce_bwd_dy}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NceTileConfig:
    """block_m: rows per tile; block_n: columns per tile; block_k: feature slice of the score
    loop; block_do: feature slice of a gradient program (unused by fwd)."""

    block_m: int
    block_n: int
    block_k: int
    block_do: int
    num_warps: int
    num_stages: int


# (arch family, kernel, input group) -> NceTileConfig. Input groups as the attention kernels': "16"
# (fp16 / bf16), "tf32", "ieee" (fp32 in full precision, FMA: small tiles). Chosen to compile
# without spills on sm_90 / sm_80 (tests/ops/triton_aot); not timed on a GPU (none here).
CONFIGS: dict[tuple[str, str, str], NceTileConfig] = {}


def _fill_configs() -> None:
    C = NceTileConfig
    table = {
        "16": {"fwd": C(64, 64, 64, 0, 4, 3), "bwd_dx": C(64, 64, 64, 128, 8, 2), "bwd_dy": C(64, 64, 64, 128, 8, 2)},
        "tf32": {"fwd": C(64, 64, 32, 0, 4, 3), "bwd_dx": C(64, 64, 32, 64, 8, 2), "bwd_dy": C(64, 64, 32, 64, 8, 2)},
        "ieee": {"fwd": C(32, 32, 32, 0, 4, 1), "bwd_dx": C(32, 32, 32, 32, 4, 1), "bwd_dy": C(32, 32, 32, 32, 4, 1)},
    }
    for arch in ("sm90", "sm80", "sm86"):
        for group, kinds in table.items():
            for kind, cfg in kinds.items():
                CONFIGS[(arch, kind, group)] = cfg


_fill_configs()


def pick_config(kind: str, dtype: torch.dtype, arch: str) -> NceTileConfig:
    return CONFIGS[(arch, kind, input_group(dtype))]


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _check_ready(x: torch.Tensor) -> None:
    check_ready("info_nce", x)
    if x.dtype not in DTYPES:
        raise RuntimeError(f"ops.info_nce backend 'triton' takes float16, bfloat16 or float32, got {x.dtype}")


def _prep(x, y, scale):
    x, y = last_contiguous(x), last_contiguous(y)
    scale = scale.detach().reshape(1).to(torch.float32)
    return x, y, scale


def info_nce_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    *,
    config: NceTileConfig | None = None,
    row_loss=None,
    lse=None,
):
    """Launch the forward kernel. x (M, D), y (N, D), scale 0-d tensor; returns (row_loss (M,),
    lse (M,)) fp32. row_loss / lse may be preallocated (the tests pass NaN-filled buffers)."""
    _check_ready(x)
    x, y, scale = _prep(x, y, scale)
    M, D = x.shape
    N = y.shape[0]
    config = config or pick_config("fwd", x.dtype, arch_family(x.device))
    row_loss = x.new_empty(M, dtype=torch.float32) if row_loss is None else row_loss
    lse = x.new_empty(M, dtype=torch.float32) if lse is None else lse
    if M == 0:
        return row_loss, lse
    with device_guard(x):
        _nce_fwd[(triton.cdiv(M, config.block_m),)](
            x,
            y,
            scale,
            row_loss,
            lse,
            M,
            N,
            D,
            offset,
            x.stride(0),
            y.stride(0),
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            UPCAST=interpreting(),
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return row_loss, lse


def info_nce_backward(
    grad_row: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    offset: int,
    *,
    configs: dict[str, NceTileConfig] | None = None,
    dx=None,
    dy=None,
    dsrow=None,
):
    """Launch the two backward kernels; returns (dx, dy, dscale): dx, dy in the inputs' dtype,
    dscale a 0-d fp32 tensor (d loss / d scale). Outputs may be preallocated."""
    _check_ready(x)
    x, y, scale = _prep(x, y, scale)
    grad_row = grad_row.to(torch.float32).contiguous()
    lse = lse.contiguous()
    M, D = x.shape
    N = y.shape[0]
    arch = arch_family(x.device)
    configs = dict(configs or {})
    for kind in ("bwd_dx", "bwd_dy"):
        configs.setdefault(kind, pick_config(kind, x.dtype, arch))
    dx = torch.empty_like(x) if dx is None else dx
    dy = torch.empty_like(y) if dy is None else dy
    dsrow = x.new_empty(M, dtype=torch.float32) if dsrow is None else dsrow
    if M == 0:
        return dx, dy.zero_(), x.new_zeros((), dtype=torch.float32)
    flags = dict(UPCAST=interpreting(), DOT_PRECISION=dot_precision(x.dtype))
    with device_guard(x):
        c = configs["bwd_dx"]
        grid = (triton.cdiv(M, c.block_m), triton.cdiv(D, c.block_do))
        assert grid[1] <= GRID_LIMIT
        _nce_bwd_dx[grid](
            x,
            y,
            scale,
            grad_row,
            lse,
            dx,
            dsrow,
            M,
            N,
            D,
            offset,
            x.stride(0),
            y.stride(0),
            dx.stride(0),
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            BLOCK_DO=c.block_do,
            **flags,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        c = configs["bwd_dy"]
        grid = (triton.cdiv(N, c.block_n), triton.cdiv(D, c.block_do))
        _nce_bwd_dy[grid](
            x,
            y,
            scale,
            grad_row,
            lse,
            dy,
            M,
            N,
            D,
            offset,
            x.stride(0),
            y.stride(0),
            dy.stride(0),
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            BLOCK_DO=c.block_do,
            **flags,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
    return dx, dy, dsrow.sum()


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU): hicmae_dist.ops.triton.aot (tests/ops/triton_aot, kernels/)
# ----------------------------------------------------------------------------------------------
_FP32_PTRS = {"SCALE", "LOSS", "LSE", "GROW", "DSROW"}
_NOT_DIVISIBLE = {"M", "N", "D", "offset"}


def aot_compile(kind: str, dtype: torch.dtype, config: NceTileConfig, capability: int, *, precision: str | None = None):
    """Compile one kernel for a CUDA compute capability without a GPU; Triton's compiled kernel."""
    kernel = KERNELS[kind]
    constexprs = {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "UPCAST": False,
        "DOT_PRECISION": precision or ("tf32" if dtype != torch.float32 else "ieee"),
    }
    if kind != "fwd":
        constexprs["BLOCK_DO"] = config.block_do
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FP32_PTRS:
            signature[name] = "*fp32"
        elif name.isupper() and name not in _NOT_DIVISIBLE:
            signature[name] = f"*{TRITON_DTYPE_NAMES[dtype]}"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or (name.startswith("stride_") and name not in _NOT_DIVISIBLE):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_ahead(kernel, signature, constexprs, attrs, capability, config.num_warps, config.num_stages)
