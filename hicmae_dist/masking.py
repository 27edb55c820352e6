"""Token masks for masked autoencoding (SPEC.md 1, 'Pretraining forward' step 1).

A mask is a bool tensor over the flat token index, True where the token is MASKED (hidden from
the encoder). Every sample of a batch masks the same number of tokens, so the visible tokens of
a batch gather into a dense (B, N_visible, C) tensor.
"""
from __future__ import annotations

import torch


def num_masked(num_tokens: int, ratio: float) -> int:
    """int(ratio * N), as the release: 0.9 * 100 -> 90, 0.8 * 128 -> 102."""
    return int(ratio * num_tokens)


def random_mask(num_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_tokens,) bool: exactly num_masked(num_tokens, ratio) True at uniformly random places."""
    order = torch.randperm(num_tokens, generator=generator)
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[order[: num_masked(num_tokens, ratio)]] = True
    return mask


def tube_mask(temporal_tokens: int, spatial_tokens: int, ratio: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(temporal_tokens * spatial_tokens,) bool in (t, h, w) order: one random spatial mask
    repeated over every temporal slice (VideoMAE tube masking)."""
    return random_mask(spatial_tokens, ratio, generator).repeat(temporal_tokens)


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool mask with the same count per row -> (visible_idx (B, Nv), masked_idx (B, Nm)),
    int64, each in ascending token order."""
    counts = mask.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must mask the same number of tokens; got counts {counts.tolist()}")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible (0) first, in order
    num_visible = mask.shape[1] - (int(counts[0]) if counts.numel() else 0)
    return order[:, :num_visible], order[:, num_visible:]
