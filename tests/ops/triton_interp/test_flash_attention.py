"""The Triton flash-attention kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors).

Forward and backward against a plain fp64 reference, the flash-attention way: the kernel's
error must be at most 2x that of a same-precision PyTorch path (3x for gradients). Outputs go
into NaN-filled buffers so an element a kernel forgets to write shows up. Small shapes: the
interpreter runs one program at a time.
"""

from __future__ import annotations

import math

import pytest
import torch

from hicmae_dist.ops import attention, attention_reference
from hicmae_dist.ops import triton as triton_pkg
from hicmae_dist.ops.attention import TRITON_HEAD_DIMS
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import attention as fa  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _interpreting():
    assert triton_pkg.interpreting(), "these tests need TRITON_INTERPRET=1 before triton loads"


# ----------------------------------------------------------------------------------------------
# Cases and the two baselines
# ----------------------------------------------------------------------------------------------
class Case:
    """Random inputs in fp64 plus their `dtype` copies. Dense: (B, H, N, D) views of
    (B, N, H, D) memory, as the models pass them. Varlen: packed (total, H, D)."""

    def __init__(self, dtype, head_dim, *, heads=2, seed=0, dense=None, varlen=None, kpm_all_false_row=False):
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.head_dim = dtype, head_dim
        self.cu_q = self.cu_k = self.kpm = None
        self.max_q = self.max_k = None
        if varlen is not None:
            lens_q, lens_k = varlen
            self.cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
            self.cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
            self.max_q, self.max_k = max(lens_q), max(lens_k)
            shapes = [(sum(lens_q), heads, head_dim), (sum(lens_k), heads, head_dim)]
            make = lambda s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        else:
            B, nq, nk, with_kpm = dense
            shapes = [(B, nq, heads, head_dim), (B, nk, heads, head_dim)]
            make = lambda s: torch.randn(*s, generator=g, dtype=torch.float64).transpose(1, 2)  # noqa: E731
            if with_kpm:
                self.kpm = torch.rand(B, nk, generator=g) > 0.3
                self.kpm[:, 0] = True
                if kpm_all_false_row:
                    self.kpm[-1] = False  # every query of the last sample has no valid key
        self.q64 = make(shapes[0])
        self.k64 = make(shapes[1])
        self.v64 = make(shapes[1])
        self.do64 = torch.randn(self.q64.shape, generator=g, dtype=torch.float64)
        self.q, self.k, self.v, self.do = (t.to(dtype) for t in (self.q64, self.k64, self.v64, self.do64))

    @property
    def varlen(self):
        return self.cu_q is not None

    def kwargs(self):
        return dict(
            cu_seqlens_q=self.cu_q,
            cu_seqlens_k=self.cu_k,
            max_seqlen_q=self.max_q,
            max_seqlen_k=self.max_k,
            key_padding_mask=self.kpm,
        )

    def reference(self):
        """fp64 output and gradients."""
        q, k, v = (t.detach().clone().requires_grad_() for t in (self.q64, self.k64, self.v64))
        out = attention_reference(q, k, v, self.kpm, cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k)
        out.backward(self.do64)
        return out.detach(), q.grad, k.grad, v.grad

    def plain(self):
        """Same-precision PyTorch math: matmuls, softmax and autograd in `dtype`."""
        q, k, v = (t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v))
        if self.varlen:
            cq, ck = self.cu_q.tolist(), self.cu_k.tolist()
            outs = [
                _plain_dense(
                    q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None], v[c:d].transpose(0, 1)[None], None
                )[0].transpose(0, 1)
                for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])
            ]
            out = torch.cat(outs)
        else:
            out = _plain_dense(q, k, v, self.kpm)
        out.backward(self.do)
        return out.detach(), q.grad, k.grad, v.grad


def _plain_dense(q, k, v, kpm):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if s.shape[-1] == 0:
        return q * 0
    if kpm is None:
        return s.softmax(-1) @ v
    valid = kpm[:, None, None, :]
    has_key = kpm.any(-1)[:, None, None, None]
    p = s.masked_fill(~valid & has_key, float("-inf")).softmax(-1) * valid
    return p @ v


def _err(a, b):
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


def _nan_like(t, shape=None, dtype=None):
    base = t.new_empty(shape if shape is not None else t.shape, dtype=dtype or t.dtype)
    return base.fill_(float("nan"))


