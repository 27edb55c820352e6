"""`attention`: the one entry point every model attention goes through.

Non-causal multi-head attention, scale 1/sqrt(D), in two layouts (flash-attention style):
  - dense: q (B, H, Nq, D), k / v (B, H, Nk, D), optional key_padding_mask bool (B, Nk), True
    where the key is valid;
  - packed varlen: q (total_q, H, D), k / v (total_k, H, D) with int32 cu_seqlens_q /
    cu_seqlens_k of shape (B + 1,): segment b is rows cu[b]:cu[b+1] (several samples, or the
    audio and video streams of one sample, in one launch); q and k segments may differ in length
    (cross-attention), and a segment may be empty.
A query row without any valid key (all its keys padded, or an empty key segment) gets output 0
and zero gradients in every backend.

Backends:
  - "triton": ours (hicmae_dist/ops/triton/attention.py), forward and backward, fp16 / bf16 /
    fp32 inputs with fp32 accumulation, head dim 32, 64 or 128. CUDA tensors (compute capability
    8.0+), or CPU tensors when the Triton interpreter is on (TRITON_INTERPRET=1; the tests).
  - "xformers": xformers.ops.memory_efficient_attention (BlockDiagonalMask for varlen), CUDA
    only, when xformers is installed (`pip install hicmae-dist[gpu]`).
  - "sdpa": torch.nn.functional.scaled_dot_product_attention (varlen: padded to dense with a
    key padding mask, then unpadded).
  - "reference": plain softmax(q k^T * scale) v with fp32 accumulation (fp64 for fp64 inputs);
    the tests' ground truth. Varlen the same way as sdpa.
  - "auto": CUDA -> triton, CPU -> sdpa. The pick is logged once per (device type, pick). On
    CUDA, an input the triton kernels do not support (another head dim, fp64, an old GPU) runs
    sdpa with a warning naming the reason, logged once per reason: never a silent fall-back.
An explicit backend that cannot run raises RuntimeError saying why.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from hicmae_dist.ops import triton as _triton_pkg
from hicmae_dist.ops.backends import OpBackends, triton_unavailable

log = logging.getLogger(__name__)
TRITON_HEAD_DIMS = (32, 64, 128)


# ----------------------------------------------------------------------------------------------
# Validation and layout helpers
# ----------------------------------------------------------------------------------------------
def _check_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask
) -> tuple[int, int] | None:
    """Raise ValueError on bad shapes / dtypes / devices; for varlen return (max_q, max_k)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("attention: pass both cu_seqlens_q and cu_seqlens_k (varlen) or neither")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"attention: q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if cu_seqlens_q is None:
        _check_dense(q, k, v, max_seqlen_q, max_seqlen_k, key_padding_mask)
        return None
    _check_varlen_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask)
    # Host-side checks read cu_seqlens: free on CPU; on CUDA only when max_seqlen is not given
    # (that read is a device sync anyway, as in flash-attention).
    check_host = q.device.type == "cpu" or max_seqlen_q is None or max_seqlen_k is None
    if not check_host:
        return int(max_seqlen_q), int(max_seqlen_k)
    return (
        _checked_max_seqlen("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        _checked_max_seqlen("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    )


def _check_dense(q, k, v, max_seqlen_q, max_seqlen_k, key_padding_mask) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: expected q (B, H, Nq, D) and k, v (B, H, Nk, D); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("attention: max_seqlen_q / max_seqlen_k go with cu_seqlens (varlen)")
    if key_padding_mask is not None:
        B, Nk = k.shape[0], k.shape[2]
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"attention: key_padding_mask must be bool (B, Nk) = ({B}, {Nk}), "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")


def _check_varlen_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask) -> None:
    """Shapes, dtypes and devices of the packed layout (not the cu_seqlens values)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"attention (varlen): expected q (total_q, H, D) and k, v (total_k, H, D); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_padding_mask is not None:
        raise ValueError(
            "attention: key_padding_mask is for the dense layout; varlen segments carry their lengths in cu_seqlens"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"attention: {name} must be int32 (B + 1,), got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"attention: {name} on {cu.device}, q on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_seqlens_k.shape)} must describe the same number of segments"
        )


def _checked_max_seqlen(name: str, cu: torch.Tensor, total: int, given: int | None) -> int:
    """The longest segment of `cu` (read on the host), after checking that it rises from 0 to
    `total` and that `given`, if any, is not shorter."""
    host = cu.tolist()
    lens = [b - a for a, b in zip(host, host[1:])]
    if host[0] != 0 or host[-1] != total or any(n < 0 for n in lens):
        raise ValueError(
            f"attention: {name} must rise from 0 to {total} (rows of the packed "
            f"tensor), got {host if len(host) <= 16 else host[:8] + ['...']}"
        )
    longest = max(lens, default=0)
    if given is not None and int(given) < longest:
        raise ValueError(f"attention: max_seqlen for {name} is {given}, but a segment has {longest} rows")
    return longest if given is None else int(given)


def _pad(x: torch.Tensor, lens: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, H, D) packed -> ((B, H, max_len, D) zero-padded, valid mask bool (B, max_len))."""
    B = len(lens)
    valid = torch.arange(max_len, device=x.device)[None, :] < torch.tensor(lens, device=x.device)[:, None]
    dense = x.new_zeros(B, max_len, *x.shape[1:])
    dense = dense.index_put(valid.nonzero(as_tuple=True), x)  # differentiable; rows in (b, i) order
    return dense.transpose(1, 2), valid


