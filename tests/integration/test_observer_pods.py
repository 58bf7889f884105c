"""PodScraper against real HTTP servers on 127.0.0.1: what the SLO loop sees when it reads the pods' /metrics.

Each fake pod is a thread serving text that changes with every scrape (more requests served), or one way
of failing: too slow, HTTP 500, no /metrics (404), a body over the cap. The scraper's clock is the test's,
so the rates are exact; every collect is bounded in time.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

import pytest

from llama_operator.observe import MEAN_FROM_COUNTERS, P95_FROM_BUCKETS, Target
from llama_operator.observer import Observer, PodEndpoint, PodScraper
from kit.http_stub import Reply, Request, Serve, stub_servers

TIMEOUT_S = 0.5
CHAT = Target("team-a", "chat", "vllm", "vllm-0.34.0", ttft_target_seconds=0.2, tpot_target_seconds=0.05,
              prompt_tokens=1000)
TINY = Target("team-a", "tiny", "llamacpp", "llamacpp-b11434", ttft_target_seconds=2.0, tpot_target_seconds=0.1,
              prompt_tokens=500)
BROKEN = Target("team-b", "broken", "vllm", "vllm-0.34.0", 0.2, 0.05, 1000)


def vllm_metrics(scrape: int) -> str:
    """A vLLM 0.34.0 server that served 5 more requests before each scrape, each with a 0.3 s TTFT (in the
    (0.1, 0.5] bucket), 0.02 s per output token and 20 output tokens."""
    n = 5 * scrape
    labels = 'engine="0",model_name="chat"'
    lines = [f"vllm:num_requests_running{{{labels}}} 2.0", f"vllm:num_requests_waiting{{{labels}}} 1.0",
             "# TYPE vllm:generation_tokens_total counter", f"vllm:generation_tokens_total{{{labels}}} {20.0 * n}"]
    for name, value in (("vllm:time_to_first_token_seconds", 0.3), ("vllm:request_time_per_output_token_seconds", 0.02)):
        lines.append(f"# TYPE {name} histogram")
        for le in (0.01, 0.1, 0.5, 1.0):
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {float(n if value <= le else 0)}')
        lines += [f'{name}_bucket{{{labels},le="+Inf"}} {float(n)}', f"{name}_count{{{labels}}} {float(n)}",
                  f"{name}_sum{{{labels}}} {value * n}"]
    return "\n".join(lines) + "\n"


def llamacpp_metrics(scrape: int) -> str:
    """llama.cpp, as server-task.cpp prints it: 1000 prompt tokens in 0.5 s and 100 tokens predicted in 2 s
    before each scrape."""
    values = {"prompt_tokens_total": 1000 * scrape, "prompt_seconds_total": 0.5 * scrape,
              "tokens_predicted_total": 100 * scrape, "tokens_predicted_seconds_total": 2.0 * scrape,
              "requests_processing": 1, "requests_deferred": 0}
    return "".join(f"# HELP llamacpp:{k} .\n# TYPE llamacpp:{k} counter\nllamacpp:{k} {v}\n" for k, v in values.items())


class FakePod:
    """One pod's HTTP server. `behaviour` is a function of the scrape number returning the body, or one of
    'slow', '500', '404', 'huge'."""

    def __init__(self, serve: Serve, behaviour: Callable[[int], str] | str, in_flight: "InFlight | None" = None):
        self.behaviour = behaviour
        self.in_flight = in_flight
        self.scrapes = 0
        self.accept_headers: list[str] = []
        self.port = serve(self.answer).port

    def answer(self, request: Request) -> Reply | None:
        self.accept_headers.append(request.headers.get("Accept", ""))
        if self.in_flight is not None:
            with self.in_flight:
                time.sleep(0.3)
        if self.behaviour == "slow":
            return None
        if self.behaviour == "404" or request.path != "/metrics":
            return Reply(404)
        if self.behaviour == "500":
            return Reply(500)
        if self.behaviour == "huge":
            return Reply(body=b"x 1\n" * 100_000)
        self.scrapes += 1
        return Reply(body=self.behaviour(self.scrapes))

    def endpoint(self, namespace: str, pod: str, deployment: str, ready: bool = True) -> PodEndpoint:
        return PodEndpoint(namespace, pod, deployment, "127.0.0.1", self.port, ready)


class InFlight:
    """Requests being answered at once, across fake pods, and the most there ever were."""

    def __init__(self):
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __enter__(self):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self._lock:
            self.now -= 1


@pytest.fixture
def fake_pods():
    with stub_servers() as serve:
        yield lambda behaviour, in_flight=None: FakePod(serve, behaviour, in_flight)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def timed_collect(observer: Observer, targets, pods) -> dict:
    started = time.monotonic()
    seen = await observer.collect(targets, pods)
    assert time.monotonic() - started < TIMEOUT_S + 1.5, "a collect outlived the per-pod timeout"
    return seen


async def test_rates_of_two_pods_and_llamacpp_means(fake_pods):
    a, b, c = fake_pods(vllm_metrics), fake_pods(vllm_metrics), fake_pods(llamacpp_metrics)
    pods = {("team-a", "chat"): [a.endpoint("team-a", "chat-a", "chat"), b.endpoint("team-a", "chat-b", "chat")],
            ("team-a", "tiny"): [c.endpoint("team-a", "tiny-0", "tiny")]}
    clock = Clock()
    observer = Observer(PodScraper(timeout_seconds=TIMEOUT_S, clock=clock), window_seconds=30)

    first = await timed_collect(observer, [CHAT, TINY], pods)
    assert "scraped once so far" in first[("team-a", "chat")].problem
    clock.now += 10
    seen = await timed_collect(observer, [CHAT, TINY], pods)

    chat = seen[("team-a", "chat")]
    assert chat.problem is None, chat.problem
    assert (chat.source, chat.statistic, chat.pods, chat.window_seconds) == ("pods", P95_FROM_BUCKETS, 2, 30)
    assert chat.ttft_seconds == pytest.approx(0.1 + 0.4 * 0.95)  # all in (0.1, 0.5]: Prometheus's interpolation
    assert chat.ttft_over_target == pytest.approx(0.75)  # the 0.2 s target is a quarter into that bucket
    assert chat.requests_per_second == pytest.approx(2 * 5 / 10)  # 5 requests a scrape, 10 s apart, two pods
    assert chat.tokens_per_second == pytest.approx(2 * 100 / 10)
    assert (chat.requests_running, chat.requests_waiting) == (4.0, 2.0)
    assert chat.traffic

    tiny = seen[("team-a", "tiny")]
    assert tiny.problem is None, tiny.problem
    assert tiny.statistic == MEAN_FROM_COUNTERS
    assert tiny.ttft_seconds == pytest.approx(0.5 / 1000 * 500)
    assert tiny.tpot_seconds == pytest.approx(2.0 / 100)
    assert tiny.tokens_per_second == pytest.approx(10.0)
    assert a.accept_headers[0] == "text/plain;version=0.0.4"


async def test_pods_that_fail_each_say_why(fake_pods):
    slow, error, missing, huge = fake_pods("slow"), fake_pods("500"), fake_pods("404"), fake_pods("huge")
    pods = {("team-b", "broken"): [slow.endpoint("team-b", "slow-0", "broken"),
                                   error.endpoint("team-b", "error-0", "broken"),
                                   missing.endpoint("team-b", "missing-0", "broken"),
                                   huge.endpoint("team-b", "huge-0", "broken")]}
    observer = Observer(PodScraper(timeout_seconds=TIMEOUT_S, max_body_bytes=100_000), window_seconds=30)

    seen = (await timed_collect(observer, [BROKEN], pods))[("team-b", "broken")]

    assert seen.problem.startswith("no pod of team-b/broken answered on /metrics: ")
    assert f"slow-0 (127.0.0.1:{slow.port}): no answer within 0.5 s" in seen.problem
    assert "error-0" in seen.problem and "HTTP 500" in seen.problem
    assert "missing-0" in seen.problem and "HTTP 404" in seen.problem
    assert "huge-0" in seen.problem and "over the 100000-byte cap" in seen.problem
    assert seen.ttft_seconds is None and not seen.traffic


async def test_the_pods_that_answer_count_and_not_ready_pods_are_not_scraped(fake_pods):
    good, slow, unready = fake_pods(vllm_metrics), fake_pods("slow"), fake_pods("500")
    pods = {("team-a", "chat"): [good.endpoint("team-a", "chat-a", "chat"),
                                 slow.endpoint("team-a", "chat-b", "chat"),
                                 unready.endpoint("team-a", "chat-c", "chat", ready=False)]}
    clock = Clock()
    observer = Observer(PodScraper(timeout_seconds=TIMEOUT_S, clock=clock), window_seconds=30)
    await timed_collect(observer, [CHAT], pods)
    clock.now += 10
    seen = (await timed_collect(observer, [CHAT], pods))[("team-a", "chat")]

    assert seen.problem is None, seen.problem
    assert seen.pods == 1
    assert seen.requests_per_second == pytest.approx(0.5)
    assert unready.accept_headers == []


async def test_a_pod_that_went_away_is_forgotten(fake_pods):
    """A pod gone from the listing and back under the same name (a StatefulSet's, say) starts afresh: no
    rate from its old scrapes over the time it was away."""
    pod = fake_pods(vllm_metrics)
    listed = {("team-a", "chat"): [pod.endpoint("team-a", "chat-0", "chat")]}
    clock = Clock()
    observer = Observer(PodScraper(timeout_seconds=TIMEOUT_S, clock=clock), window_seconds=600)
    await timed_collect(observer, [CHAT], listed)
    clock.now += 10
    assert (await timed_collect(observer, [CHAT], listed))[("team-a", "chat")].problem is None

    gone = (await timed_collect(observer, [CHAT], {}))[("team-a", "chat")]
    assert gone.problem == "no ready pod of team-a/chat to scrape"
    clock.now += 10
    back = (await timed_collect(observer, [CHAT], listed))[("team-a", "chat")]
    assert "scraped once so far" in back.problem


async def test_the_window_spans_from_the_last_scrape_before_its_start(fake_pods):
    """Scraped every 10 s over a 20 s window: the rate is over the last 20 s (scrapes 3 to 5), not from the first."""
    pod = fake_pods(lambda n: vllm_metrics(n * n))  # 5 n^2 requests by scrape n: the rate grows
    listed = {("team-a", "chat"): [pod.endpoint("team-a", "chat-0", "chat")]}
    clock = Clock()
    observer = Observer(PodScraper(timeout_seconds=TIMEOUT_S, clock=clock), window_seconds=20)
    for _ in range(5):
        seen = (await timed_collect(observer, [CHAT], listed))[("team-a", "chat")]
        clock.now += 10
    assert seen.requests_per_second == pytest.approx(5 * (25 - 9) / 20)
    assert math.isclose(seen.window_seconds, 20)


async def test_scrapes_are_bounded_in_concurrency(fake_pods):
    in_flight = InFlight()
    listed = {("team-a", "chat"): [fake_pods(vllm_metrics, in_flight).endpoint("team-a", f"chat-{i}", "chat")
                                   for i in range(6)]}
    observer = Observer(PodScraper(concurrency=2, timeout_seconds=TIMEOUT_S + 1), window_seconds=30)
    started = time.monotonic()
    await observer.collect([CHAT], listed)
    assert in_flight.most == 2
    assert time.monotonic() - started >= 3 * 0.3  # six 0.3 s answers, two at a time


class Failing:
    name = "pods"

    def describe(self) -> str:
        return "a source with a bug"

    async def collect(self, targets, pods, window_seconds):
        raise KeyError("oops")


async def test_a_source_that_raises_costs_the_interval_not_the_loop():
    observer = Observer(Failing(), window_seconds=30)
    seen = await observer.collect([CHAT, TINY], {})
    assert {key: o.problem for key, o in seen.items()} == {
        ("team-a", "chat"): "a source with a bug: KeyError: 'oops'",
        ("team-a", "tiny"): "a source with a bug: KeyError: 'oops'"}
    assert observer.describe() == "SLO observations from a source with a bug over 30s"
