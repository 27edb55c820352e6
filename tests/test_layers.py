"""The import layers of pyproject.toml's [tool.importlinter] hold, and the check can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    require("import-linter", LINT_IMPORTS.exists(), "pip install -e '.[dev]'")
    # the tree under `root` first on the path, so its packages are the ones analysed
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layers_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    "low, high",
    [
        ("hicmae_dist/ops/tokens.py", "hicmae_dist.train.step"),
        ("hicmae_dist/config.py", "hicmae_dist.models"),
        ("hicmae_dist/data/loader.py", "hicmae_dist.bench.timing"),
        ("hicmae_dist/models/cavmae/config.py", "hicmae_dist.models.blocks"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, low, high):
    for pkg in ("hicmae_dist", "kernels"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / low
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    import {high}  # noqa: F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and high in out.stdout, out.stdout
