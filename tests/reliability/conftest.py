"""Fixtures of the reliability suite (see reliability_harness.py for the machinery).

* ``cluster``: a fresh FaultyCluster (emulator with fault injection on two ports, CRDs, the L4 pool's
  nodes, a simulated kubelet), no operator yet; closed after the test.
* ``operator_logs``: every log record of the process while the test runs (llama_operator, kopf, ...).
* ``results``: records a row of docs/reliability.md (``results.add(table, key, **cells)``).

At the end of a session that ran every case the doc lists, docs/reliability.md is rendered again from
what the tests recorded (reliability_doc.py); the rows are also kept in .pytest_cache for
``python tests/reliability/reliability_doc.py``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import reliability_doc
from reliability_harness import FaultyCluster

_ROWS_KEY = pytest.StashKey[dict]()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            # Real sockets, threads and wall-clock time: the operator runs in its own thread or process.
            item.add_marker(pytest.mark.looptime(False))


def pytest_configure(config):
    config.stash[_ROWS_KEY] = {}


class Results:
    def __init__(self, rows: dict) -> None:
        self.rows = rows

    def add(self, table: str, key: str, **cells: str) -> None:
        self.rows[(table, key)] = {"table": table, "key": key, **cells}


@pytest.fixture
def results(request) -> Results:
    return Results(request.config.stash[_ROWS_KEY])


@pytest.fixture(scope="module")
def module_results(request) -> Results:
    return Results(request.config.stash[_ROWS_KEY])


@pytest.fixture
def cluster(tmp_path) -> Iterator[FaultyCluster]:
    c = FaultyCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        out = []
        for r in self.records:
            try:
                out.append(f"{r.name} {r.levelname} {r.getMessage()}")
            except Exception:  # noqa: BLE001 - a record whose arguments do not format
                out.append(f"{r.name} {r.levelname} {r.msg!r} {r.args!r}")
        return "\n".join(out)


@pytest.fixture
def operator_logs() -> Iterator[_Collect]:
    """All log records, at DEBUG, from every logger, while the test runs."""
    handler = _Collect()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def pytest_sessionfinish(session, exitstatus):
    rows = session.config.stash.get(_ROWS_KEY, {})
    if not rows:
        return
    ordered = sorted(rows.values(), key=lambda r: (r["table"], r["key"]))
    cache_dir = Path(session.config.rootpath) / ".pytest_cache"
    cache_dir.mkdir(exist_ok=True)
    (cache_dir / "reliability-results.json").write_text(json.dumps(ordered, indent=1))
    if reliability_doc.complete(ordered):
        reliability_doc.write(ordered)
