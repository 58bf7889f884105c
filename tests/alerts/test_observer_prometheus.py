"""PrometheusSource against a real Prometheus, and against a fake one that answers badly.

The real one (Debian's `prometheus`, on 127.0.0.1 with a temporary config) scrapes exporters imitating
vLLM 0.34.0 (two pods), vLLM 0.10.2 (whose time-per-output-token histogram has another name) and llama.cpp,
with `namespace`/`llamadeployment`/`pod` added by the scrape config as the chart's PodMonitor adds them. The
exporters serve plain text 0.0.4 themselves (prometheus-client would render `vllm:foo` as `vllm_foo` in
OpenMetrics, see TOOLCHAIN.md) and count as a steady rate in wall time, so the expected figures are exact.

The fake one (a thread on 127.0.0.1) is down, answers 500, answers too late, answers NaN, nothing, stale
data or an error: every target then gets a `problem` naming Prometheus's URL, and collect returns in time.
"""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from llama_operator.observe import MEAN_FROM_COUNTERS, P95_FROM_BUCKETS, Target
from llama_operator.observer import Observer, PrometheusSource
from kit.http_stub import Answer, Reply, Request, Serve, free_port, json_reply, stub_servers
from kit.prometheus import running_prometheus

WINDOW_S = 10
BUDGET_S = 60.0
CHAT = Target("team-a", "chat", "vllm", "vllm-0.34.0", ttft_target_seconds=0.5, tpot_target_seconds=0.05,
              prompt_tokens=1000, drafting=True)
LEGACY = Target("team-a", "legacy", "vllm", "vllm-0.10.2", 0.5, 0.05, 1000)
TINY = Target("team-b", "tiny", "llamacpp", "llamacpp-b11434", 2.0, 0.1, prompt_tokens=500, drafting=True)
GHOST = Target("team-c", "ghost", "vllm", "vllm-0.34.0", 0.5, 0.05, 1000)  # nothing scrapes it


def _histogram(name: str, requests: float, shares: dict[str, float]) -> list[str]:
    """Cumulative buckets: `shares` says which share of the requests falls at or under each bound."""
    labels = 'engine="0",model_name="m"'
    lines = [f"# TYPE {name} histogram"]
    for le, share in shares.items():
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {requests * share}')
    lines += [f'{name}_bucket{{{labels},le="+Inf"}} {requests}', f"{name}_count{{{labels}}} {requests}"]
    return lines


def vllm_text(elapsed: float, tpot_name: str, ttft_shares: dict[str, float], drafting: bool = False) -> str:
    """4 requests a second since start, 20 output tokens each; 2 running, 1 waiting; drafting: 30 tokens drafted
    a second, 18 of them accepted."""
    requests = 4 * elapsed
    labels = 'engine="0",model_name="m"'
    lines = [f"vllm:num_requests_running{{{labels}}} 2", f"vllm:num_requests_waiting{{{labels}}} 1",
             f"vllm:generation_tokens_total{{{labels}}} {20 * requests}"]
    if drafting:
        lines += [f"vllm:spec_decode_num_draft_tokens_total{{{labels}}} {30 * elapsed}",
                  f"vllm:spec_decode_num_accepted_tokens_total{{{labels}}} {18 * elapsed}"]
    lines += _histogram("vllm:time_to_first_token_seconds", requests, ttft_shares)
    lines += _histogram(tpot_name, requests, {"0.01": 0.0, "0.025": 0.5, "0.05": 1.0, "0.1": 1.0})
    return "\n".join(lines) + "\n"


def llamacpp_text(elapsed: float) -> str:
    """1000 prompt tokens in 0.5 s and 50 tokens predicted in 1 s, every second; 20 tokens drafted, 5 accepted."""
    values = {"prompt_tokens_total": 1000 * elapsed, "prompt_seconds_total": 0.5 * elapsed,
              "tokens_predicted_total": 50 * elapsed, "tokens_predicted_seconds_total": 1.0 * elapsed,
              "requests_processing": 1, "requests_deferred": 3,
              "spec_decode_num_draft_tokens_total": 20 * elapsed, "spec_decode_num_accepted_tokens_total": 5 * elapsed}
    return "".join(f"# HELP llamacpp:{k} .\n# TYPE llamacpp:{k} counter\nllamacpp:{k} {v}\n" for k, v in values.items())


