"""The work queue and its workers (llama_operator.workqueue), and the peering rule the workers obey
(llama_operator.peering): what replaces a kopf daemon per LlamaDeployment must keep its guarantees.
A key is never in two passes at once, a wake during a pass gives exactly one more pass, timers replace
each other, a deleted key's timer is gone, and a paused replica runs nothing."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from llama_operator.peering import PeeringGate, blockers
from llama_operator.workqueue import WorkQueue, Workers

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)


class Recorder:
    """A pass that records when it ran, how many were running at once, and can be held open."""

    def __init__(self):
        self.runs: list[str] = []
        self.running: set[str] = set()
        self.overlaps: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}

    async def __call__(self, key: str) -> None:
        if key in self.running:
            self.overlaps.append(key)
        self.running.add(key)
        self.runs.append(key)
        try:
            if key in self.hold:
                await self.hold[key].wait()
            await asyncio.sleep(0)
        finally:
            self.running.discard(key)


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_key_woken_many_times_before_its_pass_runs_once():
    queue: WorkQueue[str] = WorkQueue()
    work = Recorder()
    workers = Workers(queue, work, count=4)
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    workers.start()
    await settle()
    await workers.stop(1)
    assert sorted(work.runs) == ["a", "b"]


async def test_a_wake_during_a_pass_gives_exactly_one_more_pass_after_it():
    queue: WorkQueue[str] = WorkQueue()
    work = Recorder()
    release = asyncio.Event()
    work.hold["a"] = release
    workers = Workers(queue, work, count=4)
    workers.start()
    queue.add("a")
    await settle()
    queue.add("a")
    queue.add("a")
    await settle()
    assert work.runs == ["a"]
    del work.hold["a"]
    release.set()
    await settle()
    await workers.stop(1)
    assert work.runs == ["a", "a"] and not work.overlaps


async def test_timers_replace_each_other_and_forget_cancels():
    queue: WorkQueue[str] = WorkQueue()
    work = Recorder()
    workers = Workers(queue, work, count=2)
    workers.start()
    queue.add_after("a", 10)
    queue.add_after("a", 0.01)  # the pass set a sooner one: the later is gone
    queue.add_after("b", 0.01)
    queue.forget("b")  # deleted
    await asyncio.sleep(0.1)
    assert work.runs == ["a"]
    await asyncio.sleep(0.1)
    await workers.stop(1)
    assert work.runs == ["a"]


async def test_a_failing_pass_does_not_stop_the_worker():
    queue: WorkQueue[str] = WorkQueue()
    seen = []

    async def work(key):
        seen.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    workers = Workers(queue, work, count=1)
    workers.start()
    queue.add("bad")
    queue.add("good")
    await settle()
    await workers.stop(1)
    assert seen == ["bad", "good"]


async def test_stop_waits_for_the_pass_in_progress():
    queue: WorkQueue[str] = WorkQueue()
    finished = []

    async def work(key):
        await asyncio.sleep(0.05)
        finished.append(key)

    workers = Workers(queue, work, count=1)
    workers.start()
    queue.add("a")
    queue.add("b")
    await asyncio.sleep(0.01)
    await workers.stop(2)
    assert finished == ["a"]  # the pass in progress finished; no new one started after the stop


# --- peering ---------------------------------------------------------------------------------------------

def record(priority: int, seen: datetime = NOW, lifetime: int = 60) -> dict:
    return {"priority": priority, "lastseen": seen.isoformat(), "lifetime": lifetime}


def test_a_live_peer_with_a_higher_or_equal_priority_blocks():
    peers = {"me": record(100), "higher": record(200), "equal": record(100), "lower": record(50)}
    assert blockers(peers, "me", 100, NOW) == ["equal", "higher"]


def test_dead_peers_and_our_own_record_do_not_block():
    peers = {"me": record(100), "gone": record(500, seen=NOW - timedelta(seconds=61)),
             "left": record(500, lifetime=0)}  # kopf writes lifetime 0 when it exits
    assert blockers(peers, "me", 100, NOW) == []
    assert blockers({"kopf-style": {"priority": 300, "lastseen": "2026-11-27T11:59:30.123456Z",
                                    "lifetime": 60}}, "me", 100, NOW) == ["kopf-style"]
    assert blockers({"broken": {"priority": "high"}}, "me", 100, NOW) == []


async def test_the_gate_pauses_the_workers_and_wakes_everyone_on_resume():
    status = {"me": record(100)}
    resumed = []

    async def read():
        return [{"status": dict(status)}]

    gate = PeeringGate(read, "me", 100, on_resume=lambda: resumed.append(True), poll_seconds=3600)
    assert not gate.is_open  # closed until the peering object has been read, as kopf starts paused
    await gate.check()
    assert gate.is_open and resumed == [True]

    queue: WorkQueue[str] = WorkQueue()
    work = Recorder()
    workers = Workers(queue, work, count=2, gate=gate.wait)
    workers.start()
    status["other"] = {"priority": 200, "lastseen": datetime.now(timezone.utc).isoformat(), "lifetime": 60}
    await gate.check()
    assert not gate.is_open
    queue.add("a")
    await settle()
    assert work.runs == []  # paused: the queued pass waits
    del status["other"]
    await gate.check()
    await settle()
    assert work.runs == ["a"] and resumed == [True, True]
    await workers.stop(1)


async def test_an_unreadable_peering_object_keeps_the_state():
    calls = []

    async def read():
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("API down")
        return [None]  # no peering object: nobody outranks us

    gate = PeeringGate(read, "me", 100, poll_seconds=3600)
    await gate.check()
    assert gate.is_open
    await gate.check()
    assert gate.is_open
