"""Triton kernels of the hot ops.

Importing this package does not import Triton; `available()` says whether the Triton kernels
can run on a given device, and why not when they cannot. The kernels live in `attention.py` and
`info_nce.py` (imported on first use by `hicmae_dist.ops.attention` / `hicmae_dist.ops.info_nce`),
with their tile configs; `launch.py` holds what their launchers share (GPU family, tl.dot
precision, device guard, ahead-of-time compile); `aot.py` the compile reports.

They run on CUDA devices of compute capability 8.0 or newer, and on CPU tensors when Triton's
interpreter is on (TRITON_INTERPRET=1 in the environment before Triton is imported): that is
how the tests run them on a machine without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "interpreting", "import_error"]


@functools.cache
def import_error() -> str | None:
    """None when `import triton` works, else the error as text."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising something else
        return f"{type(err).__name__}: {err}"
    return None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET=1, read once when Triton loads)."""
    if import_error() is not None:
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the Triton kernels can run on tensors of `device`, else (False, why)."""
    device = torch.device(device)
    err = import_error()
    if err is not None:
        return False, f"triton cannot be imported ({err})"
    if device.type == "cpu":
        if interpreting():
            return True, ""
        return False, (
            "triton kernels need CUDA tensors; CPU tensors run only under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    if device.type != "cuda":
        return False, f"triton kernels need CUDA tensors, got device {device}"
    if interpreting():
        return True, ""
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"triton kernels need compute capability 8.0 or newer, device has {major}.{minor}"
    return True, ""
