"""Kernel microbenchmarks: one module per op on a shared harness (kernels/harness.py), timed and
reported by hicmae_dist.bench (timing, report).

    python -m kernels [--quick] [--out DIR]        every op (also `hicmae-dist bench kernels`)
    python -m kernels.attention                    attention backends: model shapes, anchor grid
    python -m kernels.info_nce                     blockwise vs naive contrastive loss: memory
    python -m kernels.tokens                       token gather and decoder re-assembly
    python -m kernels.patch_norm                   target normalisation
    python -m kernels.static                       sm_90 compile report and H100 roofline
See kernels/README.md for how to read the results.
"""