def exporter(text) -> Answer:
    """Serves `text(seconds since start)` on /metrics, in text format 0.0.4."""
    started = time.monotonic()
    return lambda request: Reply(body=text(time.monotonic() - started))


CHAT_SHARES = {"0.1": 0.0, "0.5": 0.8, "1.0": 1.0}  # 80 % in (0.1, 0.5], 20 % in (0.5, 1.0]
LEGACY_SHARES = {"0.1": 0.0, "0.5": 1.0, "1.0": 1.0}


@pytest.fixture
def exporters():
    with stub_servers() as serve:
        yield {
            ("team-a", "chat", "chat-0"): serve(exporter(
                lambda t: vllm_text(t, "vllm:request_time_per_output_token_seconds", CHAT_SHARES, drafting=True))),
            ("team-a", "chat", "chat-1"): serve(exporter(
                lambda t: vllm_text(t, "vllm:request_time_per_output_token_seconds", CHAT_SHARES, drafting=True))),
            ("team-a", "legacy", "legacy-0"): serve(exporter(
                lambda t: vllm_text(t, "vllm:time_per_output_token_seconds", LEGACY_SHARES))),
            ("team-b", "tiny", "tiny-0"): serve(exporter(llamacpp_text)),
        }


@pytest.fixture
def prometheus(tmp_path: Path, exporters):
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "model-servers",
            "static_configs": [
                {"targets": [f"127.0.0.1:{e.port}"],
                 "labels": {"namespace": ns, "llamadeployment": name, "pod": pod}}
                for (ns, name, pod), e in exporters.items()],
        }],
    }
    with running_prometheus(config, tmp_path) as running:
        yield running.url


def _promql(base: str, expr: str) -> dict[str, float]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        result = json.load(response)["data"]["result"]
    return {r["metric"]["llamadeployment"]: float(r["value"][1]) for r in result}


