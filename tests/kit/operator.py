"""The operator in a thread of its own, as `llama-operator run` runs it (runner.run_async) but without
its metrics and health servers, and operator settings for tests."""
from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from llama_operator.state import Settings
from llama_operator.runner import RunOptions, run_async


def fast_settings(**overrides: Any) -> Settings:
    """Operator settings for tests: quick retries, a resync that does not get in the way."""
    base = dict(error_backoff_seconds=0.5, max_error_backoff_seconds=4.0, resync_seconds=60.0,
                upgrade_delay=timedelta(seconds=60))
    base.update(overrides)
    return Settings(**base)


class OperatorThread:
    """The operator (runner.run_async) in a thread of its own with its own event loop.

    `options` are RunOptions' own (peering, namespaces, pods_all_namespaces). Its state is in
    `state_holder` once started; an error it died of in `error` (`alive` says whether it runs)."""

    def __init__(self, kubeconfig: str | Path, *, settings: Settings | None = None, watch_timeout: int = 10,
                 name: str = "operator", **options: Any) -> None:
        self.options = RunOptions(kubeconfig=str(kubeconfig), metrics_port=None, health_port=None,
                                  settings=settings or fast_settings(), watch_timeout=watch_timeout, **options)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.state_holder: list = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(run_async(self.options, stop_flag=self._stop, ready_flag=self._ready,
                                  state_holder=self.state_holder))
        except BaseException as e:  # noqa: BLE001 - reported by alive()/stop()
            self.error = e

    def start(self, timeout: float = 20) -> "OperatorThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not become ready: {self.error!r}")
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the operator thread did not stop")
