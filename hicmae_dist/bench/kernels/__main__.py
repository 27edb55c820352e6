"""`python -m hicmae_dist.bench.kernels`: every benchmark (the same as `hicmae-dist bench kernels`)."""

from hicmae_dist.bench.kernels.harness import main

raise SystemExit(main())
