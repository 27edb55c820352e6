"""Flash attention in Triton: forward and backward, dense and packed varlen, non-causal.

FlashAttention-2: an online softmax over key/value tiles in the forward (the per-row
log-sum-exp saved, in log2 units), the probabilities recomputed tile by tile in three backward
kernels (delta, dK/dV, dQ); no atomics, deterministic. The algorithm, the lse convention, the
interpreter's upcasting, tf32 and the fixed block-size table (CONFIGS, no autotuning):
docs/design.md, "The Triton attention kernel".

Layouts (last dimension contiguous; other strides are passed to the kernels, so the
(B, N, H, D) -> (B, H, N, D) transpose the models make costs no copy):
  dense:  q (B, H, Nq, D), k / v (B, H, Nk, D), optional key_padding_mask bool (B, Nk),
          True where the key is valid. lse: (B, H, Nq) float32.
  varlen: q (total_q, H, D), k / v (total_k, H, D), cu_seqlens_q (B + 1,) and
          cu_seqlens_k (B + 1,) int32, segment b being rows cu[b]:cu[b+1]; q and k segments may
          have different lengths (cross-attention), including 0. lse: (H, total_q) float32.
Dtypes: float16, bfloat16, float32 (all three tensors the same), fp32 accumulation; head dim
32, 64 or 128. A query row with no valid key (all keys padded, or an empty key segment) gets
output 0 and zero gradients, as torch's scaled_dot_product_attention does on CPU.

torch.library ops: `hicmae_dist::flash_attn_fwd` and `hicmae_dist::flash_attn_bwd`, with fake
(meta) implementations and the autograd formula registered, so the op works under
torch.compile and passes torch.library.opcheck (run on CPU tensors under the interpreter).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

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

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(CU, off_b, seqlen, IS_VARLEN: tl.constexpr):
    """(start row, length) of segment off_b: from cu_seqlens for varlen, (0, seqlen) dense."""
    if IS_VARLEN:
        start = tl.load(CU + off_b)
        length = tl.load(CU + off_b + 1) - start
        start = start.to(tl.int64)
    else:
        start = tl.full([], 0, tl.int64)
        length = seqlen
    return start, length


@triton.jit
def _program_segments(CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(off_h, off_b, q_start, n_q, k_start, n_k) of this program: head on grid axis 1, batch
    (varlen: segment) on axis 2; int64 so that row offsets can pass 2**31 elements."""
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, n_q = _seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    k_start, n_k = _seq_bounds(CU_K, off_b, seqlen_k, IS_VARLEN)
    return off_h, off_b, q_start, n_q, k_start, n_k


@triton.jit
def _row0(off_b, off_h, start, stride_b, stride_h, stride_row):
    """Element offset of row `start` of (batch off_b, head off_h), int64 (varlen row offsets,
    total * H * D, and dense batch offsets can pass 2**31)."""
    return off_b * stride_b + off_h * stride_h + start * stride_row


