"""Multiply-accumulates (MACs) per sample, counted by formula, not by tracing: the linear layers
(every nn.Linear, including q / kv / proj / MLP / heads), the patch-embedding convolutions (a
Linear over each patch) and the two attention matmuls (q k^T and weights @ v: 2 * Nq * Nk * C
over all heads), each for the number of tokens that part of the model really sees. LayerNorm,
softmax, GELU, position additions, pooling and losses are left out (a fraction of a percent).
tests/models/test_info.py checks the formula against torch's FlopCounterMode on small models.

The building blocks' counts live here; each family's spec (models/<family>/macs.py) adds them up.
"""

from __future__ import annotations

from hicmae_dist.config import ModelConfig
from hicmae_dist.models import get_spec


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return tokens * fan_in * fan_out


def attention(nq: int, nk: int, dim: int) -> int:
    """q k^T and softmax(.) v, all heads: 2 * Nq * Nk * C."""
    return 2 * nq * nk * dim


def block(n: int, dim: int, mlp_ratio: float) -> int:
    """Self-attention block: qkv, attention, proj, MLP."""
    hidden = int(dim * mlp_ratio)
    return linear(n, dim, 3 * dim) + attention(n, n, dim) + linear(n, dim, dim) + 2 * linear(n, dim, hidden)


def cross_self_block(nq: int, nk: int, dim: int, mlp_ratio: float) -> int:
    """CSBlock: q on the queries, kv on the context, cross attention, proj, then a block."""
    return (
        linear(nq, dim, dim)
        + linear(nk, dim, 2 * dim)
        + attention(nq, nk, dim)
        + linear(nq, dim, dim)
        + block(nq, dim, mlp_ratio)
    )


def macs(
    cfg: ModelConfig, kind: str = "pretrain", num_classes: int | None = None, mode: str = "multimodal"
) -> dict[str, int]:
    """Multiply-accumulates per sample, by component (our top-level module names), for the
    pretraining (masked inputs) or fine-tuning (one view, all tokens) forward pass."""
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"kind {kind!r}: expected 'pretrain' or 'finetune'")
    spec = get_spec(cfg.arch)
    return spec.macs(cfg, kind, num_classes or spec.default_classes, mode)
