"""Whether this replica may act, by kopf's peering rule, for the operator's own work queue.

With peering on, kopf pauses a replica while another live replica in the peering object has a higher
priority (or the same one: then all of them pause). It stops its watch streams and its daemons then, but
it does not tell handlers. The work queue's timers (resync, a waiting upgrade, a retry) would go on
firing in a paused replica, acting on a view of the cluster nobody updates any more. So the workers wait
at this gate, which reads the same peering objects and applies the same rule.

The rule (kopf's peering protocol: the peering object's `status` maps each replica's identity to its
`priority`, `lastseen` and `lifetime` in seconds; a replica not seen for its lifetime is dead).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

log = logging.getLogger("llama_operator")

#: How often the gate re-reads the peering objects: the longest a replica kopf has paused may still
#: finish passes from its queue.
POLL_SECONDS = 2.0
#: kopf's default when a peer does not say.
DEFAULT_LIFETIME_SECONDS = 60


def own_identity() -> str:
    """This replica's identity in the peering object (handed to kopf too, so both use the same one):
    the pod's name when the chart sets $POD_ID, else host, process and a random part (several operators
    in one process, as in tests, differ)."""
    pod = os.environ.get("POD_ID")
    return pod or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


def own_priority(configured: int | None) -> int:
    """Replicas of one Deployment start with the same arguments, and kopf pauses all peers of equal
    priority; so unless configured, each takes its priority from its own pod identity."""
    if configured is not None:
        return configured
    pod_id = os.environ.get("POD_ID") or os.environ.get("HOSTNAME", "")
    return int(hashlib.sha256(pod_id.encode()).hexdigest()[:6], 16)


def blockers(peers: Mapping[str, Any], identity: str, priority: int, now: datetime) -> list[str]:
    """The live peers that make kopf pause the replica `identity` of `priority`: any with a higher or the
    same priority. `peers`: the peering object's status."""
    found = []
    for peer, info in (peers or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            lifetime = int(info.get("lifetime", DEFAULT_LIFETIME_SECONDS))
            seen = info.get("lastseen")
            lastseen = datetime.fromisoformat(seen.replace("Z", "+00:00")) if seen else now
            if lastseen.tzinfo is None:
                lastseen = lastseen.replace(tzinfo=timezone.utc)
            peer_priority = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue  # kopf cannot read such a record either
        if lastseen + timedelta(seconds=lifetime) > now and peer_priority >= priority:
            found.append(peer)
    return sorted(found)


class PeeringGate:
    """Open while no live peer outranks this replica in any of its peering objects.

    `read` returns the peering objects' bodies (None for one that does not exist) and raises when they
    cannot be read; the gate keeps its state through read errors, and starts closed, as kopf does."""

    def __init__(self, read: Callable[[], Awaitable[Iterable[Mapping[str, Any] | None]]], identity: str,
                 priority: int, on_resume: Callable[[], None] = lambda: None,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.identity = identity
        self.priority = priority
        self._read = read
        self._on_resume = on_resume
        self._poll = poll_seconds
        self._open = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        await self._open.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llama-operator peering gate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> None:
        """Read the peering objects once and open or close the gate."""
        try:
            bodies = list(await self._read())
        except Exception as e:  # noqa: BLE001 - an unreadable peering object keeps the last state
            log.warning("cannot read the peering object (%s); %s", e,
                        "still acting" if self.is_open else "staying paused")
            return
        now = datetime.now(timezone.utc)
        found = sorted({peer for body in bodies if body
                        for peer in blockers(body.get("status") or {}, self.identity, self.priority, now)})
        if found and self.is_open:
            log.info("pausing: peers %s are alive with a priority at least %d", found, self.priority)
            self._open.clear()
        elif not found and not self.is_open:
            log.info("acting: no live peer outranks this replica (priority %d)", self.priority)
            self._open.set()
            self._on_resume()

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._poll)
