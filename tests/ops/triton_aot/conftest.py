"""Ahead-of-time compile tests of the Triton kernels for sm_90 and sm_80 (no GPU needed). They
run in their own process, without the Triton interpreter (tests/ops/test_triton_subprocess.py
starts it). Without HICMAE_TRITON_AOT=1 this directory collects nothing in a normal run, and
asking for it explicitly is a usage error:
    HICMAE_TRITON_AOT=1 python -m pytest -q tests/ops/triton_aot
"""

import os
from pathlib import Path

import pytest

ENV = "HICMAE_TRITON_AOT"
HERE = Path(__file__).resolve().parent


def _enabled() -> bool:
    return os.environ.get(ENV) == "1" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


if not _enabled():
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    if _enabled():
        return
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            raise pytest.UsageError(
                f"{HERE.name} runs only with {ENV}=1 and without "
                f"TRITON_INTERPRET (tests/ops/test_triton_subprocess.py "
                f"sets them)"
            )
