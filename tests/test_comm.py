"""hicmae_dist.comm: the only caller of collectives, the environment table, the GPU backend."""

import ast
import os
from pathlib import Path

import pytest
import torch

from hicmae_dist import comm

PACKAGE = Path(comm.__file__).parent
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "monitored_barrier",
    "init_process_group",
    "new_group",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _collective_calls(path: Path) -> list[str]:
    """`<torch.distributed alias>.<collective>(...)` calls and `from torch.distributed import <collective>`."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if _dotted(node.func.value) in aliases:
                found.append(f"{path}:{node.lineno} {_dotted(node.func)}")
    return found


def test_comm_is_the_only_caller_of_collectives():
    own = _collective_calls(PACKAGE / "comm.py")
    assert len(own) >= 5, own  # the detector sees comm's own calls: it is not blind
    elsewhere = [
        c
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "comm.py" or p.parent != PACKAGE
        for c in _collective_calls(p)
    ]
    assert not elsewhere, f"collectives outside hicmae_dist/comm.py: {elsewhere}"


def test_the_detector_catches_aliased_calls(tmp_path):
    (tmp_path / "x.py").write_text(
        "import torch.distributed as d\nfrom torch import distributed\n"
        "from torch.distributed import barrier\n"
        "d.all_reduce(t)\ndistributed.broadcast(t, 0)\n"
    )
    assert len(_collective_calls(tmp_path / "x.py")) == 3


# --- the environment ------------------------------------------------------------------------------------

SLURM_2x4 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_RESTART_COUNT": "1",
}

# the second of 2 tasks on one CPU node
SLURM_1x2_TASK1 = {
    "SLURM_JOB_ID": "7",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODELIST": "node1",
    "SLURM_NTASKS_PER_NODE": "2",
}

CASES = [
    # name, environment, visible CUDA devices, expected (rank, local, world, local world, device, addr, port, launcher)
    (
        "torchrun, one node of 4 GPUs",
        {
            "RANK": "2",
            "LOCAL_RANK": "2",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.1.2.3",
            "MASTER_PORT": "29500",
        },
        4,
        (2, 2, 4, 4, "cuda:2", "10.1.2.3", 29500, "torchrun"),
    ),
    (
        "slurm 2 nodes x 4 tasks, one GPU per task (second node, last task)",
        {**SLURM_2x4, "SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "CUDA_VISIBLE_DEVICES": "3"},
        1,
        (7, 3, 8, 4, "cuda:0", "gpu07", comm.rendezvous_port("4242", 1), "slurm"),
    ),
    (
        "slurm 2 nodes x 4 tasks, all 8 GPUs visible per task",
        {
            **SLURM_2x4,
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        },
        8,
        (5, 1, 8, 4, "cuda:1", "gpu07", comm.rendezvous_port("4242", 1), "slurm"),
    ),
    (
        "slurm on CPUs, 2 tasks on one node",
        SLURM_1x2_TASK1,
        0,
        (1, 1, 2, 2, "cpu", "127.0.0.1", comm.rendezvous_port("7", 0), "slurm"),
    ),  # one node: loopback
    (
        "slurm tasks with RANK=0 WORLD_SIZE=1 exported by the submitting shell: Slurm's places",
        {
            **SLURM_1x2_TASK1,
            **{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "29500"},
        },
        0,
        (1, 1, 2, 2, "cpu", "127.0.0.1", comm.rendezvous_port("7", 0), "slurm"),
    ),
    (
        "torchrun started by a Slurm task on each of 2 nodes: torchrun's places",
        {
            **SLURM_2x4,
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": "1",
            "SLURM_TASKS_PER_NODE": "1(x2)",
            "TORCHELASTIC_RUN_ID": "4242",
            **{"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},
            **{"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"},
        },
        8,
        (9, 1, 16, 8, "cuda:1", "gpu07", 29500, "torchrun"),
    ),
    ("CPU only, one process", {}, 0, (0, 0, 1, 1, "cpu", "127.0.0.1", 0, "single")),
    ("one process on a GPU machine", {}, 2, (0, 0, 1, 1, "cuda:0", "127.0.0.1", 0, "single")),
]


@pytest.mark.parametrize("name,env,cuda,expected", CASES, ids=[c[0] for c in CASES])
def test_resolve_env(name, env, cuda, expected):
    e = comm.resolve_env(env, cuda)
    assert (
        e.rank,
        e.local_rank,
        e.world_size,
        e.local_world_size,
        e.device,
        e.master_addr,
        e.master_port,
        e.launcher,
    ) == expected
    assert e.backend == ("cpu:gloo,cuda:nccl" if cuda else "gloo")


def test_slurm_ignores_a_stale_master_port_and_the_port_changes_per_attempt():
    base = {**SLURM_2x4, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_PORT": "12345", "MASTER_ADDR": "x"}
    first = comm.resolve_env({**base, "SLURM_RESTART_COUNT": "0"}, 0)
    second = comm.resolve_env({**base, "SLURM_RESTART_COUNT": "1"}, 0)
    assert first.master_addr == "gpu07" and first.master_port != 12345
    assert first.master_port != second.master_port
    assert all(comm.PORT_BASE <= p < comm.PORT_BASE + comm.PORT_SPAN for p in (first.master_port, second.master_port))


@pytest.mark.parametrize(
    "hostlist,hosts",
    [
        ("gpu[07-08]", ["gpu07", "gpu08"]),
        ("node1", ["node1"]),
        ("a[1-3,7],b02", ["a1", "a2", "a3", "a7", "b02"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("gpu-[098-101]", ["gpu-098", "gpu-099", "gpu-100", "gpu-101"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert comm.expand_hostlist(hostlist) == hosts


def test_a_local_rank_without_its_gpu_is_an_error_naming_the_devices():
    env = {**SLURM_2x4, "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(ValueError, match="local rank 3 but this task sees 2 GPUs.*CUDA_VISIBLE_DEVICES=0,1"):
        comm.resolve_env(env, 2)


def test_on_gpus_the_process_group_carries_cpu_tensors_too(monkeypatch):
    """A plain "nccl" group fails on the first CPU flag: the group must map CPU to gloo."""
    import deepspeed

    made, selected, wrapped = {}, [], {}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append(str(d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: made.update(backend=backend, **kw)
    )
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend=None, **kw: wrapped.update(b=dist_backend))
    env = comm.init_distributed()
    assert env.device == "cuda:3" and selected == ["cuda:3"]
    backends = dict(pair.split(":") for pair in made["backend"].split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}, made["backend"]
    assert made["rank"] == 3 and made["world_size"] == 8 and wrapped["b"] == made["backend"]


def test_agree_without_a_group_reads_the_flags():
    assert comm.agree([torch.tensor(True), False, torch.tensor(float("nan")).isnan()]) == [True, False, True]


LISTENERS = """
import socket
from hicmae_dist import comm
from tests.test_comm import _listeners

