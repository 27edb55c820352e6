"""Benchmarks: `timing` (device sync, timed calls, summaries, peak memory) and `report` (machine
description, tables, number formatting, plots, MLflow, compare) under `bench data` (data.py),
`bench model` (model.py) and `bench kernels` (kernels/: the per-op microbenchmarks)."""
