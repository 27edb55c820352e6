"""Which clips each rank reads: per-epoch batches for training, every clip in order for evaluation."""

from __future__ import annotations

import numpy as np
import torch

from hicmae_dist.config import Config


def balanced_weights(multi_hot: np.ndarray) -> torch.Tensor:
    """(N,) float64 clip weights from labels (N, K) in {0, 1} (one-hot for single-label sets):
    the sum over a clip's labels of 1000 / (the label's count + 0.01), as the release's
    gen_weight_file.py (the 0.01 keeps a class absent from training finite)."""
    y = np.asarray(multi_hot, dtype=np.float64)
    label_weight = 1000.0 / (y.sum(axis=0) + 0.01)  # (K,)
    return torch.from_numpy(y @ label_weight)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch for one rank: a permutation seeded by (seed, epoch), or with
    `weights` (N,) size draws with replacement (WeightedRandomSampler's multinomial draw, the
    release's --bal), whole global batches only, rank r takes rows r, r + W, ... of each;
    `start` skips batches already trained (a resume inside an epoch), without reading them.
    Either order is a function of (seed, epoch) alone: a resume repeats and skips no draw."""

    def __init__(
        self,
        size: int,
        batch: int,
        rank: int,
        world: int,
        seed: int,
        epoch: int,
        start: int = 0,
        weights: torch.Tensor | None = None,
    ):
        if weights is not None and len(weights) != size:
            raise ValueError(f"{len(weights)} sampling weights for {size} clips")
        self.size, self.batch, self.rank, self.world = size, batch, rank, world
        self.seed, self.epoch, self.start, self.weights = seed, epoch, start, weights

    def __len__(self) -> int:
        return self.size // (self.batch * self.world) - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (
            torch.randperm(self.size, generator=g)
            if self.weights is None
            else torch.multinomial(self.weights, self.size, replacement=True, generator=g)
        )
        per_step = self.batch * self.world
        for b in range(self.start, self.size // per_step):
            rows = order[b * per_step : (b + 1) * per_step]
            yield rows[self.rank :: self.world].tolist()


def make_loader(dataset, cfg: Config, batch_sampler=None, batch_size: int = 1):
    """Training: batch_sampler (EpochBatches); evaluation: every clip in order."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available()
    )
