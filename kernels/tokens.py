"""`python -m kernels.tokens`: token gather and decoder re-assembly: native _C vs PyTorch indexing.

The code: hicmae_dist/bench/kernels/tokens.py."""

from hicmae_dist.bench.kernels.tokens import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.tokens"))
