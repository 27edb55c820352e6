"""`python -m kernels.attention`: attention backends on the models' calls and the flash-attention anchor grid (hicmae_dist/bench/kernels/attention.py)."""
from hicmae_dist.bench.kernels.attention import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.attention"))
