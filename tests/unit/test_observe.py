"""observe: /metrics text -> per-second rates -> what the SLO loop sees (p95 or means, load, traffic).

The exposition texts are written the way the pinned releases print them: vLLM through prometheus_client
(labels engine and model_name, counters with _total, histogram buckets with le), llama.cpp by hand in
tools/server/server-task.cpp ("# HELP llamacpp:<name> <help>", "# TYPE llamacpp:<name> <type>",
"llamacpp:<name> <value>", the value as a C++ stream prints a double).
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from llama_operator.engines import release
from llama_operator.observe import (
    MAX_EXPOSITION_BYTES, MEAN_FROM_COUNTERS, P95_FROM_BUCKETS, Rates, Target, format_window,
    histogram_quantile, observation, parse_exposition, rates_between, relevant, share_over, sum_rates,
)

NOW = datetime(2026, 12, 6, 6, 0, tzinfo=timezone.utc)
VLLM = release("vllm-0.34.0").slo_signals
LLAMACPP = release("llamacpp-b11434").slo_signals
CHAT = Target("default", "chat", "vllm", "vllm-0.34.0", ttft_target_seconds=0.5, tpot_target_seconds=0.05,
              prompt_tokens=1000)
TINY = Target("default", "tiny", "llamacpp", "llamacpp-b11434", ttft_target_seconds=2.0,
              tpot_target_seconds=0.1, prompt_tokens=500)


def vllm_text(requests: list[int], ttft_cumulative: list[list[int]], tokens: float, running: float = 3,
              waiting: float = 1) -> str:
    """vLLM's /metrics with one engine per entry of `requests` (data parallel: engine="0", "1", ...)."""
    bounds = ["0.1", "0.5", "1.0", "+Inf"]
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    for e in range(len(requests)):
        lines.append(f'vllm:num_requests_running{{engine="{e}",model_name="chat"}} {running / len(requests)}')
    lines += ["# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
              "# TYPE vllm:num_requests_waiting gauge"]
    for e in range(len(requests)):
        lines.append(f'vllm:num_requests_waiting{{engine="{e}",model_name="chat"}} {waiting / len(requests)}')
    lines += ["# HELP vllm:generation_tokens_total Number of generation tokens processed.",
              "# TYPE vllm:generation_tokens_total counter",
              f'vllm:generation_tokens_total{{engine="0",model_name="chat"}} {tokens}']
    for name in ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds"):
        lines += [f"# HELP {name} Histogram.", f"# TYPE {name} histogram"]
        for e, (n, cumulative) in enumerate(zip(requests, ttft_cumulative)):
            for le, count in zip(bounds, cumulative):
                lines.append(f'{name}_bucket{{engine="{e}",le="{le}",model_name="chat"}} {float(count)}')
            lines.append(f'{name}_count{{engine="{e}",model_name="chat"}} {float(n)}')
            lines.append(f'{name}_sum{{engine="{e}",model_name="chat"}} {n * 0.3}')
    return "\n".join(lines) + "\n"


def llamacpp_text(prompt_tokens: float, prompt_seconds: float, predicted_tokens: float,
                  predicted_seconds: float, processing: float = 1, deferred: float = 0) -> str:
    metrics = [
        ("counter", "prompt_tokens_total", "Number of prompt tokens processed.", prompt_tokens),
        ("counter", "prompt_seconds_total", "Prompt process time", prompt_seconds),
        ("counter", "tokens_predicted_total", "Number of generation tokens processed.", predicted_tokens),
        ("counter", "tokens_predicted_seconds_total", "Predict process time", predicted_seconds),
        ("counter", "n_decode_total", "Total number of llama_decode() calls", 42),
        ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.", 1.23457e+06),
        ("gauge", "requests_processing", "Number of requests processing.", processing),
        ("gauge", "requests_deferred", "Number of requests deferred.", deferred),
    ]
    return "".join(f"# HELP llamacpp:{name} {help_text}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value:g}\n"
                   for kind, name, help_text, value in metrics)


# --- parse_exposition -------------------------------------------------------------------------------------


