"""The decoder's token re-assembly and the per-patch target normalisation, from the native
extension hicmae_dist._C (C++ CPU impls, CUDA kernels in csrc/kernels.cu).

`assemble_decoder_tokens(visible, mask_token, pos, visible_idx, masked_idx)`:
    torch.cat([visible + pos[visible_idx], mask_token + pos[masked_idx]], dim=1), the HiCMAE
    decoder's input. The models never unshuffle: the masked tokens follow the visible ones and
    the position code carries each location, so this (not a scatter back to the original order)
    is the re-assembly they need. One pass, no (B, Nm, C) position gather and no cat copy.
`patch_norm(x, frame_diff)`: x (R, F, S, C) standardised over (F, S) per (r, c) with the
    unbiased std, (x - mean) / (std + 1e-6); with frame_diff, frames 1.. minus frame 0. The CPU
    impl is the ATen maths of models/targets.py (bit-identical); on CUDA a fused two-pass kernel.

Both are torch ops (hicmae_dist::assemble_decoder_tokens, hicmae_dist::patch_norm) with fake
(meta) impls and autograd formulas. Fallback, logged once: the same PyTorch maths when the
extension is not built.
"""

from __future__ import annotations

import logging

import torch

from hicmae_dist.ops.gather import native_available

log = logging.getLogger(__name__)
PATCH_NORM_EPS = 1e-6
_warned: set[str] = set()


def _ops_registered() -> bool:
    """The extension is built and carries these ops (not a stale build from before them)."""
    if not native_available():
        return False
    try:
        torch.ops.hicmae_dist.assemble_decoder_tokens  # noqa: B018
        torch.ops.hicmae_dist.patch_norm  # noqa: B018
    except (AttributeError, RuntimeError):
        log.warning(
            "hicmae_dist._C predates assemble_decoder_tokens / patch_norm: rebuild it with "
            "`pip install --no-build-isolation --no-deps -e .`; using the PyTorch maths"
        )
        return False
    return True


_NATIVE = _ops_registered()


def _warn_fallback(op: str) -> None:
    if op not in _warned:
        _warned.add(op)
        from hicmae_dist.ops.gather import _NATIVE_ERROR

        log.warning("%s: native extension not built (%s); using the PyTorch maths", op, _NATIVE_ERROR)


# ----------------------------------------------------------------------------------------------
# References: the PyTorch maths each op replaces
# ----------------------------------------------------------------------------------------------
def assemble_decoder_tokens_reference(visible, mask_token, pos, visible_idx, masked_idx):
    return torch.cat([visible + pos[visible_idx], mask_token + pos[masked_idx]], dim=1)


def patch_norm_reference(x: torch.Tensor, frame_diff: bool) -> torch.Tensor:
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.var(dim=(1, 2), unbiased=True, keepdim=True).sqrt()
    y = (x - mean) / (std + PATCH_NORM_EPS)
    if frame_diff and y.shape[1] > 1:
        y = torch.cat([y[:, :1], y[:, 1:] - y[:, :1]], dim=1)
    return y


