"""`python -m kernels.attention`: attention backends, the models' calls and the FA anchor grid.

The code: hicmae_dist/bench/kernels/attention.py."""

from hicmae_dist.bench.kernels.attention import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.attention"))
