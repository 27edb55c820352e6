"""ops.attention: every backend against the fp64 reference (error at most 2x that of the same
precision PyTorch math path), cross-attention shapes, key padding, the packed varlen layout, the
backend choice. The triton kernels run in tests/ops/triton_interp and tests/ops/triton_aot
(own processes, see test_triton_subprocess.py)."""

import importlib
import logging

import pytest
import torch

from hicmae_dist.ops import attention, attention_reference
from hicmae_dist.ops import triton as triton_pkg

attention_mod = importlib.import_module("hicmae_dist.ops.attention")  # the module, not the function


def _inputs(nq, nk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, nq, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, nk, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, nk, 32, generator=g, dtype=torch.float64)
    return q, k, v, [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq, nk", [(26, 26), (80, 26), (1, 7), (130, 80)])
def test_sdpa_backend_within_2x_of_plain_math_error(dtype, nq, nk):
    q, k, v, (q_, k_, v_) = _inputs(nq, nk, dtype)
    exact = attention_reference(q, k, v)
    ours = attention(q_, k_, v_, backend="sdpa")
    scale = q.shape[-1] ** -0.5
    plain = ((q_ @ k_.transpose(-1, -2)) * scale).softmax(-1) @ v_  # same-precision PyTorch math
    err_ours = (ours.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert ours.shape == (2, 3, nq, 32) and ours.dtype == dtype
    assert err_ours <= 2 * err_plain + 1e-12


def test_key_padding_mask_ignores_padded_keys():
    q, k, v, _ = _inputs(5, 9, torch.float64)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 6:] = False
    for backend in ("sdpa", "reference", "auto"):
        out = attention(q, k, v, key_padding_mask=valid, backend=backend)
        trimmed = attention_reference(q[:1], k[:1, :, :6], v[:1, :, :6])
        torch.testing.assert_close(out[:1], trimmed)


def test_bad_shapes_and_backend_are_clear_errors():
    q, k, v, _ = _inputs(4, 4, torch.float32)
    with pytest.raises(ValueError, match="expected q"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="attention backend 'flash': expected one of"):
        attention(q, k, v, backend="flash")


# ----------------------------------------------------------------------------------------------
# Packed varlen layout (every backend takes both layouts), fully masked rows, backend choice.
# The triton kernels themselves are tested in tests/ops/triton_interp (own process).
# ----------------------------------------------------------------------------------------------


def _varlen_inputs(lens_q, lens_k, dtype=torch.float64, heads=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(lens_q), heads, dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(lens_k), heads, dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(lens_k), heads, dim, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def _per_segment(q, k, v, cu_q, cu_k):
    """Ground truth for varlen: the dense reference on each segment alone; no keys -> 0."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(cq, cq[1:], ck, ck[1:]):
        if d == c:
            outs.append(torch.zeros_like(q[a:b]))
            continue
        seg = attention_reference(
            q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None], v[c:d].transpose(0, 1)[None]
        )
        outs.append(seg[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_varlen_matches_each_segment_alone(backend):
    lens_q, lens_k = [1, 26, 0, 40, 3], [5, 1, 8, 0, 33]  # ragged, 1s and 0s, q != k
    q, k, v, cu_q, cu_k = _varlen_inputs(lens_q, lens_k)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert out.shape == q.shape
    expected = _per_segment(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(out, expected)
    # gradients too, and max_seqlen given explicitly gives the same
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(expected, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    again = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40, max_seqlen_k=33, backend=backend)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_sdpa_within_2x_of_plain_math_error(dtype):
    q64, k64, v64, cu_q, cu_k = _varlen_inputs([7, 30], [30, 12])
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    exact = _per_segment(q64, k64, v64, cu_q, cu_k)
    ours = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="sdpa")
    plain = torch.cat(
        [
            ((q[a:b].transpose(0, 1) @ k[c:d].transpose(0, 1).transpose(-1, -2)) * 32**-0.5).softmax(-1)
            @ v[c:d].transpose(0, 1)
            for a, b, c, d in ((0, 7, 0, 30), (7, 37, 30, 42))
        ],
        dim=1,
    ).transpose(0, 1)
    err_ours = (ours.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert ours.dtype == dtype and err_ours <= 2 * err_plain + 1e-12


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_query_without_valid_keys_gets_zero_and_finite_grads(backend):
    q, k, v, _ = _inputs(4, 6, torch.float64)
    q.requires_grad_()
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False  # sample 1: every key padded
    out = attention(q, k, v, key_padding_mask=valid, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], attention_reference(q[:1], k[:1], v[:1]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_varlen_bad_inputs_are_clear_errors():
    q, k, v, cu_q, cu_k = _varlen_inputs([3, 4], [2, 5])
    with pytest.raises(ValueError, match="pass both cu_seqlens_q and cu_seqlens_k"):
        attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match="int32"):
        attention(q, k, v, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="must rise from 0 to 7"):
        attention(q, k, v, cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="same number of segments"):
        attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen for cu_seqlens_k is 4, but a segment has 5"):
        attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4)
    with pytest.raises(ValueError, match="key_padding_mask is for the dense layout"):
        attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected q \(total_q, H, D\)"):
        attention(q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    _, _, _, (qd, kd, vd) = _inputs(4, 5, torch.float32)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention(qd, kd, vd, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="share a dtype"):
        attention(qd, kd.double(), vd)


def test_xformers_absent_is_a_clear_error():
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    q, k, v, _ = _inputs(4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'xformers' cannot run: xformers is not installed"):
        attention(q, k, v, backend="xformers")


def test_auto_on_cpu_picks_sdpa_and_logs_once(caplog):
    q, k, v, _ = _inputs(4, 4, torch.float32)
    attention_mod.BACKENDS.logged_picks.discard(("cpu", "sdpa"))
    with caplog.at_level(logging.INFO, logger="hicmae_dist.ops.attention"):
        assert attention_mod.resolve_backend("auto", q.device, q) == "sdpa"
        out = attention(q, k, v)
        attention(q, k, v)
    picks = [r for r in caplog.records if "backend 'auto' on cpu runs sdpa" in r.getMessage()]
    assert len(picks) == 1
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error():
    if triton_pkg.interpreting():
        pytest.skip("this process runs the Triton interpreter")
    q, k, v, _ = _inputs(4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: .*TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")


def test_auto_on_cuda_never_falls_back_silently(monkeypatch, caplog):
    """No GPU here: fake a CUDA device whose triton check fails, and see the warning."""
    monkeypatch.setattr(attention_mod, "_triton_error", lambda q: "head dim 48 unsupported")
    attention_mod.BACKENDS.logged_skips.discard("head dim 48 unsupported")
    fake_q = torch.empty(1, 1, 1, 48)
    with caplog.at_level(logging.INFO, logger="hicmae_dist.ops.attention"):
        assert attention_mod.resolve_backend("auto", torch.device("cuda"), fake_q) == "sdpa"
    assert any(
        "cannot run triton (head dim 48 unsupported)" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    )
    monkeypatch.setattr(attention_mod, "_triton_error", lambda q: None)
    assert attention_mod.resolve_backend("auto", torch.device("cuda"), fake_q) == "triton"