# ----------------------------------------------------------------------------------------------
# torch.library registrations (fake impls, autograd)
# ----------------------------------------------------------------------------------------------
if _NATIVE:

    @torch.library.register_fake("hicmae_dist::assemble_decoder_tokens")
    def _assemble_fake(visible, mask_token, pos, visible_idx, masked_idx):
        return visible.new_empty(visible.shape[0], visible.shape[1] + masked_idx.shape[1], visible.shape[2])

    def _assemble_setup(ctx, inputs, output):
        visible, mask_token, pos, visible_idx, masked_idx = inputs
        ctx.save_for_backward(visible_idx, masked_idx)
        ctx.num_visible = visible.shape[1]
        ctx.num_pos = pos.shape[0]
        ctx.needs = ctx.needs_input_grad[:3]

    def _assemble_backward(ctx, grad):
        visible_idx, masked_idx = ctx.saved_tensors
        nv = ctx.num_visible
        g_vis = grad[:, :nv] if ctx.needs[0] else None
        # as autograd reduces a broadcast add: sum over the broadcast dims
        g_mask = grad[:, nv:].sum(dim=(0, 1)) if ctx.needs[1] else None
        g_pos = None
        if ctx.needs[2]:
            # as autograd does for pos[visible_idx] and pos[masked_idx]: each indexing's
            # backward on its own, then the two contributions summed
            g_pos = grad.new_zeros(ctx.num_pos, grad.shape[2]).index_put_(
                (visible_idx,), grad[:, :nv], accumulate=True
            ) + grad.new_zeros(ctx.num_pos, grad.shape[2]).index_put_((masked_idx,), grad[:, nv:], accumulate=True)
        return g_vis, g_mask, g_pos, None, None

    torch.library.register_autograd(
        "hicmae_dist::assemble_decoder_tokens", _assemble_backward, setup_context=_assemble_setup
    )

    @torch.library.register_fake("hicmae_dist::patch_norm")
    def _patch_norm_fake(x, frame_diff):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _patch_norm_setup(ctx, inputs, output):
        x, frame_diff = inputs
        ctx.save_for_backward(x)
        ctx.frame_diff = frame_diff

    def _patch_norm_backward(ctx, grad):
        # targets are computed without gradient; for completeness, the gradient of the maths
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(patch_norm_reference(leaf, ctx.frame_diff), leaf, grad)
        return g, None

    torch.library.register_autograd("hicmae_dist::patch_norm", _patch_norm_backward, setup_context=_patch_norm_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def assemble_decoder_tokens(
    visible: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor,
    visible_idx: torch.Tensor,
    masked_idx: torch.Tensor,
) -> torch.Tensor:
    """visible (B, Nv, C); mask_token (C,) or (1, 1, C); pos (N, C); visible_idx (B, Nv) and
    masked_idx (B, Nm) int64 in [0, N). Returns (B, Nv + Nm, C) =
    torch.cat([visible + pos[visible_idx], mask_token + pos[masked_idx]], 1), bit for bit.

    The native op runs when visible, mask_token and pos share a dtype (the two adds then round
    in it, as torch's do); with mixed dtypes (autocast) the PyTorch maths runs, as torch's type
    promotion of the two halves would differ from one op's single dtype.
    """
    if visible.dim() != 3 or pos.dim() != 2 or mask_token.shape[-1] != visible.shape[-1]:
        raise ValueError(
            f"assemble_decoder_tokens: expected visible (B, Nv, C), mask_token (C,), "
            f"pos (N, C); got {tuple(visible.shape)}, {tuple(mask_token.shape)}, "
            f"{tuple(pos.shape)}"
        )
    if mask_token.numel() != visible.shape[-1]:
        raise ValueError(
            f"assemble_decoder_tokens: mask_token must hold C = {visible.shape[-1]} values, "
            f"got {tuple(mask_token.shape)}"
        )
    if not _NATIVE:
        _warn_fallback("assemble_decoder_tokens")
        return assemble_decoder_tokens_reference(visible, mask_token, pos, visible_idx, masked_idx)
    if not (visible.dtype == mask_token.dtype == pos.dtype):
        return assemble_decoder_tokens_reference(visible, mask_token, pos, visible_idx, masked_idx)
    return torch.ops.hicmae_dist.assemble_decoder_tokens(visible, mask_token.reshape(-1), pos, visible_idx, masked_idx)


def patch_norm(x: torch.Tensor, frame_diff: bool = False) -> torch.Tensor:
    """x (R, F, S, C) floating point -> the same shape: each (r, c) standardised over its F * S
    values, (x - mean) / (unbiased std + 1e-6); with frame_diff, frame f >= 1 becomes its
    difference to frame 0 (both standardised)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"patch_norm: expected floating x (R, F, S, C), got {x.dtype} {tuple(x.shape)}")
    if not _NATIVE:
        _warn_fallback("patch_norm")
        return patch_norm_reference(x, frame_diff)
    return torch.ops.hicmae_dist.patch_norm(x, frame_diff)
