"""Bounded waits: a test polls for what it expects, with a deadline, and never waits blindly or forever."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10, what: str = "the condition", interval: float = 0.1,
               *, retry_errors: bool = False) -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds.

    With `retry_errors`, a predicate that raises counts as "not yet" (a read while API faults are injected
    may fail); the last error is named if time runs out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except Exception as e:  # noqa: BLE001 - only with retry_errors: a read during a fault; try again
            if not retry_errors:
                raise
            last_error, result = e, None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" +
                                 (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def holds_for(predicate: Callable[[], Any], seconds: float, what: str, interval: float = 0.1) -> None:
    """Check that `predicate` stays true over a bounded window (for 'nothing more happens' assertions)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"no longer true: {what}"
        time.sleep(interval)
