"""What every benchmark prints: one JSON document that says which benchmark, when and on what machine."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

from llama_operator.units import utc_now


def header(benchmark: str, **machine: Any) -> dict[str, Any]:
    """The first keys of a benchmark's document; `machine` adds facts of the machine the run depends on."""
    return {"benchmark": benchmark, "date": utc_now(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), **machine}}


def emit(document: dict[str, Any]) -> int:
    """Print the document on stdout; the benchmark's exit code."""
    json.dump(document, sys.stdout, indent=2)
    print()
    return 0
