"""Collectives with gradients, for the ops that look across ranks (info_nce's global negatives).

`all_gather_with_grad(x)`: every rank's (B_r, ...) tensor concatenated in rank order, (sum B_r,
...), differentiable: the backward all-reduces (sums) the gradient of the gathered tensor over
the ranks and hands each rank the slice of its own rows, i.e. rank r's x receives
sum_s d L_s / d x_r, the gradient of the *sum* of the ranks' losses. Ranks may hold different
numbers of rows (padded to the largest for the collective). Every rank must call it, and must
run the backward, the same number of times (as any collective).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "world"]


def world(group=None) -> tuple[int, int]:
    """(rank, world size) of `group`; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(n: int, device: torch.device, group) -> list[int]:
    _, ws = world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], rank: int):
        longest = max(sizes)
        x_c = x.contiguous()
        if x.shape[0] < longest:
            x_c = torch.cat([x_c, x_c.new_zeros(longest - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(x_c) for _ in sizes]
        dist.all_gather(parts, x_c, group=group)
        ctx.group, ctx.start = group, sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start:ctx.stop], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(gathered (sum_r B_r, ...), offset of this rank's rows in it). Without a process group
    (or with one rank) returns (x, 0)."""
    rank, ws = world(group)
    if ws == 1:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x, group, sizes, rank), sum(sizes[:rank])