def test_vllm_text_sums_label_sets_and_keeps_buckets_per_bound():
    scrape = parse_exposition(vllm_text([10, 30], [[4, 8, 10, 10], [10, 20, 29, 30]], tokens=900))
    assert scrape.values["vllm:num_requests_running"] == pytest.approx(3.0)  # 1.5 per engine, both engines
    assert scrape.values["vllm:generation_tokens_total"] == 900.0
    assert scrape.values["vllm:time_to_first_token_seconds_count"] == 40.0
    assert scrape.buckets["vllm:time_to_first_token_seconds"] == {0.1: 14.0, 0.5: 28.0, 1.0: 39.0, math.inf: 40.0}
    assert "vllm:time_to_first_token_seconds_bucket" not in scrape.values


def test_llamacpp_text_as_server_task_prints_it():
    scrape = parse_exposition(llamacpp_text(1200, 0.6, 300, 1.5, processing=2))
    assert scrape.values["llamacpp:prompt_tokens_total"] == 1200.0
    assert scrape.values["llamacpp:tokens_predicted_seconds_total"] == 1.5
    assert scrape.values["llamacpp:prompt_tokens_seconds"] == 1.23457e6
    assert scrape.values["llamacpp:requests_processing"] == 2.0
    assert not scrape.buckets


def test_timestamps_escapes_and_garbage_lines_are_tolerated():
    text = "\n".join([
        'vllm:num_requests_running{model_name="a \\"quoted\\" } name",engine="0"} 2 1733472000000',
        "this is not a sample",
        "vllm:num_requests_waiting{unterminated=\"x} 5",
        "vllm:num_requests_waiting not-a-number",
        "{no_name=\"x\"} 3",
        "vllm:num_requests_waiting 4",
        "h_bucket{le=\"oops\"} 1",
        "h_bucket{le=\"1\"} 2",
        "# EOF",
    ])
    scrape = parse_exposition(text)
    assert scrape.values == {"vllm:num_requests_running": 2.0, "vllm:num_requests_waiting": 4.0}
    assert scrape.buckets == {"h": {1.0: 2.0}}


def test_only_the_signals_series_are_kept_for_later():
    scrape = parse_exposition(vllm_text([10], [[4, 8, 10, 10]], tokens=900) + "vllm:num_preemptions_total 3\n")
    kept = relevant(scrape, VLLM)
    assert set(kept.values) == {"vllm:num_requests_running", "vllm:num_requests_waiting",
                                "vllm:generation_tokens_total"}
    assert set(kept.buckets) == {"vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds"}


def test_a_nan_sample_makes_its_series_nan():
    scrape = parse_exposition('g{a="1"} 1\ng{a="2"} NaN\nh 3\n')
    assert math.isnan(scrape.values["g"])
    assert scrape.values["h"] == 3.0