async def test_one_query_per_signal_gives_each_deployment_its_figures(prometheus):
    source = PrometheusSource(prometheus, timeout=5)
    observer = Observer(source, window_seconds=WINDOW_S)
    targets = [CHAT, LEGACY, TINY, GHOST]
    deadline = time.monotonic() + BUDGET_S
    while True:  # until every scraped deployment has a window of samples
        seen = await observer.collect(targets, {})
        settled = all(seen[(t.namespace, t.name)].problem is None and seen[(t.namespace, t.name)].pods
                      for t in (CHAT, LEGACY, TINY))
        # Every pod scraped across the whole window (a slow first scrape would leave rate() a short span).
        scrapes = _promql(prometheus, f"min by (llamadeployment) (count_over_time(up[{WINDOW_S}s]))")
        if settled and all(scrapes.get(t.name, 0) >= WINDOW_S - 1 for t in (CHAT, LEGACY, TINY)):
            break
        assert time.monotonic() < deadline, {k: o.problem for k, o in seen.items()}
        time.sleep(1)

    chat = seen[("team-a", "chat")]
    assert (chat.source, chat.statistic, chat.pods) == ("prometheus", P95_FROM_BUCKETS, 2)
    assert chat.ttft_seconds == pytest.approx(0.5 + 0.5 * 0.15 / 0.2)  # rank 0.95 in (0.5, 1.0], which holds 20 %
    assert chat.ttft_over_target == pytest.approx(0.2)
    assert chat.tpot_seconds == pytest.approx(0.025 + 0.025 * 0.45 / 0.5)
    # 4 a second on each of two pods; rate() extrapolates the few samples of a short window to its edges, no
    # further than half a scrape interval each side, so it can read up to ~20 % low (as Prometheus itself does).
    assert chat.requests_per_second == pytest.approx(8.0, rel=0.25)
    assert chat.tokens_per_second == pytest.approx(20 * chat.requests_per_second, rel=0.05)
    theirs = _promql(prometheus, f"sum by (llamadeployment) (rate(vllm:time_to_first_token_seconds_count[{WINDOW_S}s]))")
    assert chat.requests_per_second == pytest.approx(theirs["chat"], rel=0.1)
    assert (chat.requests_running, chat.requests_waiting) == (pytest.approx(4.0), pytest.approx(2.0))
    # The same figure as Prometheus's own histogram_quantile on the same buckets.
    theirs = _promql(prometheus, "histogram_quantile(0.95, sum by (llamadeployment, le) "
                                 f"(rate(vllm:time_to_first_token_seconds_bucket[{WINDOW_S}s])))")
    assert chat.ttft_seconds == pytest.approx(theirs["chat"], rel=1e-6)

    # The draft's acceptance: accepted over drafted tokens, both pods (60 drafted a second, 36 accepted).
    assert chat.draft_acceptance_rate == pytest.approx(0.6, rel=1e-6)
    assert chat.drafted_per_second == pytest.approx(60.0, rel=0.25)

    legacy = seen[("team-a", "legacy")]  # vLLM 0.10.2: its own name for time per output token
    assert legacy.draft_acceptance_rate is None and legacy.drafted_per_second is None
    assert legacy.ttft_seconds == pytest.approx(0.1 + 0.4 * 0.95)
    assert legacy.tpot_seconds == pytest.approx(chat.tpot_seconds)
    assert legacy.pods == 1

    tiny = seen[("team-b", "tiny")]
    assert tiny.statistic == MEAN_FROM_COUNTERS
    assert tiny.ttft_seconds == pytest.approx(0.5 / 1000 * 500, rel=0.02)  # two queries: two instants
    assert tiny.tpot_seconds == pytest.approx(1.0 / 50, rel=0.02)
    assert (tiny.requests_running, tiny.requests_waiting) == (pytest.approx(1.0), pytest.approx(3.0))
    assert tiny.draft_acceptance_rate == pytest.approx(0.25, rel=0.02)

    ghost = seen[("team-c", "ghost")]
    assert ghost.problem == (f"Prometheus {prometheus}: no vllm:time_to_first_token_seconds series for "
                             f"team-c/ghost in the last {WINDOW_S}s")

    per_collect = []
    for targets in ([LEGACY], [CHAT], [CHAT, LEGACY, GHOST], [CHAT, LEGACY, TINY, GHOST]):
        before = source.queries_sent
        await observer.collect(targets, {})
        per_collect.append(source.queries_sent - before)
    # vLLM alone: ttft, tpot, tokens, running, waiting, pods; drafted and accepted tokens while a plan drafts (one
    # query each for both engines' names); llama.cpp's four counters on top.
    assert per_collect == [6, 8, 8, 12]


# --- A Prometheus that answers badly ---------------------------------------------------------------------

TIMEOUT_S = 1.0


class FakePrometheus:
    """/api/v1/query answering as `mode` says, recording the Authorization headers it was sent."""

    def __init__(self, serve: Serve, mode: str):
        self.mode = mode
        self.authorizations: list[str | None] = []
        self.evaluation_times: list[str | None] = []
        self.url = serve(self.handle).url

    def handle(self, request: Request) -> Reply | None:
        self.authorizations.append(request.headers.get("Authorization"))
        if self.mode == "slow":
            return None
        if self.mode == "500":
            return Reply(500)
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        self.evaluation_times.append(params.get("time", [None])[0])
        return self.answer(params["query"][0])

    def answer(self, query: str) -> Reply:
        if self.mode == "error":
            return json_reply({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}, 400)
        stamp = time.time() - (3600 if self.mode == "stale" else 0)
        value = "NaN" if self.mode == "nan" else "1"
        result = [] if self.mode == "empty" else [
            {"metric": {"namespace": t.namespace, "llamadeployment": t.name, "le": le}, "value": [stamp, value]}
            for t in (CHAT, TINY) for le in ("0.5", "+Inf")]
        if self.mode == "foreign":  # a vLLM someone else runs, scraped without the operator's labels
            result.append({"metric": {"le": "+Inf"} if "le" in query else {}, "value": [stamp, "7"]})
        return json_reply({"status": "success", "data": {"resultType": "vector", "result": result}})


