"""Triton interpreter tests: they need TRITON_INTERPRET=1 set before Triton is imported, so they
run in their own process (tests/ops/test_triton_subprocess.py starts it). Without the variable
this directory collects nothing in a normal run, and asking for it explicitly is a usage error:
    TRITON_INTERPRET=1 python -m pytest -q tests/ops/triton_interp
"""

import os
from pathlib import Path

import pytest

ENV = "TRITON_INTERPRET"
HERE = Path(__file__).resolve().parent

if os.environ.get(ENV) != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    if os.environ.get(ENV) == "1":
        return
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            raise pytest.UsageError(
                f"{HERE.name} runs only with {ENV}=1 in the environment (tests/ops/test_triton_subprocess.py sets it)"
            )
