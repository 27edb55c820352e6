"""What every Triton launcher of hicmae_dist shares: the GPU family and tl.dot precision that
pick a tile config, the device guard, the readiness check, and compiling ahead of time.

The kernels and their tile configs live beside each op (attention.py, info_nce.py); this module
holds no kernel, so importing it costs only `import triton`.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from hicmae_dist.ops.triton import available, interpreting

GRID_LIMIT = 65535  # CUDA grid y / z limit
ARCH_CAPABILITY = {"sm90": 90, "sm80": 80, "sm86": 86}  # the capability each family compiles for
TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's float32 matmul precision setting
    ("highest", torch's default, -> "ieee"; "high" / "medium" -> "tf32")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def input_group(dtype: torch.dtype) -> str:
    """The tile-config group of an input dtype: "16" (fp16 / bf16), "tf32" or "ieee" (fp32)."""
    if dtype != torch.float32:
        return "16"
    return dot_precision(dtype)


def arch_family(device: torch.device) -> str:
    """The tile-config family of a CUDA device; "sm80" under the interpreter (CPU tensors)."""
    if device.type == "cuda" and torch.cuda.is_available() and not interpreting():
        major, minor = torch.cuda.get_device_capability(device)
        if major in (9, 10):  # H100 / H200, B200: 227 KB of shared memory a block
            return "sm90"
        if major == 8 and minor in (0, 7):  # A100, Orin: 163 KB
            return "sm80"
        return "sm86"  # 8.6 / 8.9 (RTX 30xx / 40xx), 12.x (RTX 50xx), unknown: 99 KB
    return "sm80"


def check_ready(op: str, t: torch.Tensor) -> None:
    """RuntimeError naming the op when the Triton kernels cannot run on `t`'s device."""
    ok, why = available(t.device)
    if not ok:
        raise RuntimeError(f"ops.{op} backend 'triton' cannot run: {why}")


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension is contiguous (the kernels take the other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def compile_ahead(
    kernel, signature: dict[str, str], constexprs: dict, attrs: dict, capability: int, num_warps: int, num_stages: int
):
    """Compile one kernel for a CUDA compute capability (80, 90, ...) without a GPU. Returns
    Triton's compiled kernel (asm["ptx"], asm["cubin"], metadata.shared, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
