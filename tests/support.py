"""Test helpers shared across the suite."""
from __future__ import annotations

import os

import pytest


def strict() -> bool:
    """In CI (CI=true) or with HICMAE_REQUIRE_ALL=1 a missing component fails instead of skipping."""
    return os.environ.get("HICMAE_REQUIRE_ALL") == "1" or os.environ.get("CI", "").lower() == "true"


def require(component: str, available: bool, hint: str = "") -> None:
    """Skip the test when `component` is missing on a user's machine; fail in CI."""
    if available:
        return
    message = f"{component} is not available" + (f" ({hint})" if hint else "")
    if strict():
        pytest.fail(f"{message}; CI requires it", pytrace=False)
    pytest.skip(message)