probe = socket.socket()  # a loopback listener of our own: the scan below must see it
probe.bind(("127.0.0.1", 0))
probe.listen()
print("probe", format(probe.getsockname()[1], "04X"))

env = comm.init_distributed()
assert comm.agree([True], env.device) == [True]
for address in _listeners():
    print("listening", address)
"""


def _listeners() -> list[str]:
    """The addresses ("0100007F:9C40", hex as /proc/net/tcp writes them) this process listens on."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    return [
        f[1]
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for f in (row.split() for row in open(table).read().splitlines()[1:])
        if f[3] == "0A" and f[9] in mine
    ]


def _slurm_rank(rank: int, world_size: int, port: int, nodes: str, queue) -> None:
    """A Slurm task of a 2-task job on `nodes` ("localhost": one node; "localhost,elsewhere":
    one task per node, both here) reports its listeners after a collective."""
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
    ):
        os.environ.pop(k, None)
    one_node = "," not in nodes
    os.environ.update(
        SLURM_JOB_ID=str(port),
        SLURM_PROCID=str(rank),
        SLURM_NTASKS=str(world_size),
        SLURM_LOCALID=str(rank if one_node else 0),
        SLURM_NODEID=str(0 if one_node else rank),
        SLURM_JOB_NODELIST=nodes,
        SLURM_TASKS_PER_NODE="2" if one_node else "1(x2)",
    )
    env = comm.init_distributed()
    assert comm.agree([rank == 1]) == [True]
    queue.put((rank, env.master_addr, env.master_port, _listeners()))
    comm.barrier()


@pytest.mark.parametrize("nodes", ["localhost", "localhost,elsewhere"], ids=["one-node", "two-nodes"])
def test_a_slurm_job_listens_only_where_its_address_says(nodes):
    """One node: the rendezvous and gloo stay on loopback. Two nodes: rank 0's store listens on the
    address the first node's name resolves to (here localhost: 127.0.0.1), not on every interface."""
    from tests.support import run_ranks

    results = sorted(run_ranks(_slurm_rank, 2, (nodes,), expect=2, timeout_s=120))
    (_, addr, port, listening0), (_, _, _, listening1) = results
    assert addr == ("127.0.0.1" if nodes == "localhost" else "localhost")
    assert f"0100007F:{port:04X}" in listening0, (port, listening0)  # rank 0 serves the store there
    assert not any(a.endswith(f":{port:04X}") for a in listening1)
    any_address = ("00000000:", "00000000000000000000000000000000:")
    for listening in (listening0, listening1):
        assert not any(a.startswith(any_address) for a in listening), listening
        if nodes == "localhost":
            assert all(a.startswith("0100007F:") for a in listening), listening


def test_a_single_process_listens_on_no_interface_beyond_loopback():
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    r = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    listening = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("listening")]
    loopback = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
    (probe,) = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("probe")]
    assert f"0100007F:{probe}" in listening, (probe, listening)
    assert all(addr.startswith(loopback) for addr in listening), listening
