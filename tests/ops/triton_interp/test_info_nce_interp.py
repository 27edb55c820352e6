"""The Triton InfoNCE kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors).

Forward (row loss, lse) and backward (dx, dy, dscale) against an fp64 reference, the
flash-attention way: the kernel's error is at most 2x that of same-precision PyTorch math on
the full logits (3x for gradients), plus a floor at fp32 rounding. Outputs go into NaN-filled
buffers so an element a kernel forgets to write shows up. Small shapes and 16-wide tiles: the
interpreter runs one program at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hicmae_dist.ops import info_nce
from hicmae_dist.ops import triton as triton_pkg
from hicmae_dist.ops.info_nce import info_nce_reference, resolve_backend
from tests.ops.test_info_nce import check_gloo, run_gloo
from tests.support import require

require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
from hicmae_dist.ops.triton import info_nce as tn  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = tn.NceTileConfig(16, 16, 16, 16, 4, 1)  # several tiles on every axis at small sizes


@pytest.fixture(autouse=True)
def _interpreting():
    assert triton_pkg.interpreting(), "these tests need TRITON_INTERPRET=1 before triton loads"


def _nan(shape, dtype):
    return torch.full((shape,) if isinstance(shape, int) else shape, float("nan"), dtype=dtype)


def _rows_loss(x, y, scale, offset):
    """Full-logits row losses (M,) in x's dtype arithmetic (fp32 softmax for 16-bit inputs)."""
    z = (x @ y.T) * scale
    tgt = torch.arange(x.shape[0]) + offset
    return torch.logsumexp(z.float(), 1) - z.float().gather(1, tgt[:, None])[:, 0]


def _baseline(x, y, scale, offset, g):
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    s = scale.detach().clone().to(x.dtype).requires_grad_()
    rl = _rows_loss(x, y, s, offset)
    (rl * g.to(rl.dtype)).sum().backward()
    return rl.detach(), x.grad, y.grad, s.grad


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,D,offset", [(19, 37, 40, 11), (1, 1, 16, 0), (33, 33, 24, 0)])
def test_kernels_against_reference(dtype, M, N, D, offset):
    gen = torch.Generator().manual_seed(M * 100 + D)
    x64 = F.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=-1)
    y64 = F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.rand(M, generator=gen, dtype=torch.float64) + 0.5
    scale = torch.tensor(1 / 0.07)
    x, y = x64.to(dtype), y64.to(dtype)
    # ground truth from the dtype-rounded inputs, so input rounding is not counted as error
    ref = _baseline(x.double(), y.double(), scale.double(), offset, g)
    plain = _baseline(x, y, scale, offset, g)
    rl_buf, lse_buf = _nan(M, torch.float32), _nan(M, torch.float32)
    rl, lse = tn.info_nce_forward(x, y, scale, offset, config=SMALL, row_loss=rl_buf, lse=lse_buf)
    assert rl is rl_buf and lse is lse_buf
    dx_buf, dy_buf, ds_buf = _nan((M, D), dtype), _nan((N, D), dtype), _nan(M, torch.float32)
    dx, dy, ds = tn.info_nce_backward(
        g.float(),
        x,
        y,
        scale,
        lse,
        offset,
        configs={"bwd_dx": SMALL, "bwd_dy": SMALL},
        dx=dx_buf,
        dy=dy_buf,
        dsrow=ds_buf,
    )
    for name, t in (("row_loss", rl), ("lse", lse), ("dx", dx), ("dy", dy), ("dsrow", ds_buf)):
        assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison shows)"
    assert dx.dtype == dtype and dy.dtype == dtype and rl.dtype == torch.float32
    lse_ref = torch.logsumexp((x.double() @ y.double().T) * scale.double(), 1)
    floor = 2.0**-20 * (1 + ref[0].abs().max().item())
    assert _err(lse, lse_ref) <= 2 * _err(plain[0], ref[0]) + floor + 1e-5
    assert _err(rl, ref[0]) <= 2 * _err(plain[0], ref[0]) + floor, "row_loss"
    for name, got, r, p in (
        ("dx", dx, ref[1], plain[1]),
        ("dy", dy, ref[2], plain[2]),
        ("dscale", ds, ref[3], plain[3]),
    ):
        floor = 2.0**-16 * (1 + r.abs().max().item())
        e, ep = _err(got, r), _err(p, r)
        assert e <= 3 * ep + floor, f"{name}: error {e:.3g} > 3 x plain {ep:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_configs_and_public_function(dtype):
    """info_nce under the interpreter picks triton ('auto' on CPU + interpreter) with the
    shipped configs; loss and gradients against the fp64 naive loss."""
    a64, b64 = (F.normalize(torch.randn(21, 32, dtype=torch.float64), dim=-1) for _ in range(2))
    assert resolve_backend("auto", a64.to(dtype)) == "triton"
    outs = []
    for x, y, be in ((a64.to(dtype), b64.to(dtype), "auto"), (a64.to(dtype), b64.to(dtype), "torch")):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        t = torch.tensor(0.07, requires_grad=True)
        loss = info_nce(x, y, t, backend=be)
        loss.backward()
        outs.append((loss.detach(), x.grad, y.grad, t.grad))
    a, b = a64.to(dtype).double().requires_grad_(), b64.to(dtype).double().requires_grad_()
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ref = info_nce_reference(a, b, t)
    ref.backward()
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for got, r in zip(outs[0], (ref.detach(), a.grad, b.grad, t.grad)):
        torch.testing.assert_close(got.double(), r, rtol=tol, atol=tol)


def test_opcheck_triton_ops():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 16, generator=gen)
    y = torch.randn(20, 16, generator=gen)
    scale = torch.tensor(3.0, requires_grad=True)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), scale, 5, "triton", 0)
    torch.library.opcheck(torch.ops.hicmae_dist.info_nce_fwd.default, args)
    _, lse = torch.ops.hicmae_dist.info_nce_fwd(*args)
    bwd = (torch.rand(9, generator=gen), x, y, scale.detach(), lse.detach(), 5, "triton", 0)
    torch.library.opcheck(torch.ops.hicmae_dist.info_nce_bwd.default, bwd)


@pytest.mark.parametrize("symmetric", [True, False])
def test_small_loss_keeps_relative_precision_fp32(symmetric):
    """Logits ~20 and a loss ~0.005: fp32 must not lose it to lse - pos cancellation."""
    a = F.pad(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), (0, 14))
    b = F.pad(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), (0, 14))
    got = info_nce(a, b, 0.05, symmetric=symmetric, backend="triton")
    ref = info_nce_reference(a.double(), b.double(), 0.05, symmetric=symmetric)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.fixture(scope="module")
def gloo_triton(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    run_gloo(out, "triton", torch.float32)  # the children inherit TRITON_INTERPRET=1
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_direction"])
def test_global_negatives_two_gloo_ranks_triton(gloo_triton, symmetric):
    """The kernels with global negatives (row offsets, gathered columns) in a 2-rank gloo
    group against one process holding the whole batch (fp64 naive), fp32 tolerances."""
    check_gloo(gloo_triton, symmetric, rtol=1e-4, atol=1e-5)
