"""The SLO loop's pod scrape on a real llama-server (the pinned release, run as the operator renders it).

PodScraper reads the server's /metrics before and after two small completions; observation() must find
every series the engine catalog names for the release and turn them into a mean time to first token and
per output token (MEAN_FROM_COUNTERS), with traffic. A renamed or missing series fails here first.
"""
from __future__ import annotations

import asyncio

import pytest

from llama_operator.observe import MEAN_FROM_COUNTERS, Target
from llama_operator.observer import Observer, PodEndpoint, PodScraper

from llama_server import HOST
from rendered_cases import ALIAS, OWNER, render_kind

PROMPT_TOKENS = 200


def complete(server, content: str) -> dict:
    """One chat completion; its `timings` (llama-server's own per-request prompt and predict times)."""
    resp = server.post("/v1/chat/completions", {
        "model": ALIAS, "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": 8,
        "ignore_eos": True,  # random weights may pick end-of-text first; the test needs tokens predicted
    })
    assert resp.status == 200, resp.body[:2000]
    return resp.json()["timings"]


async def test_two_completions_give_means_from_the_counters(servers):
    rendered = render_kind("auto")
    server = servers.get("auto")
    slo = rendered.spec.slo
    target = Target(OWNER.namespace, OWNER.name, "llamacpp", rendered.plan.engine, slo.ttft_seconds, slo.tpot_seconds,
                    prompt_tokens=PROMPT_TOKENS)
    pods = {(OWNER.namespace, OWNER.name): [PodEndpoint(OWNER.namespace, "tiny-0", OWNER.name, HOST, server.port,
                                                        ready=True)]}
    observer = Observer(PodScraper(timeout_seconds=10), window_seconds=300)

    before = (await observer.collect([target], pods))[(OWNER.namespace, OWNER.name)]
    assert "scraped once so far" in before.problem
    timings = [await asyncio.to_thread(complete, server, content) for content in ("Say hello.", "Name three colours.")]
    seen = (await observer.collect([target], pods))[(OWNER.namespace, OWNER.name)]

    assert seen.problem is None, seen.problem
    assert seen.statistic == MEAN_FROM_COUNTERS
    assert seen.ttft_seconds is not None and seen.ttft_seconds > 0
    assert seen.tpot_seconds is not None and seen.tpot_seconds > 0
    assert seen.tokens_per_second > 0
    assert seen.traffic
    assert seen.pods == 1
    assert seen.requests_running == 0 and seen.requests_waiting == 0  # both answered before the second scrape
    assert seen.ttft_over_target is None and seen.requests_per_second is None

    # The counters' means agree with the server's own timings of the two requests (served one at a time, so
    # the batches' wall time is the requests' time).
    prompt_ms, prompt_n = sum(t["prompt_ms"] for t in timings), sum(t["prompt_n"] for t in timings)
    predicted_ms, predicted_n = sum(t["predicted_ms"] for t in timings), sum(t["predicted_n"] for t in timings)
    assert seen.ttft_seconds == pytest.approx(prompt_ms / 1000 / prompt_n * PROMPT_TOKENS, rel=0.2)
    assert seen.tpot_seconds == pytest.approx(predicted_ms / 1000 / predicted_n, rel=0.2)
