"""`python -m kernels.static`: sm_90 compile report and H100 roofline (no GPU needed).

The code: hicmae_dist/bench/kernels/static.py."""

from hicmae_dist.bench.kernels.static import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kernels.static"))
