"""Finding the external tools the tests drive (promtool, prometheus, helm, kubectl).

`scripts/setup.sh` installs them. Under CI (``CI=true``) a missing tool is a failure, never a skip:
a green run must not hide a missing install step. On a developer's machine a missing tool skips
the test with the command that installs it.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from kit.paths import ROOT

_SEARCH_DIRS = [ROOT / ".tools" / "bin", Path(sys.executable).parent]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(message: str) -> NoReturn:
    """Something a test needs is not installed or built: a failure under CI, a skip elsewhere."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the absolute path of tool `name`, or fail (CI) / skip (elsewhere) when it is missing."""
    for directory in _SEARCH_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    missing(f"{name!r} is not installed: run scripts/setup.sh test (or `make test`) to install it")
