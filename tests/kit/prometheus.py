"""A real Prometheus server (Debian's, or scripts/setup.sh's) on 127.0.0.1 for one test.

Started from a config given as a dict, with its data and log under the test's tmp_path; stopped (and
killed if it will not stop) when the test is done. A Prometheus that exits or never gets ready fails the
test with its log, the only place that says why.
"""
from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from kit.http_stub import free_port
from kit.poll import wait_until
from kit.tools import require_tool

READY_WITHIN_S = 30


class RunningPrometheus:
    """The server a test talks to: its `url`, and whether it is still up (with its log when it is not)."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self._proc, self.url, self._log_path = proc, url, log_path

    def log(self) -> str:
        return self._log_path.read_text()

    def assert_running(self) -> None:
        if self._proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")

    def _wait_ready(self) -> None:
        def ready() -> bool:
            self.assert_running()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        try:
            wait_until(ready, READY_WITHIN_S, "prometheus to be ready", interval=0.2)
        except AssertionError as timed_out:
            pytest.fail(f"{timed_out}:\n{self.log()}")


@contextmanager
def running_prometheus(config: dict, tmp_path: Path) -> Iterator[RunningPrometheus]:
    """Run `prometheus` with `config` until the block ends; yields once /-/ready answers.

    A missing binary fails under CI and skips elsewhere (kit.tools)."""
    binary = require_tool("prometheus")
    config_path, log_path = tmp_path / "prometheus.yml", tmp_path / "prometheus.log"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    with open(log_path, "wb") as log:  # the child has its own descriptor
        proc = subprocess.Popen([binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    prometheus = RunningPrometheus(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        prometheus._wait_ready()
        yield prometheus
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
