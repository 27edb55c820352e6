"""`python -m kernels.info_nce`: blockwise vs naive contrastive loss: time and peak memory.

The code: hicmae_dist/bench/kernels/info_nce.py."""

from hicmae_dist.bench.kernels.info_nce import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.info_nce"))
