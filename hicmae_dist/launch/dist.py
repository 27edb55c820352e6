"""One distributed entry point: read torchrun's or Slurm's environment, or make a 1-process
group, and initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on the CPU)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE, else Slurm's SLURM_PROCID/..., else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv(0, 0, 1)


def init_distributed() -> DistEnv:
    """Initialise the default process group once; returns this process's place in it."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not logging.getLogger("hicmae_dist").isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-step INFO lines drown the progress bar
    dist_env = read_env()
    if dist_env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                      WORLD_SIZE=str(dist_env.world_size))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return dist_env
