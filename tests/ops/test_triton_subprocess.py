"""Run the Triton test directories, each in its own process with the environment it needs.

tests/ops/triton_interp needs TRITON_INTERPRET=1 before Triton is imported; tests/ops/triton_aot
must run without it (it compiles for sm_90 / sm_80). Triton reads the variable once, at import,
so neither can run inside this process; both directories collect nothing here (see their
conftest.py). A failing run fails here with the child's output; so does a run that collects no
test (pytest exit 5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hicmae_dist.ops import triton as triton_pkg
from tests.support import require

REPO = Path(__file__).resolve().parents[2]
RUNS = {
    "triton_interp": ({"TRITON_INTERPRET": "1"}, ("HICMAE_TRITON_AOT",)),
    "triton_aot": ({"HICMAE_TRITON_AOT": "1"}, ("TRITON_INTERPRET",)),
}


@pytest.mark.slow  # a minute or two each; the AOT run is faster once Triton's cache is warm
@pytest.mark.parametrize("subdir", sorted(RUNS))
def test_triton_directory_in_subprocess(subdir):
    require("triton", triton_pkg.import_error() is None, str(triton_pkg.import_error()))
    set_vars, drop_vars = RUNS[subdir]
    env = {k: v for k, v in os.environ.items() if k not in drop_vars}
    env.update(set_vars)
    env.pop("PYTEST_ADDOPTS", None)  # the child's selection is the whole directory
    target = Path("tests") / "ops" / subdir
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target)]
    start = time.monotonic()
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd)} timed out after {err.timeout}s\n{err.stdout or ''}", pytrace=False)
    took = time.monotonic() - start
    output = (
        f"$ {' '.join(f'{k}={v}' for k, v in set_vars.items())} {' '.join(cmd)}\n"
        f"(exit {run.returncode}, {took:.0f}s)\n{run.stdout}\n{run.stderr}"
    )
    if run.returncode == 5:
        pytest.fail(f"{target} collected no tests\n{output}", pytrace=False)
    if run.returncode != 0:
        pytest.fail(f"{target} failed\n{output}", pytrace=False)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"{target}: {summary} ({took:.0f}s)")
    # everything skipped (a missing component): skip here too locally, fail in CI
    require(f"the tests in {target}", " passed" in summary, summary)
