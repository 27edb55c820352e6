"""`python -m kernels`: every benchmark (the same as `hicmae-dist bench kernels`)."""
from kernels.harness import main

raise SystemExit(main())
