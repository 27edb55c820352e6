"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a (no GPU needed), with the flags of the
extension build, and ptxas reports no register spills in any kernel. The ptxas report
(registers, spills, shared memory, stack per kernel and arch) goes to build/csrc_report.json, a
sibling of the Triton AOT tests' build/kernel_report.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc").glob("*.cu"))
ARCHS = ("sm_80", "sm_90a")
REPORT = ROOT / "build" / "csrc_report.json"


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    for nvcc in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if nvcc and Path(nvcc).exists():
            return nvcc
    return None


def compile_flags() -> list[str]:
    """The extension build's device-side flags (setup.py + torch's BuildExtension)."""
    import torch
    from torch.utils import cpp_extension

    site = Path(torch.__file__).resolve().parent.parent
    includes = cpp_extension.include_paths(device_type="cuda")
    includes += [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]
    includes = [p for p in includes if Path(p).is_dir()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (
        ["-O3", "-std=c++17", "-lineinfo", "-DHICMAE_WITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        + list(cpp_extension.COMMON_NVCC_FLAGS)
        + [f"-I{p}" for p in includes]
    )


# --- ptxas -v parsing -----------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_PROPS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v output -> one record per kernel: registers, spill stores / loads, smem, stack."""
    records: list[dict] = []
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {
                "mangled": m["name"],
                "arch": m["arch"],
                "registers": None,
                "spill_stores": None,
                "spill_loads": None,
                "stack_bytes": None,
                "shared_bytes": 0,
            }
            records.append(current)
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack_bytes=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m["regs"])
            if s := _SMEM.search(line):
                current["shared_bytes"] = int(s["smem"])
    for record, name in zip(records, demangle([r["mangled"] for r in records])):
        record["kernel"] = re.sub(r"hicmae_dist::\(anonymous namespace\)::", "", name)
    return records


def test_parse_ptxas_flags_spills():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
"""
    (record,) = parse_ptxas(text)
    assert record["arch"] == "sm_80" and record["registers"] == 32 and record["shared_bytes"] == 128
    assert (record["spill_stores"], record["spill_loads"], record["stack_bytes"]) == (4, 4, 8)


# --- the compile ----------------------------------------------------------------------------------
def _compile(nvcc: str, flags: list[str], source: Path, arch: str, out_dir: Path) -> dict:
    cmd = [
        nvcc,
        "-cubin",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        *flags,
        "-o",
        str(out_dir / f"{source.stem}.{arch}.cubin"),
        str(source),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return {
        "source": source.name,
        "arch": arch,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "output": proc.stdout + proc.stderr,
        "kernels": parse_ptxas(proc.stdout + proc.stderr),
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], dict]:
    nvcc = find_nvcc()
    require("nvcc", nvcc is not None, "install the CUDA toolkit or set CUDA_HOME")
    flags = compile_flags()
    out_dir = tmp_path_factory.mktemp("cubin")
    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 4)) as pool:
        results = list(pool.map(lambda job: _compile(nvcc, flags, job[0], job[1], out_dir), jobs))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        json.dumps(
            {
                "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "nvcc": version[-1] if version else None,
                "python": sys.version.split()[0],
                "records": [
                    {
                        "source": r["source"],
                        "arch": r["arch"],
                        "compile_seconds": r["seconds"],
                        **{k: v for k, v in kernel.items() if k != "mangled"},
                    }
                    for r in results
                    for kernel in r["kernels"]
                ],
            },
            indent=1,
        )
        + "\n"
    )
    return {(r["source"], r["arch"]): r for r in results}


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ holds no .cu file"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_compiles_without_spills(compiled, source, arch):
    result = compiled[(source, arch)]
    assert result["returncode"] == 0, f"nvcc failed for {source} ({arch}):\n{result['output'][-4000:]}"
    kernels = result["kernels"]
    assert kernels, f"ptxas reported no kernels for {source} ({arch})"
    for k in kernels:
        assert k["arch"] == arch
        assert k["registers"] is not None and k["spill_stores"] is not None, f"unparsed ptxas record {k}"
    spilling = [
        f"{k['kernel']}: {k['spill_stores']} bytes spill stores, {k['spill_loads']} bytes spill loads"
        for k in kernels
        if k["spill_stores"] or k["spill_loads"]
    ]
    assert not spilling, f"{source} ({arch}) spills registers:\n" + "\n".join(spilling)


def test_report_written(compiled):
    report = json.loads(REPORT.read_text())
    archs = {(r["source"], r["arch"]) for r in report["records"]}
    assert archs == {(p.name, a) for p in CU_FILES for a in ARCHS}