@pytest.fixture
def fake_prometheus():
    with stub_servers() as serve:
        yield lambda mode: FakePrometheus(serve, mode)


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens


@pytest.mark.parametrize("mode, why", [
    ("down", "cannot connect"),
    ("500", "HTTP 500, and not JSON"),
    ("slow", f"no answer within {TIMEOUT_S:g} s"),
    ("error", "HTTP 400: bad_data: parse error at char 3"),
    ("nan", "is NaN"),
    ("empty", "no vllm:time_to_first_token_seconds series for team-a/chat"),
    ("stale", "stale data"),
])
async def test_a_bad_answer_is_a_problem_for_every_target(fake_prometheus, mode, why):
    url = _closed_port_url() if mode == "down" else fake_prometheus(mode).url
    observer = Observer(PrometheusSource(url, timeout=TIMEOUT_S), window_seconds=30)
    started = time.monotonic()
    seen = await observer.collect([CHAT, TINY], {})
    assert time.monotonic() - started < TIMEOUT_S + 1.0
    for target in (CHAT, TINY):
        problem = seen[(target.namespace, target.name)].problem
        assert problem is not None and problem.startswith(f"Prometheus {url}: "), problem
        assert why in problem or target is TINY, problem
        assert seen[(target.namespace, target.name)].ttft_seconds is None


async def test_series_without_the_deployment_labels_are_left_out_not_fatal(fake_prometheus):
    """Another team's vLLM, scraped by a PodMonitor without the operator's relabelling, carries no namespace and
    llamadeployment labels: it is none of the operator's deployments, and must not blind the loop to them."""
    fake = fake_prometheus("foreign")
    seen = await Observer(PrometheusSource(fake.url, timeout=TIMEOUT_S), window_seconds=30).collect([CHAT], {})
    observed = seen[(CHAT.namespace, CHAT.name)]
    assert observed.problem is None, observed.problem
    assert observed.requests_per_second == pytest.approx(1.0)  # its own +Inf bucket, not the foreign 7


async def test_every_query_of_a_collect_is_evaluated_at_one_instant(fake_prometheus):
    """The acceptance rate divides one query's answer by another's: asked at "now" each, their windows end a
    few milliseconds apart and take in different scrapes (a CI run read 0.59985 for 0.6)."""
    fake = fake_prometheus("empty")
    observer = Observer(PrometheusSource(fake.url, timeout=TIMEOUT_S), window_seconds=30)
    for _ in range(2):
        fake.evaluation_times.clear()
        await observer.collect([CHAT, TINY], {})
        assert len(fake.evaluation_times) == 12 and len(set(fake.evaluation_times)) == 1, fake.evaluation_times
        assert float(fake.evaluation_times[0]) == pytest.approx(time.time(), abs=2.0)


async def test_the_bearer_token_is_read_again_each_collect(fake_prometheus, tmp_path):
    fake = fake_prometheus("empty")
    token = tmp_path / "token"
    token.write_text("first\n")
    observer = Observer(PrometheusSource(fake.url, bearer_token_file=str(token), timeout=TIMEOUT_S), 30)
    await observer.collect([CHAT], {})
    token.write_text("second\n")
    await observer.collect([CHAT], {})
    assert set(fake.authorizations) == {"Bearer first", "Bearer second"}

    token.unlink()
    seen = await observer.collect([CHAT], {})
    assert "cannot read the bearer token file" in seen[("team-a", "chat")].problem
