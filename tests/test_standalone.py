"""The repository stands alone: no tracked file names a folder beside the checkout or the machine
it was written on, and a clone in an empty folder passes the model and converter tests.

`pip install .` and `python -m build` in a fresh venv are checked by .ci/install-check (minutes
of installing, so CI runs it after the suite rather than every `make test`).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require

REPO = Path(__file__).resolve().parents[1]
# Folders that hold many checkouts and appear in docs on their own ("/tmp/doctor"): for a checkout
# directly under one of these, the checkout's own path is checked, not its parent's.
SHARED_PARENTS = {"/", "/tmp", "/var/tmp", "/home", "/root", "/srv", "/opt", "/mnt", "/scratch"}


def _require_git_checkout() -> None:
    require("a git checkout (git ls-files, git clone)", shutil.which("git") is not None and (REPO / ".git").exists())


def _tracked_files() -> list[Path]:
    _require_git_checkout()
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_the_folder_beside_or_the_machine_path():
    parent = str(REPO.parent)
    needles = [str(REPO) + "/", os.path.join("..", "shared")]
    if parent not in SHARED_PARENTS:
        needles.append(parent + "/")
    found = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):  # binary, or deleted in the work tree
            continue
        found += [f"{path.relative_to(REPO)}: {needle!r}" for needle in needles if needle in text]
    assert not found, "tracked files name paths outside the repository:\n" + "\n".join(found)


@pytest.mark.slow
def test_a_clone_in_an_empty_folder_passes_the_model_and_converter_tests(tmp_path):
    """HEAD cloned where nothing is beside it; the built extension is the one thing copied in."""
    _require_git_checkout()
    native = sorted((REPO / "hicmae_dist").glob("_C*.so"))
    require("the built native extension hicmae_dist/_C*.so", bool(native), "make setup builds it")
    clone = tmp_path / "empty" / "hicmae-dist"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["hicmae-dist"]
    shutil.copy2(native[0], clone / "hicmae_dist")
    env = {**os.environ, "PYTHONPATH": str(clone), "HICMAE_REQUIRE_ALL": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import hicmae_dist, tests; print(hicmae_dist.__file__, tests.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(clone) for p in where), where
    tests = ["tests/models/test_hicmae.py", "tests/models/test_cavmae.py", "tests/models/test_convert.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1]
