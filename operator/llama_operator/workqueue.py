"""The queue of LlamaDeployments waiting for a pass, and the workers that run them.

Why not one kopf daemon per object: kopf puts a finalizer on every object a daemon serves (to stop the
daemon before the object goes), which costs a patch and a watch event per object, makes a new object
wait for it, and keeps a LlamaDeployment from being deleted while the operator is down. The operator
needs none of that: Kubernetes' garbage collector removes what a LlamaDeployment owns. So the watch
handlers put keys in this queue, and a few workers take them out.

The queue keeps the guarantees the daemons gave: a key is never in two passes at once, a key woken
while its pass runs gets one more pass afterwards (never lost, never doubled), and each key has one
timer for its next unprompted pass (resync, a waiting upgrade, a retry after an error).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger("llama_operator")

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys waiting for a pass, each at most once, in the order they were first woken."""

    def __init__(self) -> None:
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        #: Woken while their pass was running: queued again when it ends.
        self._again: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def add(self, key: K) -> None:
        """Wake `key`: it gets a pass that starts after this call."""
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Wake `key` in `delay` seconds, replacing the timer it had: each pass sets the next one."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(max(0.0, delay), self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        """`key` is gone: no timer for it. A pass already queued finds nothing to do."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._again.discard(key)

    async def take(self) -> K:
        key = await self._ready.get()
        self._queued.discard(key)
        self._running.add(key)
        return key

    def done(self, key: K) -> None:
        self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


class Workers(Generic[K]):
    """`count` tasks taking keys from `queue` and running `work(key)` on each, once `gate` lets them.

    Several workers let one pass's writes overlap with another's planning; the queue keeps each key in
    one pass at a time. `work` handles its own errors (it knows the backoff); an exception that escapes
    it is logged and the worker goes on."""

    def __init__(self, queue: WorkQueue[K], work: Callable[[K], Awaitable[None]], count: int,
                 gate: Callable[[], Awaitable[None]] | None = None) -> None:
        self.queue = queue
        self._work = work
        self._gate = gate
        self._count = count
        self._tasks: list[asyncio.Task] = []
        self._busy = 0
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(), name=f"llama-operator worker {i}")
                       for i in range(self._count)]

    async def _loop(self) -> None:
        while True:
            key = await self.queue.take()
            try:
                if self._gate is not None:
                    await self._gate()
                if self._stopping:
                    continue
                self._busy += 1
                self._idle.clear()
                try:
                    await self._work(key)
                finally:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad pass must not stop the worker
                log.exception("a pass of %s failed outside its own error handling", key)
            finally:
                self.queue.done(key)

    async def stop(self, timeout: float) -> None:
        """Let the passes in progress finish (for up to `timeout` seconds), then stop the workers.

        A pass cancelled mid-way would leave its write running in a client thread; the next operator
        redoes the pass either way, but finishing it keeps the status and the workload in step."""
        self._stopping = True
        self.queue.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("stopping with %d pass(es) still running after %gs", self._busy, timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