def _unpad(dense: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, max_len, D) -> (total, H, D): the valid rows, in packed order."""
    return dense.transpose(1, 2)[valid]


def _varlen_via_dense(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
    """Run a dense backend on packed varlen inputs: pad, key padding mask, unpad."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if not lens_q:
        return q.new_zeros(q.shape)
    qd, valid_q = _pad(q, lens_q, max(lens_q))
    kd, valid_k = _pad(k, lens_k, max(lens_k))
    vd, _ = _pad(v, lens_k, max(lens_k))
    return _unpad(fn(qd, kd, vd, valid_k), valid_q)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def _softmax_dense(q, k, v, key_padding_mask, acc: torch.dtype):
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        valid = key_padding_mask[:, None, None, :]
        has_key = key_padding_mask.any(dim=-1)[:, None, None, None]
        # rows without any valid key stay unmasked (no NaN, also in the backward) and are
        # zeroed by the multiplication below
        probs = scores.masked_fill(~valid & has_key, float("-inf")).softmax(dim=-1) * valid
    else:
        probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(acc)).to(q.dtype)


def _reference_dense(q, k, v, key_padding_mask):
    return _softmax_dense(q, k, v, key_padding_mask, torch.promote_types(q.dtype, torch.float32))


def _plain_dense(q, k, v, key_padding_mask):
    return _softmax_dense(q, k, v, key_padding_mask, q.dtype)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v accumulated in fp32 (fp64 for fp64 inputs), cast back to q's
    dtype. Shapes as `attention` (dense, or varlen with cu_seqlens)."""
    if cu_seqlens_q is not None:
        return _varlen_via_dense(_reference_dense, q, k, v, cu_seqlens_q, cu_seqlens_k, None, None)
    return _reference_dense(q, k, v, key_padding_mask)


def attention_plain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_reference's maths with the matmuls and the softmax in q's dtype: the
    same-precision PyTorch path of flash-attention's error rule (a kernel's error against an
    fp64 reference is at most 2x this path's, 3x for gradients)."""
    if cu_seqlens_q is not None:
        return _varlen_via_dense(_plain_dense, q, k, v, cu_seqlens_q, cu_seqlens_k, None, None)
    return _plain_dense(q, k, v, key_padding_mask)


