"""Builds the native extension hicmae_dist._C from csrc/ (torch cpp_extension + ninja).

The CPU kernels (csrc/*.cpp) are always built. The CUDA kernels (csrc/*.cu) join them as a
CUDAExtension when nvcc and a CUDA build of torch are present, for sm_80 and sm_90a (or for
TORCH_CUDA_ARCH_LIST when it is set); HICMAE_NO_CUDA=1 builds the CPU kernels only. The build
says which it made (`pip install -v` shows it; `hicmae-dist --version` afterwards).
`pip install --no-build-isolation [-e] .` builds against the torch already installed; a plain
`pip install .` or `python -m build` builds against the torch==2.13.0 pip puts in its isolated
build environment (pyproject.toml's build-system requires), which may be another build of it.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup


def _nvcc_home() -> str | None:
    """The CUDA toolkit root holding bin/nvcc: $CUDA_HOME / $CUDA_PATH when they hold nvcc, else
    nvcc on PATH with symlinks and wrapper scripts resolved, else /usr/local/cuda. torch's own
    guess takes dirname(dirname(which nvcc)), which is wrong for a /usr/local/bin/nvcc wrapper."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:  # a shell wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            for word in real.read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(Path(word).resolve().parent.parent)
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


_want_cuda = os.environ.get("HICMAE_NO_CUDA", "0") != "1"
_cuda_home = _nvcc_home() if _want_cuda else None
if _cuda_home is not None:
    os.environ["CUDA_HOME"] = _cuda_home  # read by cpp_extension at import

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if _cuda_home is not None:
    cpp_extension.CUDA_HOME = _cuda_home

ROOT = Path(__file__).parent
cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
cxx_flags = ["-O3", "-std=c++17"]
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


def _extra_include_dirs() -> list[str]:
    """The CUDA wheels' headers (nvidia/cu13/include: cuBLAS, cuSPARSE, ...) that torch's CUDA
    headers include, when the toolkit does not carry them."""
    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


reason = None
if not cuda_sources:
    reason = "no csrc/*.cu"
elif not _want_cuda:
    reason = "HICMAE_NO_CUDA=1"
elif torch.version.cuda is None:
    reason = "torch is a CPU-only build"
elif _cuda_home is None:
    reason = "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda)"

if reason is None:
    arch = (
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        if os.environ.get("TORCH_CUDA_ARCH_LIST")
        else "sm_80, sm_90a"
    )
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += ARCH_FLAGS  # explicit -gencode: torch then adds no arch flags of its own
    ext = cpp_extension.CUDAExtension(
        "hicmae_dist._C",
        cpu_sources + cuda_sources,
        include_dirs=_extra_include_dirs(),
        define_macros=[("HICMAE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    built = (
        f"CPU + CUDA kernels ({', '.join(cpu_sources + cuda_sources)}; {arch}; "
        f"nvcc from CUDA_HOME={_cuda_home}; torch CUDA {torch.version.cuda})"
    )
else:
    ext = cpp_extension.CppExtension("hicmae_dist._C", cpu_sources, extra_compile_args=cxx_flags)
    built = f"CPU kernels only ({', '.join(cpu_sources)}; CUDA kernels skipped: {reason})"
print(f"hicmae_dist._C: building {built}", file=sys.stderr, flush=True)

setup(ext_modules=[ext], cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})
