"""Fixtures for running things against the API emulator (``llama_operator.sandbox.emulator``).

- ``emulator_server``: an emulator served from the test's own event loop (async tests only; never
  call blocking clients from there, they would block the server too).
- ``emulator_thread``: an emulator served from a background thread, for sync tests, the
  ``kubernetes`` client, kubectl and ``kopf.testing.KopfRunner``.
- ``kubeconfig``: a kubeconfig file pointing at ``emulator_thread``.
- ``kube_api``: a ``kubernetes.client.ApiClient`` configured from that kubeconfig.
- ``kubectl``: runs the venv's kubectl with that kubeconfig and a per-test ``--cache-dir``.
"""
from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import kubernetes
import pytest

from llama_operator.sandbox.server import EmulatorThread, RunningEmulator, serve_emulator

from kit.tools import require_tool


@pytest.fixture
async def emulator_server() -> AsyncIterator[RunningEmulator]:
    async with serve_emulator() as running:
        yield running


@pytest.fixture
def emulator_thread() -> Iterator[EmulatorThread]:
    with EmulatorThread() as thread:
        yield thread


@pytest.fixture
def kubeconfig(emulator_thread: EmulatorThread, tmp_path: Path) -> Path:
    return emulator_thread.write_kubeconfig(tmp_path / 'kubeconfig')


@pytest.fixture
def kube_api(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


class Kubectl:
    """The venv's kubectl bound to one kubeconfig and a fresh discovery cache."""

    def __init__(self, binary: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.binary, self.kubeconfig, self.cache_dir = binary, kubeconfig, cache_dir

    def argv(self, *args: str) -> list[str]:
        """The command line, e.g. for ``subprocess.Popen`` (watches, waits)."""
        return [self.binary, f'--kubeconfig={self.kubeconfig}', f'--cache-dir={self.cache_dir}', *args]

    def __call__(self, *args: str, input: str | None = None, timeout: float = 20,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f'kubectl {" ".join(args)} exited with {result.returncode}:\n'
                                 f'{result.stdout}\n{result.stderr}')
        return result


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(require_tool('kubectl'), kubeconfig, tmp_path / 'kube-cache')


# --- The operator against the emulator (test_operator.py, test_kubectl.py) ----------------------------
# Added fixtures, built on the ones above:
# - ``llama_cluster``: a ``kit.cluster.Cluster`` on ``emulator_thread`` with the LlamaDeployment CRD
#   declared (as if applied).
# - ``run_operator``: starts ``kit.operator.OperatorThread`` threads against ``kubeconfig`` (call it with a
#   ``Settings``; call ``.stop()`` to stop one early, e.g. to restart); all are stopped at teardown.
# - ``kubelet``: a started ``sandbox.kubelet.SimulatedKubelet`` that binds pods and reports Deployment status.

from llama_operator.crd import crd_manifest  # noqa: E402
from llama_operator.sandbox.emulator import declare_crd  # noqa: E402
from llama_operator.sandbox.kubelet import SimulatedKubelet  # noqa: E402
from llama_operator.state import Settings  # noqa: E402

from kit.cluster import Cluster  # noqa: E402
from kit.operator import OperatorThread  # noqa: E402


@pytest.fixture
def llama_cluster(emulator_thread: EmulatorThread, kubeconfig: Path) -> Iterator[Cluster]:
    declare_crd(emulator_thread.emulator, crd_manifest())
    cluster = Cluster(kubeconfig)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def run_operator(kubeconfig: Path) -> Iterator:
    started: list[OperatorThread] = []

    def start(settings: Settings, timeout: float = 20) -> OperatorThread:
        op = OperatorThread(kubeconfig, settings=settings, watch_timeout=60)
        started.append(op)
        return op.start(timeout=timeout)

    yield start
    for op in reversed(started):
        op.stop()


@pytest.fixture
def kubelet(kubeconfig: Path) -> Iterator[SimulatedKubelet]:
    k = SimulatedKubelet(str(kubeconfig), interval=0.2).start()
    try:
        yield k
    finally:
        k.stop()