def test_an_oversized_body_is_refused_before_parsing():
    with pytest.raises(ValueError, match="over"):
        parse_exposition("x 1\n" * (MAX_EXPOSITION_BYTES // 4 + 1))


# --- histograms -------------------------------------------------------------------------------------------

BUCKETS = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}


def test_quantile_interpolates_within_the_bucket_like_prometheus():
    # rank 95 of 100 falls in (0.5, 1.0], which holds observations 91..100: 0.5 + 0.5 * 5/10.
    assert histogram_quantile(0.95, BUCKETS) == pytest.approx(0.75)
    # rank 25 in the lowest bucket, which starts at 0: 0.1 * 25/50.
    assert histogram_quantile(0.25, BUCKETS) == pytest.approx(0.05)


def test_quantile_edge_rules():
    assert histogram_quantile(0.95, {0.1: 10.0, 0.5: 10.0, math.inf: 20.0}) == 0.5  # in +Inf: highest bound
    assert histogram_quantile(0.95, {math.inf: 10.0}) is None  # fewer than 2 buckets
    assert histogram_quantile(0.95, {0.1: 0.0, math.inf: 0.0}) is None  # nothing counted
    assert histogram_quantile(0.95, {0.1: 1.0, 0.5: 2.0}) is None  # no +Inf bucket
    # Rates of buckets can dip by a hair; Prometheus makes them monotonic rather than go backwards.
    assert histogram_quantile(0.8, {0.1: 5.0, 0.5: 4.9, 1.0: 10.0, math.inf: 10.0}) == pytest.approx(0.8)


def test_share_over_the_target():
    assert share_over(0.75, BUCKETS) == pytest.approx(0.05)  # the p95 itself: 5 % over it
    assert share_over(0.3, BUCKETS) == pytest.approx(0.30)  # 50 under 0.1, half of (0.1, 0.5]'s 40
    assert share_over(0.0, BUCKETS) == pytest.approx(1.0)
    assert share_over(5.0, BUCKETS) == 0.0
    assert share_over(0.3, {0.1: 0.0, math.inf: 0.0}) is None


# --- rates ------------------------------------------------------------------------------------------------


def test_rates_between_two_scrapes_and_a_counter_reset():
    old = parse_exposition(vllm_text([20], [[10, 18, 20, 20]], tokens=1000, running=2))
    new = parse_exposition(vllm_text([40], [[12, 30, 40, 40]], tokens=200, running=4))  # tokens: a restart
    rates = rates_between(old, new, 10.0, VLLM)
    assert rates.buckets["vllm:time_to_first_token_seconds"] == pytest.approx(
        {0.1: 0.2, 0.5: 1.2, 1.0: 2.0, math.inf: 2.0})
    assert rates.counters["vllm:generation_tokens_total"] == pytest.approx(20.0)  # all 200 new, over 10 s
    assert rates.gauges["vllm:num_requests_running"] == pytest.approx(3.0)
    assert rates.pods == 1


def test_sum_rates_adds_pods():
    a = Rates(30, counters={"c": 1.0}, buckets={"h": {1.0: 1.0, math.inf: 2.0}}, gauges={"g": 1.0}, pods=1)
    b = Rates(30, counters={"c": 2.5}, buckets={"h": {1.0: 3.0, math.inf: 3.0}}, gauges={"g": 4.0}, pods=1)
    total = sum_rates([a, b])
    assert (total.counters, total.buckets, total.gauges, total.pods) == (
        {"c": 3.5}, {"h": {1.0: 4.0, math.inf: 5.0}}, {"g": 5.0}, 2)


# --- observation ------------------------------------------------------------------------------------------


def _vllm_rates(per_second: dict[float, float], tokens: float = 50.0) -> Rates:
    return Rates(30, counters={VLLM.generated_tokens: tokens},
                 buckets={VLLM.ttft: per_second, VLLM.tpot: {0.01: 1.0, 0.1: 2.0, math.inf: 2.0}},
                 gauges={VLLM.running: 3.0, VLLM.waiting: 1.0}, pods=2)


def test_vllm_observation_is_a_p95_with_the_share_over_target():
    seen = observation(CHAT, _vllm_rates({0.1: 1.0, 0.5: 1.8, 1.0: 2.0, math.inf: 2.0}),
                       source="pods", sampled_at=NOW)
    assert seen.problem is None
    assert seen.statistic == P95_FROM_BUCKETS
    assert seen.ttft_seconds == pytest.approx(0.75)
    assert seen.ttft_over_target == pytest.approx(0.10)  # the 0.5 s target: (1.0, 2.0] of 2.0 per second
    assert seen.tpot_seconds == pytest.approx(0.01 + 0.09 * 0.9)
    assert seen.requests_per_second == 2.0 and seen.tokens_per_second == 50.0
    assert (seen.requests_running, seen.requests_waiting, seen.pods) == (3.0, 1.0, 2)
    assert seen.traffic


def test_no_traffic_is_no_latency_and_no_problem():
    seen = observation(CHAT, _vllm_rates({0.1: 0.0, 0.5: 0.0, 1.0: 0.0, math.inf: 0.0}, tokens=0.0),
                       source="prometheus", sampled_at=NOW)
    assert seen.problem is None
    assert seen.ttft_seconds is None and seen.ttft_over_target is None
    assert not seen.traffic
    assert seen.requests_running == 3.0


def test_a_missing_series_is_a_problem_naming_it():
    rates = _vllm_rates({0.1: 1.0, math.inf: 1.0})
    del rates.buckets[VLLM.ttft]
    seen = observation(CHAT, rates, source="pods", sampled_at=NOW)
    assert seen.problem == "no vllm:time_to_first_token_seconds series for default/chat in the last 30s"
    assert seen.ttft_seconds is None and not seen.traffic


@pytest.mark.parametrize("value, why", [(math.nan, "is NaN"), (math.inf, "is infinite"), (-1.0, "is negative")])
def test_unusable_values_are_a_problem(value, why):
    rates = _vllm_rates({0.1: 1.0, math.inf: 1.0})
    rates.gauges[VLLM.waiting] = value
    seen = observation(CHAT, rates, source="pods", sampled_at=NOW)
    assert seen.problem is not None and seen.problem.startswith(f"vllm:num_requests_waiting for default/chat {why}")


def test_an_unknown_engine_is_a_problem():
    target = Target("default", "chat", "vllm", "vllm-9.9.9", 0.5, 0.05, 1000)
    seen = observation(target, _vllm_rates({0.1: 1.0, math.inf: 1.0}), source="pods", sampled_at=NOW)
    assert "vllm-9.9.9" in seen.problem


def test_a_source_problem_is_passed_on_with_the_window():
    seen = observation(CHAT, None, source="prometheus", sampled_at=NOW, problem="Prometheus down",
                       window_seconds=300)
    assert (seen.problem, seen.window_seconds) == ("Prometheus down", 300)


def test_llamacpp_means_from_two_scrapes():
    old = parse_exposition(llamacpp_text(1000, 0.5, 200, 4.0))
    new = parse_exposition(llamacpp_text(3000, 1.5, 600, 12.0, processing=3, deferred=2))
    seen = observation(TINY, rates_between(old, new, 20.0, LLAMACPP), source="pods", sampled_at=NOW)
    assert seen.problem is None
    assert seen.statistic == MEAN_FROM_COUNTERS
    assert seen.ttft_seconds == pytest.approx(1.0 / 2000 * 500)  # 0.5 ms a prompt token, 500-token prompt
    assert seen.tpot_seconds == pytest.approx(8.0 / 400)
    assert seen.tokens_per_second == pytest.approx(400 / 20)
    assert seen.ttft_over_target is None and seen.requests_per_second is None
    assert (seen.requests_running, seen.requests_waiting) == (2.0, 1.0)  # means of the two readings
    assert seen.traffic


def test_llamacpp_without_its_prompt_counters_names_them():
    old = parse_exposition(llamacpp_text(1000, 0.5, 200, 4.0).replace("llamacpp:prompt_seconds_total 0.5", ""))
    new = parse_exposition(llamacpp_text(3000, 1.5, 600, 12.0))
    seen = observation(TINY, rates_between(old, new, 20.0, LLAMACPP), source="pods", sampled_at=NOW)
    assert seen.problem == "no llamacpp:prompt_seconds_total series for default/tiny in the last 20s"
    assert seen.statistic == MEAN_FROM_COUNTERS


@pytest.mark.parametrize("seconds, text", [(30, "30s"), (300, "5m"), (3600, "1h"), (90, "90s"), (1.5, "1500ms")])
def test_format_window(seconds, text):
    assert format_window(seconds) == text


def test_share_over_bounds_says_what_the_buckets_know_for_sure():
    from llama_operator.observe import share_over_bounds

    # 100 requests: 27 at or under 1 s, all under 2.5 s (vLLM's TTFT bounds around a 2 s target).
    buckets = {0.5: 0.0, 1.0: 27.0, 2.5: 100.0, float("inf"): 100.0}
    assert share_over_bounds(2.0, buckets) == (0.0, 0.73)
    assert share_over_bounds(1.0, buckets) == (0.73, 0.73)  # a bound: exact
    assert share_over_bounds(0.2, buckets) == (1.0, 1.0)
    assert share_over_bounds(3.0, buckets) == (0.0, 0.0)
    late = {1.0: 10.0, 2.5: 50.0, float("inf"): 100.0}  # half past the top bound
    assert share_over_bounds(5.0, late) == (0.0, 0.5)
    assert share_over_bounds(0.5, {}) is None
