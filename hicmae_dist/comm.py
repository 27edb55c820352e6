"""Process groups and every collective hicmae-dist makes; no other module calls
`torch.distributed` collectives (tests/test_comm.py reads the sources to hold that).

Backends: on GPUs the default group is created as "cpu:gloo,cuda:nccl" (as torchtitan does),
so a collective over a CPU tensor goes through gloo and one over a CUDA tensor through NCCL; a
plain "nccl" group has no CPU backend and fails on the first CPU flag. The decisions below still
put their flags on the training device: one small NCCL all-reduce instead of a device->host copy
followed by a gloo round trip.

Decisions every rank must share (skip a step, stop, requeue) go through `agree`: one all-reduce
(MAX) of a few flags, read back to the host once. A caller makes that call before entering any
collective that a disagreeing rank would skip.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Rendezvous ports derived from a Slurm job id: 20000-31999, below Linux's ephemeral range
# (32768-60999) where an outgoing connection on the node may hold the port when the store binds.
PORT_BASE, PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from `resolve_env`."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str  # "cpu" or "cuda:<index among the visible devices>"
    master_addr: str
    master_port: int  # 0 for a single process: it needs no rendezvous
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def backend(self) -> str:
        return "cpu:gloo,cuda:nccl" if self.device.startswith("cuda") else "gloo"


# --- the environment, as a pure function ---------------------------------------------------------


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") in order, as `scontrol show hostnames`."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        parts = re.split(r"\[([^\]]*)\]", item)  # prefix, ranges, infix, ranges, ..., suffix
        names = [parts[0]]
        for i in range(1, len(parts), 2):
            expanded = []
            for r in parts[i].split(","):
                lo, _, hi = r.partition("-")
                width = len(lo)
                expanded += [str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
            names = [n + e + parts[i + 1] for n in names for e in expanded]
        hosts += names
    return hosts


def rendezvous_port(job_id: str, restart: int = 0) -> int:
    """A port per (job, attempt): every task computes the same one, and a requeued attempt does
    not meet the previous attempt's socket in TIME_WAIT."""
    return PORT_BASE + zlib.crc32(f"{job_id}:{restart}".encode()) % PORT_SPAN


def _tasks_on_node(env: Mapping[str, str], ntasks: int) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of
    SLURM_TASKS_PER_NODE ("4(x2),3"), else an even split."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    per_node: list[int] = []
    for entry in filter(None, env.get("SLURM_TASKS_PER_NODE", "").split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry)
        if m:
            per_node += [int(m[1])] * int(m[2] or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    if node < len(per_node):
        return per_node[node]
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return max(1, ntasks // max(1, nodes))


def _device(local_rank: int, cuda_count: int, env: Mapping[str, str]) -> str:
    """cuda:0 when the task sees one GPU (Slurm --gpus-per-task=1: CUDA_VISIBLE_DEVICES names
    it), cuda:<local rank> when it sees the node's GPUs, cpu without any."""
    if cuda_count == 0:
        return "cpu"
    if cuda_count == 1:
        return "cuda:0"
    if local_rank < cuda_count:
        return f"cuda:{local_rank}"
    raise ValueError(
        f"local rank {local_rank} but this task sees {cuda_count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
        f"give each task one GPU or all of the node's"
    )


def resolve_env(env: Mapping[str, str], cuda_count: int) -> DistEnv:
    """rank, local rank, world size, device and rendezvous address from torchrun's variables,
    else Slurm's (SLURM_PROCID/LOCALID/NTASKS/JOB_NODELIST/JOB_ID), else one process.

    torchrun's MASTER_ADDR / MASTER_PORT are used as they are. Under Slurm the rendezvous host is
    the first node of the job's node list (127.0.0.1 when all tasks share one node) and the port
    comes from the job id and SLURM_RESTART_COUNT (rendezvous_port); a MASTER_* exported from the
    submitting shell is ignored there (a stale port would defeat the per-attempt port), and so are
    RANK / WORLD_SIZE unless torchrun set them (TORCHELASTIC_RUN_ID: torchrun started inside the
    allocation): sbatch exports the submitting shell's environment, and a RANK=0 left there by a
    debugging session made every task rank 0 of a job of one."""
    slurm_task = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    torchrun = "RANK" in env and "WORLD_SIZE" in env and ("TORCHELASTIC_RUN_ID" in env or not slurm_task)
    if slurm_task and not torchrun and "RANK" in env:
        log.warning(
            "ignoring RANK=%s WORLD_SIZE=%s (not set by torchrun; exported by the submitting shell?): "
            "Slurm says rank %s of %s",
            env["RANK"],
            env.get("WORLD_SIZE", "<unset>"),
            env["SLURM_PROCID"],
            env["SLURM_NTASKS"],
        )
    if torchrun:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        addr, port, launcher = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)), "torchrun"
    elif slurm_task:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        local_world = _tasks_on_node(env, world)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        # one node: the rendezvous stays on loopback; several: the first node's name
        addr = expand_hostlist(nodelist)[0] if nodelist and local_world < world else "127.0.0.1"
        port = rendezvous_port(env.get("SLURM_JOB_ID", "0"), int(env.get("SLURM_RESTART_COUNT") or 0))
        launcher = "slurm"
    else:
        rank, world, local, local_world = 0, 1, 0, 1
        addr, port, launcher = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)), "single"
    if not (0 <= rank < world and 0 <= local < max(local_world, 1)):
        raise ValueError(
            f"{launcher} environment: rank {rank} / world size {world}, local rank {local} / "
            f"{local_world} on the node: not a valid place in a job"
        )
    if world > 1 and not 0 < port < 65536:
        raise ValueError(
            f"{launcher} environment: {world} ranks need a rendezvous port; MASTER_PORT is "
            f"{env.get('MASTER_PORT', '<unset>')}"
        )
    return DistEnv(rank, local, world, local_world, _device(local, cuda_count, env), addr, port, launcher)


