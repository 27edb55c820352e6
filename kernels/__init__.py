"""The kernel microbenchmarks' entry points in a checkout: `python -m kernels[.<op>]`.

The benchmark code lives in hicmae_dist/bench/kernels (installed with the package, used by
`hicmae-dist bench kernels` and `doctor`); this folder is not installed, so the name `kernels`
stays free for other packages. See kernels/README.md.
"""
