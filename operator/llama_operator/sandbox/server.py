"""The emulator served on a real TCP port of 127.0.0.1: from the caller's event loop (``serve_emulator``) or
from a thread of its own for sync code (``EmulatorThread``), with a kubeconfig that points at it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import yaml

from .emulator import ClusterEmulator

HOST = '127.0.0.1'


def kubeconfig(url: str) -> dict[str, Any]:
    """A kubeconfig for a plain-http server without authentication, in the ``default`` namespace."""
    name = 'llama-emulator'
    return {
        'apiVersion': 'v1', 'kind': 'Config', 'preferences': {},
        'clusters': [{'name': name, 'cluster': {'server': url}}],
        'users': [{'name': name, 'user': {}}],
        'contexts': [{'name': name, 'context': {'cluster': name, 'user': name, 'namespace': 'default'}}],
        'current-context': name,
    }


@dataclasses.dataclass(frozen=True)
class RunningEmulator:
    """An emulator served on a real TCP port."""
    emulator: ClusterEmulator
    host: str
    port: int

    @property
    def url(self) -> str:
        return f'http://{self.host}:{self.port}'

    def write_kubeconfig(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(yaml.safe_dump(kubeconfig(self.url), sort_keys=False))
        return path


@contextlib.asynccontextmanager
async def serve_emulator(emulator: ClusterEmulator | None = None) -> AsyncIterator[RunningEmulator]:
    """Serve an emulator (a new ``ClusterEmulator`` unless given) on a free port of 127.0.0.1."""
    emulator = ClusterEmulator() if emulator is None else emulator
    emulator._closed = False  # in case it was served and closed before
    runner = aiohttp.web.ServerRunner(aiohttp.web.Server(emulator, access_log=None), shutdown_timeout=1.0)
    with socket.create_server((HOST, 0)) as sock:
        async with emulator:
            await runner.setup()
            try:
                await aiohttp.web.SockSite(runner, sock).start()
                yield RunningEmulator(emulator, HOST, sock.getsockname()[1])
            finally:
                emulator.close_watches()  # else open watches hold the shutdown for its timeout
                await runner.cleanup()


class EmulatorThread:
    """An emulator served from a background thread with its own event loop, for sync code.

    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, emulator_factory: Callable[[], ClusterEmulator] = ClusterEmulator) -> None:
        self._factory = emulator_factory
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: RunningEmulator | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> EmulatorThread:
        if self._thread is not None:
            raise RuntimeError('The emulator thread can be started only once.')
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name='llama-emulator', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f'The emulator did not start in {timeout}s.')
        if self._error is not None:
            raise RuntimeError('The emulator failed to start.') from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just finished
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f'The emulator did not stop in {timeout}s.')

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with serve_emulator(self._factory()) as running:
                self._running = running
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._ready.set()

    @property
    def running(self) -> RunningEmulator:
        if self._running is None:
            raise RuntimeError('The emulator thread is not started.')
        return self._running

    @property
    def emulator(self) -> ClusterEmulator:
        return self.running.emulator

    @property
    def url(self) -> str:
        return self.running.url

    def write_kubeconfig(self, path: str | pathlib.Path) -> pathlib.Path:
        return self.running.write_kubeconfig(path)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
