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

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SEARCH_DIRS = [PROJECT_ROOT / ".tools" / "bin", Path(sys.executable).parent]


def require_tool(name: str) -> str:
    """Return the absolute path of tool `name`, or fail (CI) / skip (elsewhere) when it is missing."""
    for directory in _SEARCH_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name!r} is not installed: run scripts/setup.sh test (or `make test`) to install it"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)
