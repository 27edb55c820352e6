"""`info_nce`: the contrastive (InfoNCE) loss between two batches of paired features.

    info_nce(a, b, temperature, *, symmetric=True, negatives="local", backend="auto",
             group=None, chunk=1024) -> scalar

logits = a @ b.T / temperature, the pairs (a[i], b[i]) the positives.
  symmetric=True:  0.5 * (CE(a b^T / t, i) + CE(b a^T / t, i))
  symmetric=False: CE(a b^T / t, i)   (cross-entropy over the rows of a b^T)
temperature: a positive float, or a tensor (0-d or one element; learnable: it gets a gradient).

negatives="local": the other samples of this batch. "global": every rank's features gathered
with gradients (comm.all_gather_with_grad), this rank's rows scored against all columns (open_clip's
local-loss layout); rank r returns (W / N) * S_r so that the mean over ranks, and the gradients
under the engine's average, are the single-process loss's. Never B_local x B_global logits: a
streaming log-sum-exp over column tiles, recomputed in the backward. The scaling argument and the
memory: docs/design.md, "The contrastive loss across ranks".

Backends (hicmae_dist.ops.backends): "triton" (ops/triton/info_nce.py; fp16 / bf16 / fp32, CUDA
8.0+ or the Triton interpreter), "torch" (the same blockwise algorithm, chunk x chunk tiles, fp32
accumulation), "auto" (triton where it can run, else torch; a fall-back on CUDA is a warning naming
the reason). Both run through the torch.library ops `hicmae_dist::info_nce_fwd` / `info_nce_bwd`.
`info_nce_reference` is the naive full-logits loss (the tests' ground truth).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from hicmae_dist.comm import all_gather_with_grad, world
from hicmae_dist.ops.backends import OpBackends, triton_unavailable

log = logging.getLogger(__name__)
NEGATIVES = ("local", "global")
DEFAULT_CHUNK = 1024


# ----------------------------------------------------------------------------------------------
# The chunked PyTorch path
# ----------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _torch_forward(x, y, scale, offset: int, chunk: int):
    """(row_loss (M,), lse (M,)) in the accumulation dtype; chunk x chunk logit tiles only."""
    acc = _acc_dtype(x.dtype)
    M, N = x.shape[0], y.shape[0]
    s = scale.detach().to(acc)
    row_loss = x.new_empty(M, dtype=acc)
    lse = x.new_empty(M, dtype=acc)
    for r0 in range(0, M, chunk):
        xr = x[r0 : r0 + chunk].to(acc)
        R = xr.shape[0]
        m = xr.new_full((R,), float("-inf"))
        l = xr.new_zeros(R)  # noqa: E741
        pos = xr.new_zeros(R)
        for c0 in range(0, N, chunk):
            z = (xr @ y[c0 : c0 + chunk].to(acc).T) * s
            C = z.shape[1]
            m_new = torch.maximum(m, z.amax(dim=1))
            l = l * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)  # noqa: E741
            m = m_new
            # the positive logits, taken from the same tile: m - pos is then exact (0) when the
            # positive is the row's largest logit, and the loss keeps its relative precision
            lo, hi = max(r0, c0 - offset), min(r0 + R, c0 + C - offset)
            if lo < hi:
                i = torch.arange(lo, hi, device=x.device)
                pos[i - r0] = z[i - r0, i + offset - c0]
        log_l = torch.log(l)
        lse[r0 : r0 + R] = m + log_l
        row_loss[r0 : r0 + R] = (m - pos) + log_l
    return row_loss, lse


def _torch_backward(grad_row, x, y, scale, lse, offset: int, chunk: int):
    """(dx, dy, dscale): dz_ij = g_i (p_ij - [j == offset + i]); dx = s dz y, dy = s dz^T x,
    dscale = sum dz_ij x_i.y_j. Tile by tile, recomputing p from lse."""
    acc = _acc_dtype(x.dtype)
    M, N = x.shape[0], y.shape[0]
    s = scale.detach().to(acc)
    g = grad_row.to(acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=y.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    for r0 in range(0, M, chunk):
        xr = x[r0 : r0 + chunk].to(acc)
        R = xr.shape[0]
        gr, lr = g[r0 : r0 + R], lse[r0 : r0 + R].to(acc)
        for c0 in range(0, N, chunk):
            yc = y[c0 : c0 + chunk].to(acc)
            C = yc.shape[0]
            z = xr @ yc.T
            dz = torch.exp(z * s - lr[:, None]) * gr[:, None]
            # positives in this tile: rows i with c0 <= offset + i < c0 + C
            lo, hi = max(r0, c0 - offset), min(r0 + R, c0 + C - offset)
            if lo < hi:
                i = torch.arange(lo, hi, device=x.device)
                dz[i - r0, i + offset - c0] -= gr[i - r0]
            ds += (dz * z).sum()
            dx[r0 : r0 + R] += dz @ yc
            dy[c0 : c0 + C] += dz.T @ xr
    return (dx * s).to(x.dtype), (dy * s).to(y.dtype), ds


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hicmae_dist::info_nce_fwd", mutates_args=())
def info_nce_fwd(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: int, backend: str, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x (M, D) against columns y (N, D), logits scale * x y^T, row i's positive column
    offset + i. Returns (row_loss, lse), both (M,): row_loss_i = lse_i - z_{i, offset+i}.
    fp32 (fp64 for fp64 inputs). backend: "triton" | "torch" (already resolved)."""
    if backend == "triton":
        from hicmae_dist.ops.triton.info_nce import info_nce_forward

        return info_nce_forward(x, y, scale, offset)
    with torch.autocast(x.device.type, enabled=False):  # its matmuls accumulate in fp32, also under autocast
        return _torch_forward(x, y, scale, offset, chunk)


