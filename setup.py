"""Builds the native extension hicmae_dist._C from csrc/ (torch cpp_extension + ninja).

The CPU kernels (csrc/*.cpp) are always built. CUDA sources (csrc/*.cu) join them as a
CUDAExtension when nvcc and a CUDA build of torch are present; the build says which it made.
Install with `pip install --no-build-isolation -e .` (the build imports the installed torch).
"""
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
cxx_flags = ["-O3", "-std=c++17"]

if cuda_sources and cpp_extension.CUDA_HOME is not None:
    ext = cpp_extension.CUDAExtension(
        "hicmae_dist._C", cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xptxas", "-v"]})
    built = f"CPU + CUDA kernels ({len(cuda_sources)} .cu files, CUDA_HOME={cpp_extension.CUDA_HOME})"
else:
    ext = cpp_extension.CppExtension("hicmae_dist._C", cpu_sources, extra_compile_args=cxx_flags)
    built = "CPU kernels only" + (" (no CUDA toolkit found)" if cuda_sources else "")
print(f"hicmae_dist._C: building {built}")

setup(ext_modules=[ext], cmdclass={"build_ext": cpp_extension.BuildExtension})
