"""Launching: the distributed environment (torchrun, Slurm or a single process)."""