# --- the process group ---------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the address `host` names (not on every interface, as a TCPStore
    that binds its own would be)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(
            err.errno,
            f"rank 0 cannot listen on {address[0]}:{port} (the rendezvous address {host}; "
            f"is rank 0 on that node?): {err.strerror}",
        ) from err
    sock.listen(1024)
    return sock


def _rendezvous_store(env: DistEnv) -> dist.Store:
    """The TCPStore of a Slurm job: rank 0 serves it on the address master_addr names."""
    timeout = timedelta(seconds=int(os.environ.get("HICMAE_RENDEZVOUS_TIMEOUT_S", 900)))
    if env.rank != 0:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout=timeout)
    sock = _listen(env.master_addr, env.master_port)
    log.info(
        "rendezvous: rank 0 listens on %s:%d (%s) for %d ranks",
        sock.getsockname()[0],
        env.master_port,
        env.master_addr,
        env.world_size,
    )
    return dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, True, timeout=timeout, master_listen_fd=sock.detach()
    )


def init_distributed() -> DistEnv:
    """Create the default process group once (then hand it to DeepSpeed) and select this
    process's GPU; returns its place in the job.

    Nothing listens beyond loopback unless the job spans nodes: one process uses an in-process
    store; a one-node job keeps gloo's and NCCL's sockets on `lo` (unless GLOO_SOCKET_IFNAME /
    NCCL_SOCKET_IFNAME say otherwise) and, under Slurm, its store on 127.0.0.1; a multi-node
    Slurm job's store listens on the address of the first node only. Under torchrun its agent
    serves the store."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not logging.getLogger("hicmae_dist").isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-step INFO lines drown the progress bar
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = resolve_env(os.environ, cuda)
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
    )
    if env.local_world_size >= env.world_size:  # one node: its ranks talk over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if env.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(env.device))
    if not dist.is_initialized():
        if env.world_size == 1:  # an in-process store: no rendezvous socket at all
            dist.init_process_group(env.backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ["MASTER_PORT"] = str(env.master_port)
            store = _rendezvous_store(env) if env.launcher == "slurm" else None  # None: env://
            dist.init_process_group(env.backend, store=store, rank=env.rank, world_size=env.world_size)
            log.info(
                "process group: rank %d/%d (local %d/%d) on %s, %s, rendezvous %s:%d (%s)",
                env.rank,
                env.world_size,
                env.local_rank,
                env.local_world_size,
                env.device,
                env.backend,
                env.master_addr,
                env.master_port,
                env.launcher,
            )
    deepspeed.init_distributed(dist_backend=env.backend, verbose=False)  # wraps the group made above
    return env


def current_device() -> torch.device:
    """The device init_distributed selected (where decision flags go), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def world(group=None) -> tuple[int, int]:
    """(rank, world size) of `group`; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_rank0() -> bool:
    return world()[0] == 0


def multi_rank() -> bool:
    return world()[1] > 1


# --- decisions and small values ----------------------------------------------------------------------


def agree(flags: Sequence[torch.Tensor | bool | float], device: torch.device | str = "cpu") -> list[bool]:
    """Each flag true on any rank -> true on every rank. Flags may be device tensors (a
    non-finite check) or host values (a signal); one all-reduce and one host read (a sync)."""
    t = torch.stack(
        [
            f.detach().reshape(()).to(device, torch.float32)
            if torch.is_tensor(f)
            else torch.tensor(float(f), device=device)
            for f in flags
        ]
    )
    if multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def broadcast_values(values: Sequence[float], src: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Rank `src`'s numbers on every rank (float64: exact for ints below 2**53)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if multi_rank():
        dist.broadcast(t, src)
    return t.tolist()


def max_values(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """The largest of each number over the ranks (float64), on every rank; the smallest of a
    number is -max_values([-x])."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; returns t."""
    if multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if multi_rank():
        dist.barrier()


# --- the contrastive gather ------------------------------------------------------------------------


def _gather_sizes(n: int, device: torch.device, group) -> list[int]:
    _, ws = world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], rank: int):
        longest = max(sizes)
        x_c = x.contiguous()
        if x.shape[0] < longest:
            x_c = torch.cat([x_c, x_c.new_zeros(longest - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(x_c) for _ in sizes]
        dist.all_gather(parts, x_c, group=group)
        ctx.group, ctx.start = group, sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Every rank's (B_r, ...) rows concatenated in rank order, (sum_r B_r, ...), and the offset
    of this rank's rows in it; differentiable. The backward sums the gathered gradient over the
    ranks and hands each rank its own rows: rank r's x receives sum_s dL_s/dx_r, the gradient of
    the sum of the ranks' losses. Ranks may hold different row counts (padded for the
    collective); every rank must call it, and run its backward, equally often. Without a
    process group (or with one rank) returns (x, 0). The row counts are exchanged first
    (a host sync: the sizes decide the padding)."""
    rank, ws = world(group)
    if ws == 1:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x, group, sizes, rank), sum(sizes[:rank])
