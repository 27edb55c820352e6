"""Transformer pieces shared by the HiCMAE encoders, fusion layers and decoders (docs/models.md, HiCMAE blocks).

Pre-norm blocks, LayerNorm eps 1e-6, GELU MLP. Every attention projects q, k, v with one weight
matrix and no bias, then adds the learnable q_bias and v_bias (k has none), and calls
hicmae_dist.ops.attention, so the kernel backend is picked in one place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hicmae_dist.ops import attention

LN_EPS = 1e-6


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) fixed 1-D position code over the flat token index.

    angle(pos, j) = pos / 10000^(2 * floor(j / 2) / dim); sin on even channels, cos on odd ones.
    Computed in float64 and rounded once to float32, as the release does with numpy.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (N, 1)
    j = torch.arange(dim, dtype=torch.float64)  # (D,)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (N, D)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to drop_path at the last."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


def init_weights(module: nn.Module) -> None:
    """SPEC init, for `model.apply`: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0.
    Patch-embedding convolutions keep PyTorch's default init, as the release."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def maybe_checkpoint(enabled: bool, module: nn.Module, fn, *args):
    """fn(*args), under torch.utils.checkpoint (non-reentrant) when `enabled` and `module` is
    training with autograd on (execution.activation_checkpointing): the block's activations are
    recomputed in the backward instead of stored. Same results and gradients; the recompute
    replays the RNG state, so drop path draws the same masks."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples and
    scale the kept ones by 1 / (1 - p), so the expectation is unchanged."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)"""
    B, N, _ = x.shape
    return x.view(B, N, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)"""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear without bias, learnable q_bias and v_bias."""

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, C) -> q, k, v, each (B, N, C) (heads not split)."""
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # k: no bias
        return F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)  # 3 x (B, N, C)
        out = attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads), backend=self.backend
        )  # (B, H, N, D)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head attention with queries from x and keys / values from a context sequence.
    Same bias convention as Attention: q Linear and kv Linear without bias, q_bias, v_bias."""

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, Nq, C), context (B, Nk, C) -> q (B, Nq, C), k, v (B, Nk, C) (heads not split)."""
        q = F.linear(x, self.q.weight, self.q_bias)
        kv_bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        k, v = F.linear(context, self.kv.weight, kv_bias).chunk(2, dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, context)  # (B, Nq, C), 2 x (B, Nk, C)
        out = attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads), backend=self.backend
        )  # (B, H, Nq, D)
        return self.proj(_merge_heads(out))


def _cu_seqlens(lengths: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[(batch, length), ...] -> int32 cumulative lengths over all the segments, starting at 0."""
    seg = torch.tensor([n for b, n in lengths for _ in range(b)], dtype=torch.int32)
    return torch.cat([seg.new_zeros(1), seg.cumsum(0, dtype=torch.int32)]).to(device)


def packed_attention_pair(
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    heads: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent attentions in one packed varlen launch of ops.attention.

    first = (q1 (B, Nq1, C), k1 (B, Nk1, C), v1), second = (q2 (B, Nq2, C), k2 (B, Nk2, C), v2):
    2B segments, sample b of the first pair then sample b of the second, each query segment
    attending to its own key segment (lengths may differ, e.g. video queries on audio keys).
    Returns (out1 (B, Nq1, C), out2 (B, Nq2, C)), heads merged, as two separate calls would.
    """
    (q1, k1, v1), (q2, k2, v2) = first, second
    B, C = q1.shape[0], q1.shape[2]
    nq1, nk1, nq2, nk2 = q1.shape[1], k1.shape[1], q2.shape[1], k2.shape[1]

    def pack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # -> (B*Na + B*Nb, H, D)
        return torch.cat([a.reshape(-1, heads, C // heads), b.reshape(-1, heads, C // heads)])

    cu_q = _cu_seqlens([(B, nq1), (B, nq2)], q1.device)
    cu_k = _cu_seqlens([(B, nk1), (B, nk2)], q1.device)
    out = attention(
        pack(q1, q2),
        pack(k1, k2),
        pack(v1, v2),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(nq1, nq2),
        max_seqlen_k=max(nk1, nk2),
        backend=backend,
    )
    return out[: B * nq1].reshape(B, nq1, C), out[B * nq1 :].reshape(B, nq2, C)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class CSBlock(nn.Module):
    """Cross + self block: x += CrossAttn(LN_q(x), LN_kv(context)); then a pre-norm Block's
    self-attention and MLP. Used by the fusion encoder and the decoders' skip connections."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads, backend)
        self.cross_norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.cross_attn(self.cross_norm_q(x), self.cross_norm_kv(context)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def cs_block_pair_packed(
    first: CSBlock, second: CSBlock, x1: torch.Tensor, x2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first(x1, x2), second(x2, x1)), both from the inputs (a simultaneous update, HiCMAE's
    two fusion directions), with the two cross-attentions in one packed varlen attention launch
    and the two self-attentions in another. Same maths as the two separate calls; with drop
    path in training the random draws come in another order (same distribution)."""
    if first.cross_attn.heads != second.cross_attn.heads or first.attn.heads != second.attn.heads:
        raise ValueError("cs_block_pair_packed: the two blocks must have the same head count")
    backend = first.attn.backend
    heads = first.cross_attn.heads
    o1, o2 = packed_attention_pair(
        first.cross_attn.project(first.cross_norm_q(x1), first.cross_norm_kv(x2)),
        second.cross_attn.project(second.cross_norm_q(x2), second.cross_norm_kv(x1)),
        heads,
        backend,
    )
    y1 = x1 + first.drop_path(first.cross_attn.proj(o1))
    y2 = x2 + second.drop_path(second.cross_attn.proj(o2))
    o1, o2 = packed_attention_pair(
        first.attn.project(first.norm1(y1)), second.attn.project(second.norm1(y2)), first.attn.heads, backend
    )
    y1 = y1 + first.drop_path(first.attn.proj(o1))
    y2 = y2 + second.drop_path(second.attn.proj(o2))
    y1 = y1 + first.drop_path(first.mlp(first.norm2(y1)))
    y2 = y2 + second.drop_path(second.mlp(second.norm2(y2)))
    return y1, y2
