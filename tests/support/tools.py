"""Optional system programs some tests need (prometheus, curl, ...).

On a laptop a missing program skips the test with one line naming what to
install; under CI (`CI=true`, which .ci/run and GitHub Actions set) it fails the
test, so a check cannot silently stop running where it matters.
docs/development.md lists the programs and the tests they unlock.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["in_ci", "require_tool"]


def in_ci() -> bool:
    """True under CI: `CI` set to true, 1 or yes (any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tool(name: str, install: str) -> str:
    """The path of program `name`; skips the test without it, or fails it under CI.

    `install` says how to get it, e.g. "apt-get install prometheus (brew install
    prometheus)"; it ends the one-line reason.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"`{name}` not found on PATH: {install}"
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(reason)
