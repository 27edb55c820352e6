"""Which clips each rank reads: per-epoch batches for training, every clip in order for evaluation."""
from __future__ import annotations

import torch

from hicmae_dist.config import Config


class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch for one rank: a permutation seeded by (seed, epoch), whole global
    batches only, rank r takes rows r, r + W, ... of each; `start` skips batches already
    trained (a resume inside an epoch), without reading them."""

    def __init__(self, size: int, batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.size, self.batch, self.rank, self.world = size, batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.size // (self.batch * self.world) - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        per_step = self.batch * self.world
        for b in range(self.start, self.size // per_step):
            rows = order[b * per_step:(b + 1) * per_step]
            yield rows[self.rank::self.world].tolist()


def make_loader(dataset, cfg: Config, batch_sampler=None, batch_size: int = 1):
    """Training: batch_sampler (EpochBatches); evaluation: every clip in order."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(dataset, **batching, num_workers=cfg.data.num_workers,
                                       pin_memory=torch.cuda.is_available())
