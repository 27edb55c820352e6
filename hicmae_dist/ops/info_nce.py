"""`info_nce`: the contrastive (InfoNCE) loss between two batches of paired features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, *, symmetric: bool = True,
             negatives: str = "local") -> torch.Tensor:
    """Scalar InfoNCE loss with the pairs (a[i], b[i]) as positives.

    a, b: (B, D), already L2-normalised if cosine logits are wanted; logits = a @ b.T / t.
    symmetric: 0.5 * (CE(logits, i) + CE(logits.T, i)); else CE(logits, i) only.
    negatives: "local" uses the other samples of this batch. ("global", features gathered
    from all ranks, comes with the kernels issue.)
    """
    if negatives != "local":
        raise NotImplementedError(f"info_nce negatives={negatives!r}: only 'local' is implemented")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce: expected a and b of one shape (B, D); got {tuple(a.shape)}, {tuple(b.shape)}")
    logits = (a @ b.T).float() / temperature  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss
