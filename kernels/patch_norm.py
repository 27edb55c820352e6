"""`python -m kernels.patch_norm`: target normalisation: native _C vs its PyTorch maths.

The code: hicmae_dist/bench/kernels/patch_norm.py."""

from hicmae_dist.bench.kernels.patch_norm import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.patch_norm"))