@triton.jit
def _tile_ptrs(X, row0, offs_rows, stride_row, offs_d):
    """Pointers of a (rows, HEAD_DIM) tile."""
    return X + row0 + offs_rows[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _load_tile(ptrs, valid, UPCAST: tl.constexpr):
    """A (rows, HEAD_DIM) tile, rows where `valid` is False read as 0; fp32 under the
    interpreter (its bf16 arithmetic is wrong)."""
    x = tl.load(ptrs, mask=valid[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _keys_kept(kpm_row, offs_n, n_valid, HAS_KPM: tl.constexpr):
    """n_valid (keys inside the segment), also False where key_padding_mask says padded.
    kpm_row: the mask row's pointer, advanced to the tile's first key."""
    if HAS_KPM:
        keep = tl.load(kpm_row + offs_n, mask=n_valid, other=0)
        n_valid = n_valid & (keep != 0)
    return n_valid


@triton.jit
def _scores(a, b, qk_scale, DOT_PRECISION: tl.constexpr):
    """a b^T * qk_scale in fp32: q k^T (BLOCK_M, BLOCK_N), or k q^T (BLOCK_N, BLOCK_M) for dK/dV."""
    return tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _probs_from_lse(s, lse, n_valid, KEYS_ON_ROWS: tl.constexpr):
    """The backward's probabilities exp2(s - lse2), 0 on padded keys. KEYS_ON_ROWS: s is the
    transposed (BLOCK_N, BLOCK_M) tile of dK/dV; else (BLOCK_M, BLOCK_N) of dQ."""
    if KEYS_ON_ROWS:
        p = tl.math.exp2(s - lse[None, :])
        p = tl.where(n_valid[:, None], p, 0.0)
    else:
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(n_valid[None, :], p, 0.0)
    return p


@triton.jit
def _mma_operand(x, OUT, UPCAST: tl.constexpr):
    """x (fp32) rounded to the inputs' dtype (OUT's) for the next tl.dot, as on the GPU; back to
    fp32 under the interpreter."""
    x = x.to(OUT.dtype.element_ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,  # noqa: E741  (Q, K, V, O: the attention paper's names)
    LSE,
    KPM,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_om,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_pb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per query tile of BLOCK_M rows; streams the key tiles through an online
    softmax (running max m_i, running sum l_i, in log2 units)."""
    off_h, off_b, q_start, n_q, k_start, n_k = _program_segments(CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= n_q:
        return
    q_row0 = _row0(off_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
    k_row0 = _row0(off_b, off_h, k_start, stride_kb, stride_kh, stride_kn)
    v_row0 = _row0(off_b, off_h, k_start, stride_vb, stride_vh, stride_vn)
    o_row0 = _row0(off_b, off_h, q_start, stride_ob, stride_oh, stride_om)
    l_row0 = off_b * stride_lb + off_h * stride_lh + q_start

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < n_q
    q = _load_tile(_tile_ptrs(Q, q_row0, offs_m, stride_qm, offs_d), m_valid, UPCAST)
    k_ptrs = _tile_ptrs(K, k_row0, offs_n, stride_kn, offs_d)
    v_ptrs = _tile_ptrs(V, v_row0, offs_n, stride_vn, offs_d)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        n_valid = (start_n + offs_n) < n_k
        k = _load_tile(k_ptrs + start_n * stride_kn, n_valid, UPCAST)
        n_valid = _keys_kept(KPM + off_b * stride_pb + start_n, offs_n, n_valid, HAS_KPM)
        s = _scores(q, k, qk_scale, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_ptrs + start_n * stride_vn, n_valid, UPCAST)
        acc = tl.dot(_mma_operand(p, O, UPCAST), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(_tile_ptrs(O, o_row0, offs_m, stride_om, offs_d), out.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + l_row0 + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_preprocess(
    O,  # noqa: E741
    DO,
    DELTA,
    CU_Q,
    stride_ob,
    stride_om,
    stride_oh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_lb,
    stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """delta[row] = sum_d O[row, d] * dO[row, d] in fp32."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, n_q = _seq_bounds(CU_Q, off_b, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= n_q:
        return
    o_row0 = _row0(off_b, off_h, q_start, stride_ob, stride_oh, stride_om)
    do_row0 = _row0(off_b, off_h, q_start, stride_dob, stride_doh, stride_dom)
    l_row0 = off_b * stride_lb + off_h * stride_lh + q_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < n_q
    o = _load_tile(_tile_ptrs(O, o_row0, offs_m, stride_om, offs_d), m_valid, True)
    do = _load_tile(_tile_ptrs(DO, do_row0, offs_m, stride_dom, offs_d), m_valid, True)
    tl.store(DELTA + l_row0 + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KPM,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_lb,
    stride_lh,
    stride_pb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per key tile of BLOCK_N rows; loops over the query tiles of BLOCK_M rows.
    Padded keys (beyond the segment or key_padding_mask False) get exactly zero dK, dV."""
    off_h, off_b, q_start, n_q, k_start, n_k = _program_segments(CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= n_k:
        return
    q_row0 = _row0(off_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
    do_row0 = _row0(off_b, off_h, q_start, stride_dob, stride_doh, stride_dom)
    l_row0 = off_b * stride_lb + off_h * stride_lh + q_start
    k_row0 = _row0(off_b, off_h, k_start, stride_kb, stride_kh, stride_kn)
    v_row0 = _row0(off_b, off_h, k_start, stride_vb, stride_vh, stride_vn)
    dk_row0 = _row0(off_b, off_h, k_start, stride_dkb, stride_dkh, stride_dkn)
    dv_row0 = _row0(off_b, off_h, k_start, stride_dvb, stride_dvh, stride_dvn)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < n_k
    k = _load_tile(_tile_ptrs(K, k_row0, offs_n, stride_kn, offs_d), n_valid, UPCAST)
    v = _load_tile(_tile_ptrs(V, v_row0, offs_n, stride_vn, offs_d), n_valid, UPCAST)
    n_valid = _keys_kept(KPM + off_b * stride_pb, offs_n, n_valid, HAS_KPM)

    q_ptrs = _tile_ptrs(Q, q_row0, offs_m, stride_qm, offs_d)
    do_ptrs = _tile_ptrs(DO, do_row0, offs_m, stride_dom, offs_d)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        m_valid = (start_m + offs_m) < n_q
        q = _load_tile(q_ptrs + start_m * stride_qm, m_valid, UPCAST)
        # rows beyond the segment: lse = +inf makes their probabilities 0
        lse = tl.load(LSE + l_row0 + start_m + offs_m, mask=m_valid, other=float("inf"))
        s_t = _scores(k, q, qk_scale, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = _probs_from_lse(s_t, lse, n_valid, True)
        do = _load_tile(do_ptrs + start_m * stride_dom, m_valid, UPCAST)
        dv = tl.dot(_mma_operand(p_t, DK, UPCAST), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(DELTA + l_row0 + start_m + offs_m, mask=m_valid, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_mma_operand(ds_t, DK, UPCAST), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    offs_n_st = start_n + tl.arange(0, BLOCK_N)  # n_valid also drops masked keys: store them too
    st_mask = (offs_n_st < n_k)[:, None]
    dtype = DK.dtype.element_ty
    tl.store(_tile_ptrs(DK, dk_row0, offs_n_st, stride_dkn, offs_d), dk.to(dtype), mask=st_mask)
    tl.store(_tile_ptrs(DV, dv_row0, offs_n_st, stride_dvn, offs_d), dv.to(dtype), mask=st_mask)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    KPM,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dqb,
    stride_dqm,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_pb,
    seqlen_q,
    seqlen_k,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per query tile of BLOCK_M rows; loops over the key tiles of BLOCK_N rows."""
    off_h, off_b, q_start, n_q, k_start, n_k = _program_segments(CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= n_q:
        return
    q_row0 = _row0(off_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
    do_row0 = _row0(off_b, off_h, q_start, stride_dob, stride_doh, stride_dom)
    dq_row0 = _row0(off_b, off_h, q_start, stride_dqb, stride_dqh, stride_dqm)
    l_row0 = off_b * stride_lb + off_h * stride_lh + q_start
    k_row0 = _row0(off_b, off_h, k_start, stride_kb, stride_kh, stride_kn)
    v_row0 = _row0(off_b, off_h, k_start, stride_vb, stride_vh, stride_vn)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < n_q
    q = _load_tile(_tile_ptrs(Q, q_row0, offs_m, stride_qm, offs_d), m_valid, UPCAST)
    do = _load_tile(_tile_ptrs(DO, do_row0, offs_m, stride_dom, offs_d), m_valid, UPCAST)
    lse = tl.load(LSE + l_row0 + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + l_row0 + offs_m, mask=m_valid, other=0.0)

    k_ptrs = _tile_ptrs(K, k_row0, offs_n, stride_kn, offs_d)
    v_ptrs = _tile_ptrs(V, v_row0, offs_n, stride_vn, offs_d)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        n_valid = (start_n + offs_n) < n_k
        # k and v loaded in the kernel, not through _load_tile: the inlining marks between two
        # helper calls cost 2 registers on sm_80 (fp32 tf32, d 128; ptxas)
        k = tl.load(k_ptrs + start_n * stride_kn, mask=n_valid[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        n_valid = _keys_kept(KPM + off_b * stride_pb + start_n, offs_n, n_valid, HAS_KPM)
        s = _scores(q, k, qk_scale, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = _probs_from_lse(s, lse, n_valid, False)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_mma_operand(ds, DQ, UPCAST), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQ, dq_row0, offs_m, stride_dqm, offs_d), dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


KERNELS = {"fwd": _attn_fwd, "bwd_pre": _attn_bwd_preprocess, "bwd_dkdv": _attn_bwd_dkdv, "bwd_dq": _attn_bwd_dq}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttnTileConfig:
    """Launch parameters of one kernel. block_m: query rows per tile; block_n: key rows per
    tile (bwd_dkdv holds a key tile and loops over query tiles; fwd and bwd_dq the reverse)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch family, kernel, head dim, input group) -> AttnTileConfig. Arch family (`arch_family`):
# "sm90" (compute capability 9.x, 10.x), "sm80" (8.0, 8.7: 163 KB of shared memory a block) or "sm86"
# (8.6, 8.9, 12.x and anything else: 99 KB). Input group: "16" (fp16 / bf16), "tf32" (fp32 inputs on tf32
# tensor cores) or "ieee" (fp32 inputs in full fp32: FMA, far smaller tiles). `fwd_short`
# replaces `fwd` when max_seqlen_q <= SHORT_SEQLEN (the models' short streams: fewer padded
# query rows per tile). Picked from ptxas reports (tests/ops/triton_aot writes them): no
# spills on any family, shared memory within each family's limit, wgmma on sm_90 for the
# 16-bit and tf32 kernels. No GPU was at hand to time them: they are the tutorial-style
# starting points that fit, to be re-tuned with kernels/ benchmarks on real hardware.
CONFIGS: dict[tuple[str, str, int, str], AttnTileConfig] = {}
SHORT_SEQLEN = 64
GROUPS = ("16", "tf32", "ieee")


def _fill_configs() -> None:
    C = AttnTileConfig
    same = lambda c: {32: c, 64: c, 128: c}  # noqa: E731
    pre = same(C(128, 16, 4, 1))  # bwd_pre: block_n unused
    table = {
        ("sm90", "16"): {
            "fwd": {32: C(128, 64, 8, 3), 64: C(128, 64, 8, 3), 128: C(128, 64, 8, 3)},
            "fwd_short": {32: C(64, 64, 4, 3), 64: C(64, 64, 4, 3), 128: C(64, 32, 4, 3)},
            "bwd_dkdv": {32: C(32, 128, 4, 3), 64: C(32, 128, 8, 3), 128: C(32, 128, 8, 2)},
            "bwd_dq": {32: C(128, 32, 4, 3), 64: C(128, 64, 8, 2), 128: C(128, 32, 8, 3)},
        },
        ("sm80", "16"): {
            "fwd": {32: C(128, 64, 8, 3), 64: C(128, 64, 8, 3), 128: C(128, 64, 8, 2)},
            "fwd_short": {32: C(64, 64, 4, 3), 64: C(64, 64, 4, 3), 128: C(64, 32, 4, 3)},
            "bwd_dkdv": {32: C(32, 128, 8, 2), 64: C(32, 128, 8, 2), 128: C(32, 64, 8, 3)},
            "bwd_dq": {32: C(128, 32, 4, 3), 64: C(128, 64, 8, 2), 128: C(128, 32, 8, 3)},
        },
        ("sm90", "tf32"): {
            "fwd": same(C(64, 32, 8, 2)),
            "fwd_short": same(C(64, 32, 8, 2)),
            "bwd_dkdv": same(C(32, 64, 8, 2)),
            "bwd_dq": same(C(64, 32, 8, 2)),
        },
        ("sm80", "tf32"): {
            "fwd": same(C(64, 32, 8, 2)),
            "fwd_short": same(C(64, 32, 8, 2)),
            "bwd_dkdv": {32: C(32, 64, 8, 2), 64: C(16, 64, 8, 2), 128: C(32, 32, 8, 2)},
            "bwd_dq": same(C(64, 32, 8, 2)),
        },
        ("sm90", "ieee"): {
            "fwd": same(C(32, 32, 8, 1)),
            "fwd_short": same(C(32, 32, 8, 1)),
            "bwd_dkdv": same(C(32, 32, 8, 1)),
            "bwd_dq": same(C(32, 32, 8, 1)),
        },
    }
    table[("sm80", "ieee")] = table[("sm90", "ieee")]
    # sm_86 / sm_89 (consumer Ampere / Ada): sm80's tiles, within 99 KB of shared memory a block
    for group in GROUPS:
        table[("sm86", group)] = {kind: dict(per_dim) for kind, per_dim in table[("sm80", group)].items()}
    table[("sm86", "tf32")]["bwd_dq"][128] = C(32, 32, 8, 2)
    for (arch, group), kinds in table.items():
        for kind, per_dim in dict(kinds, bwd_pre=pre).items():
            for head_dim, config in per_dim.items():
                CONFIGS[(arch, kind, head_dim, group)] = config


_fill_configs()


def pick_config(kind: str, head_dim: int, dtype: torch.dtype, arch: str, max_seqlen_q: int = 1 << 30) -> AttnTileConfig:
    if kind == "fwd" and max_seqlen_q <= SHORT_SEQLEN:
        kind = "fwd_short"
    return CONFIGS[(arch, kind, head_dim, input_group(dtype))]


def kernel_of(kind: str):
    return KERNELS["fwd" if kind == "fwd_short" else kind]


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides: dense (B, H, N, D), varlen (total, H, D)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(2), t.stride(1)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse / delta: dense (B, H, Nq), varlen (H, total_q); rows stride 1."""
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


class _Problem:
    """Shapes of one call, dense or varlen."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.shape[0] - 1
            self.heads, self.head_dim = q.shape[1], q.shape[2]
            self.total_q, self.total_k = q.shape[0], k.shape[0]
            self.seqlen_q, self.seqlen_k = 0, 0  # read from cu_seqlens in the kernels
            if max_seqlen_q is None or max_seqlen_k is None:  # a device sync on CUDA
                lens = lambda cu: int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0  # noqa: E731
                max_seqlen_q = lens(cu_seqlens_q) if max_seqlen_q is None else max_seqlen_q
                max_seqlen_k = lens(cu_seqlens_k) if max_seqlen_k is None else max_seqlen_k
            self.max_q, self.max_k = int(max_seqlen_q), int(max_seqlen_k)
        else:
            self.batch, self.heads, self.seqlen_q, self.head_dim = q.shape
            self.seqlen_k = k.shape[2]
            self.max_q, self.max_k = self.seqlen_q, self.seqlen_k
        if self.batch > GRID_LIMIT or self.heads > GRID_LIMIT:
            raise ValueError(
                f"triton attention: at most {GRID_LIMIT} sequences and heads per "
                f"launch, got {self.batch} and {self.heads}"
            )

    def grid(self, block: int, rows: int):
        return (triton.cdiv(max(rows, 1), block), self.heads, max(self.batch, 1))

    def out_like(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """A new (B, H, rows, D) tensor in (B, rows, H, D) memory (or (total, H, D) varlen)."""
        if self.varlen:
            return t.new_empty(t.shape[0], self.heads, self.head_dim)
        return t.new_empty(self.batch, rows, self.heads, self.head_dim).transpose(1, 2)

    def lse_new(self, t: torch.Tensor) -> torch.Tensor:
        if self.varlen:
            return t.new_empty(self.heads, self.total_q, dtype=torch.float32)
        return t.new_empty(self.batch, self.heads, self.seqlen_q, dtype=torch.float32)


def _placeholders(q, cu_seqlens_q, cu_seqlens_k, key_padding_mask):
    """Real tensors for the pointer arguments a variant does not read (never dereferenced)."""
    dummy = q.new_empty(1, dtype=torch.int32)
    cu_q = dummy if cu_seqlens_q is None else cu_seqlens_q
    cu_k = dummy if cu_seqlens_k is None else cu_seqlens_k
    if key_padding_mask is None:
        kpm, stride_pb = q.new_empty(1, dtype=torch.uint8), 0
    else:
        kpm = last_contiguous(key_padding_mask).view(torch.uint8)
        stride_pb = kpm.stride(0)
    return cu_q, cu_k, kpm, stride_pb


def flash_attn_forward(
    q,
    k,
    v,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    softmax_scale=None,
    *,
    config: AttnTileConfig | None = None,
    out=None,
    lse=None,
):
    """Launch the forward kernel. Shapes as the module docstring; returns (out, lse).

    config: launch parameters (default `pick_config`); out / lse: preallocated outputs (the
    tests pass NaN-filled buffers to see that every element is written)."""
    check_ready("attention", q)
    q, k, v = (last_contiguous(t) for t in (q, k, v))
    pb = _Problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(pb.head_dim)
    if config is None:
        config = pick_config("fwd", pb.head_dim, q.dtype, arch_family(q.device), pb.max_q)
    out = pb.out_like(q, pb.seqlen_q) if out is None else out
    lse = pb.lse_new(q) if lse is None else lse
    if out.numel() == 0 or pb.batch == 0:
        return out, lse
    cu_q, cu_k, kpm, stride_pb = _placeholders(q, cu_seqlens_q, cu_seqlens_k, key_padding_mask)
    with device_guard(q):
        _attn_fwd[pb.grid(config.block_m, pb.max_q)](
            q,
            k,
            v,
            out,
            lse,
            kpm,
            cu_q,
            cu_k,
            *_strides(q, pb.varlen),
            *_strides(k, pb.varlen),
            *_strides(v, pb.varlen),
            *_strides(out, pb.varlen),
            *_lse_strides(lse, pb.varlen),
            stride_pb,
            pb.seqlen_q,
            pb.seqlen_k,
            scale * LOG2E,
            HEAD_DIM=pb.head_dim,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            IS_VARLEN=pb.varlen,
            HAS_KPM=key_padding_mask is not None,
            UPCAST=interpreting(),
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return out, lse


def flash_attn_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    softmax_scale=None,
    *,
    configs: dict[str, AttnTileConfig] | None = None,
    dq=None,
    dk=None,
    dv=None,
    delta=None,
):
    """Launch the three backward kernels; returns (dq, dk, dv) in the inputs' dtype.

    configs: {"bwd_pre" | "bwd_dkdv" | "bwd_dq": AttnTileConfig}, missing ones from
    `pick_config`;
    dq / dk / dv / delta: preallocated outputs (see `flash_attn_forward`)."""
    check_ready("attention", q)
    dout, q, k, v, out = (last_contiguous(t) for t in (dout, q, k, v, out))
    pb = _Problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(pb.head_dim)
    arch = arch_family(q.device)
    configs = dict(configs or {})
    for kind in ("bwd_pre", "bwd_dkdv", "bwd_dq"):
        configs.setdefault(kind, pick_config(kind, pb.head_dim, q.dtype, arch))
    dq = pb.out_like(q, pb.seqlen_q) if dq is None else dq
    dk = pb.out_like(k, pb.seqlen_k) if dk is None else dk
    dv = pb.out_like(v, pb.seqlen_k) if dv is None else dv
    delta = torch.empty_like(lse) if delta is None else delta
    if pb.batch == 0:
        return dq, dk, dv
    cu_q, cu_k, kpm, stride_pb = _placeholders(q, cu_seqlens_q, cu_seqlens_k, key_padding_mask)
    common = dict(HEAD_DIM=pb.head_dim, IS_VARLEN=pb.varlen)
    flags = dict(
        common, HAS_KPM=key_padding_mask is not None, UPCAST=interpreting(), DOT_PRECISION=dot_precision(q.dtype)
    )
    lse_strides = _lse_strides(lse, pb.varlen)
    if delta.stride() != lse.stride():
        raise ValueError("flash_attn_backward: delta must have lse's layout")
    with device_guard(q):
        if dq.numel():
            c = configs["bwd_pre"]
            _attn_bwd_preprocess[pb.grid(c.block_m, pb.max_q)](
                out,
                dout,
                delta,
                cu_q,
                *_strides(out, pb.varlen),
                *_strides(dout, pb.varlen),
                *lse_strides,
                pb.seqlen_q,
                BLOCK_M=c.block_m,
                **common,
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
        if dk.numel():
            c = configs["bwd_dkdv"]
            _attn_bwd_dkdv[pb.grid(c.block_n, pb.max_k)](
                q,
                k,
                v,
                dout,
                lse,
                delta,
                dk,
                dv,
                kpm,
                cu_q,
                cu_k,
                *_strides(q, pb.varlen),
                *_strides(k, pb.varlen),
                *_strides(v, pb.varlen),
                *_strides(dout, pb.varlen),
                *_strides(dk, pb.varlen),
                *_strides(dv, pb.varlen),
                *lse_strides,
                stride_pb,
                pb.seqlen_q,
                pb.seqlen_k,
                scale * LOG2E,
                scale,
                BLOCK_M=c.block_m,
                BLOCK_N=c.block_n,
                **flags,
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
        if dq.numel():
            c = configs["bwd_dq"]
            _attn_bwd_dq[pb.grid(c.block_m, pb.max_q)](
                q,
                k,
                v,
                dout,
                lse,
                delta,
                dq,
                kpm,
                cu_q,
                cu_k,
                *_strides(q, pb.varlen),
                *_strides(k, pb.varlen),
                *_strides(v, pb.varlen),
                *_strides(dout, pb.varlen),
                *_strides(dq, pb.varlen),
                *lse_strides,
                stride_pb,
                pb.seqlen_q,
                pb.seqlen_k,
                scale * LOG2E,
                scale,
                BLOCK_M=c.block_m,
                BLOCK_N=c.block_n,
                **flags,
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hicmae_dist::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out like q ((B, H, Nq, D) in (B, Nq, H, D) memory, or (total_q, H, D)),
    lse float32 (B, H, Nq) or (H, total_q), in log2 units (see the module docstring)."""
    return flash_attn_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, softmax_scale
    )


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, softmax_scale):
    if cu_seqlens_q is not None:
        return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    B, H, Nq, D = q.shape
    return (q.new_empty(B, Nq, H, D).transpose(1, 2), q.new_empty(B, H, Nq, dtype=torch.float32))


@torch.library.custom_op("hicmae_dist::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), shaped like q, k, v."""
    return flash_attn_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, softmax_scale
    )


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, softmax_scale):
    if cu_seqlens_q is not None:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    return (
        q.new_empty(B, Nq, H, D).transpose(1, 2),
        k.new_empty(B, Nk, H, D).transpose(1, 2),
        v.new_empty(B, Nk, H, D).transpose(1, 2),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, kpm, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, kpm)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, kpm = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, kpm, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(
    q,
    k,
    v,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    key_padding_mask=None,
    softmax_scale=None,
) -> torch.Tensor:
    """The `triton` backend of `hicmae_dist.ops.attention` (inputs already validated there):
    the registered op, differentiable. Returns out only."""
    if cu_seqlens_q is not None:
        max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    else:
        max_q, max_k = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, _ = flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, key_padding_mask, float(scale))
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): used by tests/ops/triton_aot and the benchmarks
# ----------------------------------------------------------------------------------------------
# Integer arguments that are multiples of 16 in the usual launch (strides of (.., H, D) rows with
# D >= 32): Triton's launcher marks those divisible by 16, and so does the AOT signature.
_NOT_DIVISIBLE = {"seqlen_q", "seqlen_k", "stride_lb", "stride_lh", "stride_pb"}


def aot_compile(
    kind: str,
    head_dim: int,
    dtype: torch.dtype,
    config: AttnTileConfig,
    capability: int,
    *,
    varlen: bool = False,
    kpm: bool = True,
    precision: str | None = None,
):
    """Compile one kernel for a CUDA compute capability (80, 90, ...) without a GPU. Returns
    Triton's compiled kernel (asm["ptx"], asm["cubin"], metadata.shared, ...)."""
    kernel = kernel_of(kind)
    elem = TRITON_DTYPE_NAMES[dtype]
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": config.block_m, "IS_VARLEN": varlen}
    if kind != "bwd_pre":
        constexprs.update(
            BLOCK_N=config.block_n,
            HAS_KPM=kpm,
            UPCAST=False,
            DOT_PRECISION=precision or ("tf32" if dtype != torch.float32 else "ieee"),
        )
    fp32_ptrs = {"LSE", "DELTA"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in fp32_ptrs:
            signature[name] = "*fp32"
        elif name == "KPM":
            signature[name] = "*u8"
        elif name in ("CU_Q", "CU_K"):
            signature[name] = "*i32"
        elif name.isupper():
            signature[name] = f"*{elem}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if (signature[name].startswith("*") and name != "KPM") or (
            name.startswith("stride_") and name not in _NOT_DIVISIBLE
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_ahead(kernel, signature, constexprs, attrs, capability, config.num_warps, config.num_stages)
