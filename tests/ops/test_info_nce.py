"""ops.info_nce on the CPU (the chunked torch backend): against the naive full-logits loss,
fp64 gradcheck, opcheck of the registered ops, and global negatives in a real 2-process gloo
group against one process holding the whole batch. The Triton kernels are tested under the
interpreter in tests/ops/triton_interp/test_info_nce_interp.py."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hicmae_dist.ops import info_nce
from hicmae_dist.ops.info_nce import info_nce_reference, resolve_backend


def _feats(B, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    b = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return a, b


def _loss_and_grads(fn, a, b, temperature):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    t = temperature
    if isinstance(t, torch.Tensor):
        t = t.detach().clone().requires_grad_()
    loss = fn(a, b, t)
    loss.backward()
    return loss.detach(), a.grad, b.grad, (t.grad if isinstance(t, torch.Tensor) else None)


# ----------------------------------------------------------------------------------------------
# Against the naive loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed_t", "learnable_t"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_direction"])
@pytest.mark.parametrize("B,chunk", [(1, 4), (13, 4), (13, 1024), (16, 5)])
def test_matches_naive_loss_and_gradients(B, chunk, symmetric, learnable):
    a, b = _feats(B, 7, seed=B)
    t = torch.tensor(0.07, dtype=torch.float64) if learnable else 0.07
    got = _loss_and_grads(lambda a, b, t: info_nce(a, b, t, symmetric=symmetric, chunk=chunk, backend="torch"), a, b, t)
    ref = _loss_and_grads(lambda a, b, t: info_nce_reference(a, b, t, symmetric=symmetric), a, b, t)
    assert got[0].dtype == torch.float64 and got[0].dim() == 0
    for name, g, r in zip(("loss", "da", "db", "dt"), got, ref):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_fp32_matches_and_returns_fp32():
    a, b = _feats(37, 16, dtype=torch.float32, seed=3)
    got = _loss_and_grads(lambda a, b, t: info_nce(a, b, t, chunk=8, backend="torch"), a, b, 0.05)
    ref = _loss_and_grads(lambda a, b, t: info_nce_reference(a.double(), b.double(), t), a, b, 0.05)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)


def test_fp32_under_bf16_autocast():
    """The chunked path accumulates in fp32 also inside a bf16 autocast region (the models' mixed
    precision): autocast must not turn its matmuls into bf16 ones."""
    a, b = _feats(37, 16, dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(lambda a, b, t: info_nce(a, b, t, chunk=8, backend="torch"), a, b, 0.05)
    ref = _loss_and_grads(lambda a, b, t: info_nce_reference(a.double(), b.double(), t), a, b, 0.05)
    for g, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradcheck_fp64(symmetric):
    a, b = _feats(6, 5, seed=11)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, t: info_nce(a, b, t, symmetric=symmetric, chunk=4, backend="torch"), (a, b, t)
    )


def test_opcheck_forward_and_backward_ops():
    a, b = _feats(9, 6, dtype=torch.float32, seed=5)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    for offset, y in ((0, b), (4, torch.cat([b[:4], b, b[:2]]))):
        args = (a.clone().requires_grad_(), y.clone().requires_grad_(), scale, offset, "torch", 4)
        torch.library.opcheck(torch.ops.hicmae_dist.info_nce_fwd.default, args)
        row_loss, lse = torch.ops.hicmae_dist.info_nce_fwd(*args)
        bwd = (torch.rand(9), a, y, scale.detach(), lse.detach(), offset, "torch", 4)
        torch.library.opcheck(torch.ops.hicmae_dist.info_nce_bwd.default, bwd)


def test_torch_compile_graph_with_the_op():
    a, b = _feats(10, 8, dtype=torch.float32, seed=6)
    a.requires_grad_()
    f = torch.compile(lambda a, b: info_nce(a, b, 0.1, chunk=4, backend="torch"), backend="aot_eager", fullgraph=True)
    loss = f(a, b)
    loss.backward()
    torch.testing.assert_close(loss, info_nce_reference(a, b, 0.1), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(a.grad).all()


def test_global_without_process_group_is_local():
    a, b = _feats(7, 4, seed=8)
    torch.testing.assert_close(info_nce(a, b, 0.1, negatives="global", chunk=3), info_nce_reference(a, b, 0.1))


def test_backend_choice_and_validation():
    x = torch.zeros(3, 4)
    assert resolve_backend("auto", x) in ("torch", "triton")  # triton only under the interpreter
    assert resolve_backend("torch", x) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", x)
    with pytest.raises(ValueError, match="one shape"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(x, x, 0.1, negatives="all")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, x, 0.0)
    with pytest.raises(ValueError, match="empty"):
        info_nce(torch.zeros(0, 4), torch.zeros(0, 4), 0.1)


def test_chunked_path_never_materialises_full_logits(monkeypatch):
    """Every matmul of the torch path produces at most chunk x chunk logits."""
    a, b = _feats(40, 8, dtype=torch.float32, seed=9)
    a.requires_grad_()
    biggest = []
    real_matmul = torch.Tensor.__matmul__

    def spy(x, y):
        out = real_matmul(x, y)
        if x.shape[-1] == 8 and out.dim() == 2:  # feature contractions = logit tiles
            biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    info_nce(a, b, 0.1, chunk=16, backend="torch").backward()
    monkeypatch.undo()
    assert biggest and max(biggest) <= 16 * 16


# ----------------------------------------------------------------------------------------------
# Global negatives in a real 2-process gloo group
# ----------------------------------------------------------------------------------------------
SIZES = (5, 8)  # unequal local batches: N = 13


def _global_problem():
    g = torch.Generator().manual_seed(123)
    N, Din, D = sum(SIZES), 6, 4
    xa = torch.randn(N, Din, generator=g, dtype=torch.float64)
    xb = torch.randn(N, Din, generator=g, dtype=torch.float64)
    wa = torch.randn(Din, D, generator=g, dtype=torch.float64)
    wb = torch.randn(Din, D, generator=g, dtype=torch.float64)
    return xa, xb, wa, wb


def _model_loss(xa, xb, wa, wb, t, symmetric, **kw):
    """A tiny 'model': shared projections (replicated parameters), L2-normalised features."""
    a = F.normalize(xa @ wa, dim=-1)
    b = F.normalize(xb @ wb, dim=-1)
    a.retain_grad()
    b.retain_grad()
    return info_nce(a, b, t, symmetric=symmetric, **kw), a, b


def _worker(rank, world, port, out_dir, backend, dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for symmetric in (True, False):
            xa, xb, wa, wb = (t.to(dtype) for t in _global_problem())
            lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
            wa, wb = wa.clone().requires_grad_(), wb.clone().requires_grad_()
            t = torch.tensor(0.2, dtype=dtype, requires_grad=True)
            loss, a, b = _model_loss(
                xa[lo:hi], xb[lo:hi], wa, wb, t, symmetric, negatives="global", chunk=3, backend=backend
            )
            loss.backward()
            # what DDP / DeepSpeed do: average the replicated parameters' gradients over ranks
            mean_loss = loss.detach().clone()
            for gr in (wa.grad, wb.grad, t.grad, mean_loss):
                dist.all_reduce(gr)
                gr /= world
            torch.save(
                {
                    "loss": loss.detach(),
                    "mean_loss": mean_loss,
                    "dwa": wa.grad,
                    "dwb": wb.grad,
                    "dt": t.grad,
                    "da": a.grad,
                    "db": b.grad,
                },
                os.path.join(out_dir, f"rank{rank}-{symmetric}.pt"),
            )
        # No rank tears gloo down while its peer still uses the pair: without this, 2 of 5 full
        # suite runs saw a worker abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(out_dir, backend: str, dtype: torch.dtype) -> None:
    """Both losses (symmetric, one direction) from one 2-rank gloo run (spawning is slow).
    Used here (torch backend, fp64) and by the interpreter tests (triton backend, fp32)."""
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(out_dir), backend, dtype), nprocs=2, join=True)
    except mp.ProcessExitedException as err:
        # 2 of 5 full-suite runs (never alone) saw both workers abort in gloo ("terminate called
        # without an active exception"), cause not found yet: said aloud, and tried once more.
        if not err.signal_name:
            raise
        warnings.warn(f"gloo workers aborted ({err}); running them once more", stacklevel=1)
        mp.spawn(_worker, args=(2, _free_port(), str(out_dir), backend, dtype), nprocs=2, join=True)


def check_gloo(out_dir, symmetric: bool, rtol: float, atol: float) -> None:
    """The ranks' results against one process holding the whole global batch (fp64 naive)."""
    res = [torch.load(out_dir / f"rank{r}-{symmetric}.pt") for r in range(2)]
    dtype = res[0]["loss"].dtype
    xa, xb, wa, wb = (t.to(dtype).double() for t in _global_problem())
    wa.requires_grad_()
    wb.requires_grad_()
    t = torch.tensor(0.2, dtype=dtype).double().requires_grad_()
    a = F.normalize(xa @ wa, dim=-1)
    b = F.normalize(xb @ wb, dim=-1)
    a.retain_grad()
    b.retain_grad()
    ref = info_nce_reference(a, b, t, symmetric=symmetric)
    ref.backward()
    close = dict(rtol=rtol, atol=atol)
    cmp = lambda got, want: torch.testing.assert_close(got.double(), want, **close)  # noqa: E731
    # the loss: mean over ranks of the returned values = the single-process loss
    for r in res:
        cmp(r["mean_loss"], ref.detach())
    # rank r's value = (W / N) * its rows' summed loss: their sum is W * J
    cmp(res[0]["loss"] + res[1]["loss"], 2 * ref.detach())
    # parameter gradients averaged over ranks (DDP) = the single-process gradients
    for r in res:
        cmp(r["dwa"], wa.grad)
        cmp(r["dwb"], wb.grad)
        cmp(r["dt"], t.grad)
    # each rank's features get W x their share of the single-process feature gradient
    for rank, r in enumerate(res):
        lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
        cmp(r["da"] / 2, a.grad[lo:hi])
        cmp(r["db"] / 2, b.grad[lo:hi])


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    run_gloo(out, "torch", torch.float64)
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_direction"])
def test_global_negatives_two_gloo_ranks_equal_one_process(gloo_results, symmetric):
    check_gloo(gloo_results, symmetric, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_small_loss_keeps_relative_precision_fp32(symmetric):
    """Logits ~20 and a loss ~0.005: fp32 must not lose it to lse - pos cancellation."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    got = info_nce(a, b, 0.05, symmetric=symmetric, backend="torch", chunk=1)
    ref = info_nce_reference(a.double(), b.double(), 0.05, symmetric=symmetric)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