@info_nce_fwd.register_fake
def _(x, y, scale, offset, backend, chunk):
    acc = _acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@torch.library.custom_op("hicmae_dist::info_nce_bwd", mutates_args=())
def info_nce_bwd(
    grad_row: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    offset: int,
    backend: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dy, dscale) for the upstream gradient grad_row (M,) of row_loss."""
    if backend == "triton":
        from hicmae_dist.ops.triton.info_nce import info_nce_backward

        dx, dy, ds = info_nce_backward(grad_row, x, y, scale, lse, offset)
    else:
        with torch.autocast(x.device.type, enabled=False):
            dx, dy, ds = _torch_backward(grad_row, x, y, scale, lse, offset, chunk)
    return dx, dy, ds.to(scale.dtype).reshape(scale.shape)


@info_nce_bwd.register_fake
def _(grad_row, x, y, scale, lse, offset, backend, chunk):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, y, scale, offset, backend, chunk = inputs
    _, lse = output
    ctx.save_for_backward(x, y, scale, lse)
    ctx.offset, ctx.backend, ctx.chunk = offset, backend, chunk
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_row, _grad_lse):
    x, y, scale, lse = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(lse)
    dx, dy, ds = info_nce_bwd(grad_row.contiguous(), x, y, scale, lse, ctx.offset, ctx.backend, ctx.chunk)
    return dx, dy, ds, None, None, None


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hicmae_dist.info_nce_fwd)
def _info_nce_fwd_flops(x_shape, y_shape, *args, **kwargs) -> int:
    """The logits tiles, rows x all columns x features, once (FlopCounterMode, MFU accounting)."""
    return 2 * x_shape[0] * y_shape[0] * x_shape[1]


# ----------------------------------------------------------------------------------------------
# Backend choice and the public function
# ----------------------------------------------------------------------------------------------
BACKENDS = OpBackends(
    "info_nce",
    log,
    checks={"triton": lambda device, x: triton_unavailable(x), "torch": None},
    auto={"*": ("triton", "torch")},  # CPU: triton only under the interpreter
    fallback_text={"torch": "the chunked torch path"},
)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that will run on `x` (see the module docstring)."""
    return BACKENDS.resolve(backend, x.device, x)


def _scale_of(temperature, x: torch.Tensor) -> torch.Tensor:
    acc = _acc_dtype(x.dtype)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"info_nce: temperature tensor must hold one value, got shape {tuple(temperature.shape)}")
        return (1.0 / temperature.reshape(())).to(device=x.device, dtype=acc)
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    return torch.tensor(1.0 / temperature, dtype=acc, device=x.device)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature,
    *,
    symmetric: bool = True,
    negatives: str = "local",
    backend: str = "auto",
    group=None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Scalar InfoNCE loss with the pairs (a[i], b[i]) as positives (see the module docstring).

    a, b: (B, D) of one dtype and device, already L2-normalised if cosine logits are wanted.
    temperature: float > 0 or a one-element tensor (learnable). symmetric: both directions
    averaged, else CE over the rows of a b^T. negatives: "local" | "global" (global: rank r
    returns (W / N) * its rows' summed loss; mean over ranks = the single-process loss, and
    the DDP gradient average gives the single-process gradient). backend: "auto" | "triton" |
    "torch". group: the process group of "global". chunk: tile size of the torch backend.
    Returns a 0-d fp32 tensor (fp64 for fp64 inputs).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"info_nce negatives={negatives!r}: expected 'local' or 'global'")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce: expected a and b of one shape (B, D); got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"info_nce: a and b must share dtype and device, got {a.dtype} / {b.dtype}, {a.device} / {b.device}"
        )
    if not a.is_floating_point():
        raise ValueError(f"info_nce: expected floating-point features, got {a.dtype}")
    if int(chunk) < 1:
        raise ValueError(f"info_nce: chunk must be >= 1, got {chunk}")
    pick = resolve_backend(backend, a)
    scale = _scale_of(temperature, a)
    ws = world(group)[1] if negatives == "global" else 1
    if ws == 1:
        if a.shape[0] == 0:
            raise ValueError("info_nce: empty batch")
        a_all, b_all, offset, n_total = a, b, 0, a.shape[0]
    else:
        d = a.shape[1]
        if symmetric:  # one collective for both
            both, offset = all_gather_with_grad(torch.cat([a, b], dim=1), group)
            a_all, b_all = both[:, :d], both[:, d:]
        else:
            b_all, offset = all_gather_with_grad(b, group)
            a_all = None
        n_total = b_all.shape[0]
    loss = info_nce_fwd(a, b_all, scale, offset, pick, int(chunk))[0].sum()
    if symmetric:
        loss = 0.5 * (loss + info_nce_fwd(b, a_all, scale, offset, pick, int(chunk))[0].sum())
    return loss * (ws / n_total)


def info_nce_reference(a: torch.Tensor, b: torch.Tensor, temperature, *, symmetric: bool = True) -> torch.Tensor:
    """The naive loss over the full B x B logits (fp32, fp64 for fp64 inputs): ground truth."""
    acc = _acc_dtype(a.dtype)
    logits = (a.to(acc) @ b.to(acc).T) / temperature
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss
