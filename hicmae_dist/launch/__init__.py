"""Launching: Slurm submission (submitit), the job callable that trains in every task, `jobs` and `cancel`."""
