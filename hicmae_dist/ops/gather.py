"""`gather_visible`: select the visible tokens of each sample, x[b, keep_idx[b]].

Fast path: the native extension hicmae_dist._C (C++ CPU kernel in csrc/gather.cpp, CUDA kernel in
csrc/kernels.cu when the extension was built with CUDA), registered as the torch op
`hicmae_dist::gather_visible` with an autograd formula. Fallback, stated plainly and
logged once: torch.gather, when the extension is not built.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    from hicmae_dist import _C  # noqa: F401  (registers torch.ops.hicmae_dist.*)

    _NATIVE_ERROR = None
except ImportError as err:  # not built: `pip install -e .` builds it
    _NATIVE_ERROR = err

_warned = False

if _NATIVE_ERROR is None:

    @torch.library.register_fake("hicmae_dist::gather_visible")
    def _gather_fake(x, idx):
        return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])

    @torch.library.register_fake("hicmae_dist::gather_visible_backward")
    def _gather_backward_fake(grad, idx, n):
        return grad.new_empty(grad.shape[0], n, grad.shape[2])

    def _setup_context(ctx, inputs, output):
        x, idx = inputs
        ctx.save_for_backward(idx)
        ctx.num_tokens = x.shape[1]

    def _backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return torch.ops.hicmae_dist.gather_visible_backward(grad, idx, ctx.num_tokens), None

    torch.library.register_autograd("hicmae_dist::gather_visible", _backward, setup_context=_setup_context)


def native_available() -> bool:
    return _NATIVE_ERROR is None


def native_built_with_cuda() -> bool:
    """True when hicmae_dist._C carries the CUDA kernels (csrc/*.cu), not the CPU ones only."""
    flag = getattr(_C, "built_with_cuda", None) if native_available() else None
    return bool(flag is not None and flag())


def native_build() -> str:
    """What the extension holds, in the words `--version` and `make setup` print."""
    if not native_available():
        return f"hicmae_dist._C not built ({_NATIVE_ERROR}): PyTorch fallbacks"
    return f"hicmae_dist._C with {'CPU + CUDA' if native_built_with_cuda() else 'CPU'} kernels"


def gather_visible_reference(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """The PyTorch indexing the native op replaces."""
    return torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))


def gather_visible(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C) any float dtype; keep_idx: (B, Nv) int64 in [0, N). Returns (B, Nv, C)."""
    global _warned
    if x.dim() != 3 or keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"gather_visible: expected x (B, N, C) and keep_idx (B, Nv); got {tuple(x.shape)}, {tuple(keep_idx.shape)}"
        )
    if native_available():
        return torch.ops.hicmae_dist.gather_visible(x, keep_idx)
    if not _warned:
        _warned = True
        log.warning("gather_visible: native extension not built (%s); using torch.gather", _NATIVE_ERROR)
    return gather_visible_reference(x, keep_idx)
