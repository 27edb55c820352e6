"""Kernel microbenchmarks: one module per op on a shared harness (harness.py), timed and reported
by hicmae_dist.bench (timing, report).

    hicmae-dist bench kernels [--quick] [--out DIR] [--ops OP ...]    every op, or some
    python -m hicmae_dist.bench.kernels                               the same
    python -m hicmae_dist.bench.kernels.attention                     one op (attention, info_nce,
                                                                      tokens, patch_norm, static)
From a checkout, `python -m kernels[.<op>]` runs the same (the repository's kernels/ folder).
See kernels/README.md for how to read the results.
"""