def _sdpa_dense(q, k, v, key_padding_mask):
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _xformers_error(device: torch.device) -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as err:
        return (
            f"xformers is not installed or does not import ({type(err).__name__}: {err}); "
            f"install it with `pip install 'hicmae-dist[gpu]'` on a CUDA machine"
        )
    if device.type != "cuda":
        return f"xformers memory_efficient_attention needs CUDA tensors, got {device}"
    return None


def _xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask):
    import xformers.ops as xops
    from xformers.ops import fmha

    if cu_seqlens_q is not None:  # (total, H, D) -> (1, total, H, D), block-diagonal bias
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
            q_seqlen=[b - a for a, b in zip(cu_q, cu_q[1:])], kv_seqlen=[b - a for a, b in zip(cu_k, cu_k[1:])]
        )
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    bias = None
    if key_padding_mask is not None:  # additive bias; xformers wants its last dim 8-aligned
        B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        padded = q.new_zeros(B, H, Nq, (Nk + 7) // 8 * 8)[..., :Nk]
        bias = padded.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )  # (B, N, H, D) layout
    return out.transpose(1, 2)


def _triton_error(q: torch.Tensor) -> str | None:
    why = triton_unavailable(q)
    if why is None and q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"triton kernels take head dim 32, 64 or 128, got {q.shape[-1]}"
    return why


def _triton_check(device: torch.device, q: torch.Tensor | None) -> str | None:
    if q is None:
        return _triton_pkg.available(device)[1] or None
    return _triton_error(q)


BACKENDS = OpBackends(
    "attention",
    log,
    checks={
        "triton": _triton_check,
        "xformers": lambda device, q: _xformers_error(device if q is None else q.device),
        "sdpa": None,
        "reference": None,
    },
    auto={"cuda": ("triton", "sdpa"), "*": ("sdpa",)},
)


def resolve_backend(backend: str, device: torch.device, q: torch.Tensor | None = None) -> str:
    """The backend that will run. `auto`: CUDA -> triton (sdpa with a logged warning when the
    triton kernels cannot take `q`), anything else -> sdpa. An explicit backend that cannot run
    on `q` raises RuntimeError."""
    return BACKENDS.resolve(backend, device, q)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal multi-head attention, softmax(q k^T / sqrt(D)) v.

    Dense layout:
      q: (B, H, Nq, D); k, v: (B, H, Nk, D); Nq may differ from Nk (cross-attention).
      key_padding_mask: optional bool (B, Nk), True where the key is valid.
      Returns (B, H, Nq, D).
    Packed varlen layout (cu_seqlens_q and cu_seqlens_k given):
      q: (total_q, H, D); k, v: (total_k, H, D).
      cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), cumulative lengths starting at 0 and ending at
        total_q / total_k; segment b of q (rows cu_seqlens_q[b]:cu_seqlens_q[b+1]) attends to
        segment b of k / v. Lengths may differ between q and k and may be 0.
      max_seqlen_q, max_seqlen_k: optional int, the longest segment of each. Given, they save
        a device sync on CUDA (they must be right: the triton kernels' grid is sized by them);
        omitted, they are read from cu_seqlens.
      Returns (total_q, H, D).
    q, k, v share dtype and device; the output has q's dtype. Scale 1/sqrt(D). A query without
    any valid key gets 0. The triton backend takes fp16 / bf16 / fp32 and head dim 32, 64, 128;
    the other backends any float dtype and head dim.
    backend: "auto" | "triton" | "xformers" | "sdpa" | "reference" (see the module docstring).
    """
    maxes = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask)
    pick = resolve_backend(backend, q.device, q)
    if pick == "triton":
        from hicmae_dist.ops.triton.attention import flash_attention

        if maxes is not None:
            max_seqlen_q, max_seqlen_k = maxes
        return flash_attention(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            key_padding_mask=key_padding_mask,
        )
    if pick == "xformers":
        return _xformers(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask)
    dense = _reference_dense if pick == "reference" else _sdpa_dense
    if cu_seqlens_q is not None:
        return _varlen_via_dense(dense, q, k, v, cu_seqlens_q, cu_seqlens_k, *maxes)
    return dense(q, k, v, key_padding_mask)