def run_kernels(case: Case, fwd_config=None, bwd_configs=None):
    """Forward and backward through the launchers, every output in a NaN-filled buffer."""
    kw = case.kwargs()
    if case.varlen:
        out_buf = _nan_like(case.q)
        lse_buf = _nan_like(case.q, (case.q.shape[1], case.q.shape[0]), torch.float32)
        dq, dk, dv = _nan_like(case.q), _nan_like(case.k), _nan_like(case.v)
    else:
        B, H, Nq, D = case.q.shape
        Nk = case.k.shape[2]
        out_buf = _nan_like(case.q, (B, Nq, H, D)).transpose(1, 2)
        lse_buf = _nan_like(case.q, (B, H, Nq), torch.float32)
        dq = _nan_like(case.q, (B, Nq, H, D)).transpose(1, 2)
        dk = _nan_like(case.k, (B, Nk, H, D)).transpose(1, 2)
        dv = _nan_like(case.v, (B, Nk, H, D)).transpose(1, 2)
    delta = torch.full_like(lse_buf, float("nan"))
    out, lse = fa.flash_attn_forward(case.q, case.k, case.v, **kw, config=fwd_config, out=out_buf, lse=lse_buf)
    assert out is out_buf and lse is lse_buf
    grads = fa.flash_attn_backward(
        case.do, case.q, case.k, case.v, out, lse, **kw, configs=bwd_configs, dq=dq, dk=dk, dv=dv, delta=delta
    )
    for name, t in (("out", out), ("lse", lse), ("delta", delta), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])):
        assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison shows)"
    return out, lse, grads


def check_against_baselines(case: Case, out, grads):
    """Error against fp64 at most 2x the plain path's (3x for gradients), plus a floor at the
    level of fp32 rounding so that "2x of an error that happens to be ~0" stays meaningful.

    The gradient floor is 2**-18 of the reference's scale, on purpose wider than the output's
    2**-22: where a key segment has a single key, softmax is constant and the exact dQ, dK are
    0; the plain path's softmax backward cancels exactly (p * (g - p * g) with p = 1) while the
    FA2 backward's delta = rowsum(dO * O) cancels against dO . V only to fp32 rounding. That
    shows in fp32 only (16-bit errors are orders of magnitude above either floor)."""
    ref = case.reference()
    plain = case.plain()
    err = _err(out, ref[0])
    err_plain = _err(plain[0], ref[0])
    floor = 2.0**-22 * (1 + ref[0].abs().max().item())
    assert out.shape == ref[0].shape and out.dtype == case.dtype
    assert err <= 2 * err_plain + floor, f"out: error {err:.3g} > 2 x plain {err_plain:.3g}"
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref[1:], plain[1:]):
        e, ep = _err(g, r), _err(p, r)
        floor = 2.0**-18 * (1 + r.abs().max().item()) if r.numel() else 0.0
        assert g.shape == r.shape and g.dtype == case.dtype
        assert e <= 3 * ep + floor, f"{name}: error {e:.3g} > 3 x plain {ep:.3g}"


# ----------------------------------------------------------------------------------------------
# Dense and varlen, every dtype and head dim, default configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", TRITON_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_padded_keys(dtype, head_dim):
    # Nq > fwd_short's 64 and not a multiple of any block; Nk != Nq; padded keys
    case = Case(dtype, head_dim, dense=(2, 70, 45, True), seed=head_dim)
    out, lse, grads = run_kernels(case)
    check_against_baselines(case, out, grads)
    padded = ~case.kpm
    for g in grads[1:]:  # dK and dV of padded keys: exactly zero
        assert torch.equal(g.transpose(1, 2)[padded], torch.zeros_like(g.transpose(1, 2)[padded]))


@pytest.mark.parametrize("head_dim", TRITON_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_ragged_cross_lengths(dtype, head_dim):
    # lengths 1, 0 on either side, q and k of different lengths, none a multiple of a block
    case = Case(dtype, head_dim, varlen=([1, 37, 0, 66, 5], [7, 1, 12, 0, 50]), seed=1 + head_dim)
    out, lse, grads = run_kernels(case)
    check_against_baselines(case, out, grads)
    # segment 3 has no keys: output 0, lse +inf, zero dq; segment 2 has no queries: dk = dv = 0
    rows = slice(38, 38 + 66)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.isinf(lse[:, rows]).all() and torch.equal(grads[0][rows], torch.zeros_like(grads[0][rows]))
    keys = slice(8, 20)
    assert torch.equal(grads[1][keys], torch.zeros_like(grads[1][keys]))
    assert torch.equal(grads[2][keys], torch.zeros_like(grads[2][keys]))


def test_dense_short_and_single_rows():
    # Nq = 1 and Nk = 1 (fwd_short config), plus a sample whose keys are all padded
    for nq, nk in ((1, 26), (26, 1), (26, 26)):
        case = Case(torch.float16, 32, dense=(2, nq, nk, True), seed=nq * 100 + nk)
        out, _, grads = run_kernels(case)
        check_against_baselines(case, out, grads)
    case = Case(torch.float32, 64, dense=(2, 9, 13, True), kpm_all_false_row=True, seed=5)
    out, lse, grads = run_kernels(case)
    check_against_baselines(case, out, grads)
    assert torch.equal(out[-1], torch.zeros_like(out[-1])) and torch.isinf(lse[-1]).all()
    assert all(torch.equal(g[-1], torch.zeros_like(g[-1])) for g in grads)


def test_lse_is_the_log_sum_exp():
    case = Case(torch.float32, 32, dense=(1, 20, 30, True), seed=3)
    _, lse, _ = run_kernels(case)
    s = case.q64 @ case.k64.transpose(-1, -2) / math.sqrt(32)
    s = s.masked_fill(~case.kpm[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) * fa.LOG2E, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Every shipped config, explicitly (the interpreter ignores warps and stages: what differs is
# the block shape; each is run on lengths that are not multiples of its blocks)
# ----------------------------------------------------------------------------------------------
def _config_cases():
    seen = {}
    for (arch, kind, head_dim, group), cfg in sorted(fa.CONFIGS.items()):
        key = (fa.kernel_of(kind).__name__, head_dim, group, cfg.block_m, cfg.block_n)
        seen.setdefault(key, (kind, head_dim, group, cfg, f"{arch}"))
    return [pytest.param(*v, id=f"{v[0]}-d{v[1]}-{v[2]}-m{v[3].block_m}n{v[3].block_n}") for v in seen.values()]


@pytest.mark.parametrize("kind, head_dim, group, config, arch", _config_cases())
def test_every_config(kind, head_dim, group, config, arch):
    dtype = {"16": torch.bfloat16 if head_dim == 64 else torch.float16}.get(group, torch.float32)
    bm, bn = config.block_m, config.block_n
    if kind == "bwd_pre":
        bn = 16
    nq = bm + 3 if kind != "fwd_short" else min(bm, fa.SHORT_SEQLEN) - 3
    nk = 2 * bn + 5
    seed = bm * 7 + bn + head_dim
    if (bm + bn + head_dim) % 2:  # alternate layouts across configs; both are run above anyway
        case = Case(dtype, head_dim, varlen=([nq, 1, 2], [nk, 3, 0]), seed=seed)
    else:
        case = Case(dtype, head_dim, dense=(1, nq, nk, True), seed=seed)
    fwd_cfg = config if kind in ("fwd", "fwd_short") else None
    bwd_cfgs = {kind: config} if kind.startswith("bwd") else None
    out, _, grads = run_kernels(case, fwd_cfg, bwd_cfgs)
    check_against_baselines(case, out, grads)


def test_every_config_is_covered():
    assert len(_config_cases()) >= 20
    kinds = {p.values[0] for p in _config_cases()}
    assert kinds == {"fwd", "fwd_short", "bwd_pre", "bwd_dkdv", "bwd_dq"}


# ----------------------------------------------------------------------------------------------
# The public API and the torch.library ops
# ----------------------------------------------------------------------------------------------
def test_public_api_triton_backend_dense_and_varlen():
    case = Case(torch.float16, 32, dense=(2, 30, 19, True), seed=11)
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    out = attention(q, k, v, key_padding_mask=case.kpm, backend="triton")
    out.backward(case.do)
    check_against_baselines(case, out.detach(), (q.grad, k.grad, v.grad))

    case = Case(torch.bfloat16, 64, varlen=([3, 40], [17, 9]), seed=12)
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    # max_seqlen omitted: read from cu_seqlens
    out = attention(q, k, v, cu_seqlens_q=case.cu_q, cu_seqlens_k=case.cu_k, backend="triton")
    out.backward(case.do)
    check_against_baselines(case, out.detach(), (q.grad, k.grad, v.grad))


def test_auto_on_cpu_still_picks_sdpa_under_the_interpreter():
    from hicmae_dist.ops.attention import resolve_backend

    q = torch.randn(1, 1, 4, 32)
    assert resolve_backend("auto", q.device, q) == "sdpa"
    assert resolve_backend("triton", q.device, q) == "triton"


def test_triton_backend_rejects_unsupported_inputs_clearly():
    q = torch.randn(1, 2, 4, 48)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: .*head dim 32, 64 or 128"):
        attention(q, q, q, backend="triton")
    q = torch.randn(1, 2, 4, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: .*float64"):
        attention(q, q, q, backend="triton")


def test_opcheck_forward_and_backward_ops():
    torch.manual_seed(0)
    dense = Case(torch.float32, 32, dense=(2, 9, 12, True), seed=21)
    varlen = Case(torch.float32, 32, varlen=([1, 17, 0], [5, 9, 3]), seed=22)
    scale = 32**-0.5
    for case in (dense, varlen):
        q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
        max_q = case.max_q if case.varlen else q.shape[2]
        max_k = case.max_k if case.varlen else k.shape[2]
        args = (q, k, v, case.cu_q, case.cu_k, max_q, max_k, case.kpm, scale)
        torch.library.opcheck(torch.ops.hicmae_dist.flash_attn_fwd.default, args)
        out, lse = torch.ops.hicmae_dist.flash_attn_fwd(*args)
        bwd_args = (
            case.do,
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse,
            case.cu_q,
            case.cu_k,
            max_q,
            max_k,
            case.kpm,
            scale,
        )
        torch.library.opcheck(torch.ops.hicmae_dist.flash_attn_bwd.default, bwd_args)


def test_torch_compile_graph_with_the_op():
    case = Case(torch.float32, 32, dense=(1, 10, 14, True), seed=31)
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))

    def f(q, k, v):
        return fa.flash_attention(q, k, v, key_padding_mask=case.kpm).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward()
    check_against_baselines_sum = attention_reference(case.q64, case.k64, case.v64, case.kpm)
    torch.testing.assert_close(f(q, k, v).double(), check_against_baselines_sum.sum(), rtol=1e-5, atol=1e-4)
    assert q.grad is not None and torch.isfinite(q.grad).all()
