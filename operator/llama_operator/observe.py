"""What a deployment's model servers were seen doing over a window: latency, load, traffic.

Pure. The SLO loop's sources (observer.py: a Prometheus server's HTTP API, or the pods' own /metrics)
reduce what they read to per-second rates of the engine's counters and histogram buckets, and means of
its gauges, per deployment (`Rates`); `observation` turns those into an `Observation` the same way for
both sources. Which series to read comes from the engine catalog (engines.SloSignals): vLLM's latency
histograms give a p95 and the share of requests over the target; llama.cpp's time and token totals give
means only, and say so.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime

from . import engines
from .engines import SloSignals

#: How the observed latency was computed (status.observed.statistic).
P95_FROM_BUCKETS = "p95 from histogram buckets"
MEAN_FROM_COUNTERS = "mean from counters"


@dataclass(frozen=True)
class Target:
    """One deployment the loop observes: what it needs to find and judge the deployment's series."""

    namespace: str
    name: str
    runtime: str  # vllm | llamacpp
    engine: str | None  # the release id in force (engines.yaml), which names its series
    ttft_target_seconds: float
    tpot_target_seconds: float
    prompt_tokens: int  # the SLO's prompt length: llama.cpp's mean TTFT is its per-token prefill time x this
    drafting: bool = False  # the plan in force decodes with a draft: its drafted and accepted tokens are read


@dataclass
class Rates:
    """A deployment's series over one window, summed over its pods.

    `counters`: per-second rate of each counter (name as the release exports it, e.g.
    llamacpp:prompt_seconds_total). `buckets`: per histogram name, per bucket upper bound (float, +inf
    included), the per-second rate of the cumulative bucket count. `gauges`: the gauge summed over pods,
    averaged over the window. `pods`: how many pods contributed."""

    window_seconds: float
    counters: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    pods: int = 0


@dataclass(frozen=True)
class Observation:
    """What the loop saw of one deployment over its window; `problem` set means no usable data (SLOMet
    Unknown, no action), with why."""

    source: str  # prometheus | pods
    sampled_at: datetime
    window_seconds: float
    statistic: str = P95_FROM_BUCKETS  # P95_FROM_BUCKETS | MEAN_FROM_COUNTERS
    ttft_seconds: float | None = None
    tpot_seconds: float | None = None
    #: Share of requests (0..1) slower than the target; histograms only (None for means).
    ttft_over_target: float | None = None
    tpot_over_target: float | None = None
    #: What the buckets know for sure of those shares: (at least, at most) (share_over_bounds).
    ttft_over_bounds: tuple[float, float] | None = None
    tpot_over_bounds: tuple[float, float] | None = None
    requests_running: float | None = None  # summed over pods, mean over the window
    requests_waiting: float | None = None
    requests_per_second: float | None = None
    tokens_per_second: float | None = None
    #: Accepted over drafted tokens of the plan's draft, and drafted tokens per second; None without drafting.
    draft_acceptance_rate: float | None = None
    drafted_per_second: float | None = None
    pods: int = 0
    problem: str | None = None

    @property
    def traffic(self) -> bool:
        """Whether requests were served in the window (without any, latency says nothing)."""
        return bool(self.requests_per_second) or bool(self.tokens_per_second)


def format_window(seconds: float) -> str:
    """A window as status shows it and PromQL's range selectors take it: '30s', '5m', '1h', '1500ms'."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"a window must be positive, not {seconds!r} s")
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


# --- Reading /metrics -------------------------------------------------------------------------------------

#: The largest /metrics body read: a model server's is a few hundred KiB; anything far larger is not one,
#: and parsing it would cost the operator's event loop more than the observation is worth.
MAX_EXPOSITION_BYTES = 8 * 1024 * 1024

# name, optional {labels} (quoted values may hold '}', ',' and escaped quotes), value, optional timestamp.
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)(?:\s+-?[0-9]+)?\s*')
_LE = re.compile(r'(?:^|[{,\s])le\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Scrape:
    """One /metrics body, reduced to what the loop reads: no labels but a histogram bucket's bound.

    `values`: every sample name (counters with their _total, gauges, a histogram's _count and _sum) -> the
    sum over its label sets (vLLM labels by model_name and engine; the loop wants the server's total).
    `buckets`: histogram name (without _bucket) -> upper bound (float, +inf) -> cumulative count, summed
    over the other labels. A NaN sample makes its sum NaN: the series is then unusable, and says so."""

    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)


def parse_exposition(text: str) -> Scrape:
    """Prometheus text format 0.0.4, as vLLM and llama.cpp serve it. Comments (HELP, TYPE), timestamps and
    lines that are not samples are skipped: one odd line must not cost the whole observation."""
    if len(text) > MAX_EXPOSITION_BYTES:
        raise ValueError(f"a /metrics body of {len(text)} characters is over {MAX_EXPOSITION_BYTES} bytes")
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sample = _SAMPLE.fullmatch(line)
        if sample is None:
            continue
        name, labels, raw_value = sample.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        if name.endswith("_bucket") and labels:
            le = _LE.search(labels)
            if le is None:
                continue
            try:
                bound = float(le.group(1))
            except ValueError:
                continue
            per_bound = buckets.setdefault(name.removesuffix("_bucket"), {})
            per_bound[bound] = per_bound.get(bound, 0.0) + value
        else:
            values[name] = values.get(name, 0.0) + value
    return Scrape(values, buckets)


# --- Rates ------------------------------------------------------------------------------------------------


def _counters(signals: SloSignals) -> list[str]:
    return [n for n in (signals.generated_tokens, signals.prompt_seconds, signals.prompt_tokens,
                        signals.predicted_seconds, signals.predicted_tokens) if n]


def _optional_counters(signals: SloSignals) -> list[str]:
    """Counters read when present and never missed: drafted and accepted tokens (a server without a draft may
    not export them)."""
    return [n for n in (signals.draft_tokens, signals.draft_accepted) if n]


def _histograms(signals: SloSignals) -> list[str]:
    return [n for n in (signals.ttft, signals.tpot) if n]


def _gauges(signals: SloSignals) -> list[str]:
    return [signals.running, signals.waiting]


def _increase(old: float, new: float) -> float:
    """A counter's increase; a drop is a restart from zero (Prometheus's rule), so all of `new` is new."""
    return new if new < old else new - old


def relevant(scrape: Scrape, signals: SloSignals) -> Scrape:
    """Only the series the release's signals name: what is worth keeping of a scrape for later rates (a vLLM
    /metrics holds hundreds of series the loop never reads)."""
    names = set(signals.names())
    return Scrape(values={n: v for n, v in scrape.values.items() if n in names},
                  buckets={n: b for n, b in scrape.buckets.items() if n in names})


def gauges_of(scrape: Scrape, signals: SloSignals) -> dict[str, float]:
    """The release's gauges in one scrape (a pod scraped once yet has no rates, but has these)."""
    return {n: scrape.values[n] for n in _gauges(signals) if n in scrape.values}


def rates_between(old: Scrape, new: Scrape, seconds: float, signals: SloSignals) -> Rates:
    """One pod's rates between two of its scrapes `seconds` apart: counters and bucket counts as increases
    per second; gauges as the mean of the two readings (two points of a quantity that moves both ways:
    their mean is the least biased reading of the window from them). A series missing from either scrape
    is left out (observation() then says so)."""
    if seconds <= 0:
        raise ValueError(f"scrapes must be apart in time, not {seconds!r} s")
    counters = {n: _increase(old.values[n], new.values[n]) / seconds
                for n in _counters(signals) + _optional_counters(signals) if n in old.values and n in new.values}
    buckets = {}
    for name in _histograms(signals):
        before, after = old.buckets.get(name), new.buckets.get(name)
        if before and after:
            buckets[name] = {le: _increase(before[le], count) / seconds for le, count in after.items() if le in before}
    gauges = {n: (old.values[n] + v) / 2 if n in old.values else v for n, v in gauges_of(new, signals).items()}
    return Rates(window_seconds=seconds, counters=counters, buckets=buckets, gauges=gauges, pods=1)


def sum_rates(rates: list[Rates]) -> Rates:
    """A deployment's rates: its pods' added up, series by series (a pod lacking one adds nothing to it).
    The window is the longest of theirs."""
    total = Rates(window_seconds=max((r.window_seconds for r in rates), default=0.0))
    for r in rates:
        for name, value in r.counters.items():
            total.counters[name] = total.counters.get(name, 0.0) + value
        for name, per_bound in r.buckets.items():
            into = total.buckets.setdefault(name, {})
            for le, value in per_bound.items():
                into[le] = into.get(le, 0.0) + value
        for name, value in r.gauges.items():
            total.gauges[name] = total.gauges.get(name, 0.0) + value
        total.pods += r.pods
    return total


# --- Histograms -------------------------------------------------------------------------------------------


def _cumulative(buckets: dict[float, float]) -> list[tuple[float, float]] | None:
    """(upper bound, cumulative count) sorted, made monotonic as Prometheus does (rates of buckets scraped a
    moment apart can dip); None when the buckets cannot say anything (fewer than 2, no +Inf, no count)."""
    ordered = sorted(buckets.items())
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return None
    monotonic, highest = [], 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    return monotonic if highest > 0 else None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on one histogram's (rates of) cumulative bucket counts: the rank's
    bucket found, then linear interpolation within it (the lowest bucket starts at 0 if its bound is
    positive); a rank in the +Inf bucket gives the highest finite bound. None: fewer than 2 buckets, no +Inf
    bucket, or nothing counted."""
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile is within [0, 1], not {q!r}")
    cumulative = _cumulative(buckets)
    if cumulative is None:
        return None
    rank = q * cumulative[-1][1]
    b = next(i for i, (_, count) in enumerate(cumulative) if count >= rank)
    if b == len(cumulative) - 1:
        return cumulative[-2][0]
    bound, count = cumulative[b]
    if b == 0 and bound <= 0:
        return bound
    start, below = cumulative[b - 1] if b > 0 else (0.0, 0.0)
    if count == below:  # q = 0 on an empty lowest bucket: the bucket's start
        return start
    return start + (bound - start) * (rank - below) / (count - below)


def share_over(target: float, buckets: dict[float, float]) -> float | None:
    """The share (0..1) of observations above `target`, with histogram_quantile's assumption: observations
    spread evenly within a bucket (from 0 for the lowest), and those in the +Inf bucket at the highest
    finite bound (so share_over(histogram_quantile(q, b), b) is 1 - q while the quantile falls in a finite
    bucket, and nothing is over a target at or past the highest finite bound). None when histogram_quantile
    would be."""
    cumulative = _cumulative(buckets)
    if cumulative is None:
        return None
    total = cumulative[-1][1]
    if target >= cumulative[-2][0]:
        return 0.0
    start, below = 0.0, 0.0
    for bound, count in cumulative:
        if target < bound:
            fraction = min(max((target - start) / (bound - start), 0.0), 1.0) if bound > start else 0.0
            return (total - below - (count - below) * fraction) / total
        start, below = bound, count
    raise AssertionError("unreachable: the +Inf bucket is above any target")


def share_over_bounds(target: float, buckets: dict[float, float]) -> tuple[float, float] | None:
    """What the buckets know for sure of the share over `target`: (at least, at most). At least: the share
    above the smallest bound at or above the target (those are over it whatever their place in their
    bucket); at most: the share above the largest bound at or below it (below that, none is over). Equal
    when the target is a bucket bound. vLLM's TTFT buckets jump from 1 s to 2.5 s: for a 2 s target, a p95
    interpolated at 2.4 s may be a p95 of 1.6 s, and only these bounds say what is certain."""
    cumulative = _cumulative(buckets)
    if cumulative is None:
        return None
    total = cumulative[-1][1]
    finite = cumulative[:-1]
    above_up = next((total - count for bound, count in finite if bound >= target), None)
    below = [count for bound, count in finite if bound <= target]
    at_least = (above_up / total) if above_up is not None else 0.0  # past the top bound: nothing is sure
    at_most = (total - below[-1]) / total if below else 1.0
    return max(0.0, at_least), min(1.0, at_most)


# --- What the loop sees -----------------------------------------------------------------------------------


def _unusable(value: float) -> str | None:
    if math.isnan(value):
        return "is NaN"
    if math.isinf(value):
        return "is infinite"
    if value < 0:
        return f"is negative ({value:g})"
    return None


def _series_problem(target: Target, rates: Rates, signals: SloSignals) -> str | None:
    """What is missing or unusable among the series the release's signals name; None when all are there."""
    deployment = f"{target.namespace}/{target.name}"
    missing = f"series for {deployment} in the last {format_window(rates.window_seconds)}"
    for name in _histograms(signals):
        per_bound = rates.buckets.get(name)
        if not per_bound:
            return f"no {name} {missing}"
        if math.inf not in per_bound:
            return f"{name} for {deployment} has no +Inf bucket"
        for le, value in sorted(per_bound.items()):
            if why := _unusable(value):
                return f"{name} bucket le={le:g} for {deployment} {why}"
    for kind, names in (("counters", _counters(signals)), ("gauges", _gauges(signals))):
        present = getattr(rates, kind)
        for name in names:
            if name not in present:
                return f"no {name} {missing}"
            if why := _unusable(present[name]):
                return f"{name} for {deployment} {why}"
    return None


def _per(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def observation(target: Target, rates: Rates | None, *, source: str, sampled_at: datetime,
                problem: str | None = None, window_seconds: float | None = None) -> Observation:
    """What `rates` (a deployment's, summed over its pods) say of its latency and load, read the way the
    release in force (target.engine) exports them. `problem` (the source could not read anything: say why)
    or a series missing or unusable gives an Observation with only `problem`: the loop must not act on a
    partial picture. No traffic in the window is no problem: the latencies are None and `traffic` False.
    `window_seconds` is the window when there are no rates to take it from."""
    window = rates.window_seconds if rates is not None else window_seconds or 0.0
    release = engines.release(target.engine) if target.engine else None
    if release is None:
        problem = problem or (f"{target.namespace}/{target.name} runs no known engine release "
                              f"({target.engine or 'none recorded'}): which series to read is unknown")
    elif release.engine != target.runtime:
        problem = problem or (f"{target.namespace}/{target.name} is a {target.runtime} deployment, "
                              f"but {release.title} is not {target.runtime}")
    if problem is None and rates is None:
        problem = f"nothing was read for {target.namespace}/{target.name}"
    if problem is None:
        assert release is not None and rates is not None
        problem = _series_problem(target, rates, release.slo_signals)
    if problem is not None:
        return Observation(source=source, sampled_at=sampled_at, window_seconds=window,
                           statistic=_statistic(release), problem=problem)
    assert release is not None and rates is not None
    signals = release.slo_signals
    load = dict(source=source, sampled_at=sampled_at, window_seconds=window, pods=rates.pods,
                requests_running=rates.gauges[signals.running], requests_waiting=rates.gauges[signals.waiting],
                **_drafting(rates, signals))
    if signals.kind == "histograms":
        assert signals.ttft and signals.tpot and signals.generated_tokens
        ttft, tpot = rates.buckets[signals.ttft], rates.buckets[signals.tpot]
        return Observation(
            statistic=P95_FROM_BUCKETS,
            ttft_seconds=histogram_quantile(0.95, ttft), tpot_seconds=histogram_quantile(0.95, tpot),
            ttft_over_target=share_over(target.ttft_target_seconds, ttft),
            tpot_over_target=share_over(target.tpot_target_seconds, tpot),
            ttft_over_bounds=share_over_bounds(target.ttft_target_seconds, ttft),
            tpot_over_bounds=share_over_bounds(target.tpot_target_seconds, tpot),
            requests_per_second=ttft[math.inf], tokens_per_second=rates.counters[signals.generated_tokens],
            **load)
    assert signals.prompt_seconds and signals.prompt_tokens and signals.predicted_seconds and signals.predicted_tokens
    per_prompt_token = _per(rates.counters[signals.prompt_seconds], rates.counters[signals.prompt_tokens])
    return Observation(
        statistic=MEAN_FROM_COUNTERS,
        ttft_seconds=per_prompt_token * target.prompt_tokens if per_prompt_token is not None else None,
        tpot_seconds=_per(rates.counters[signals.predicted_seconds], rates.counters[signals.predicted_tokens]),
        # llama.cpp counts no requests (server-task.cpp exports tokens and seconds only): no rate of them.
        tokens_per_second=rates.counters[signals.predicted_tokens],
        **load)


def _drafting(rates: Rates, signals: SloSignals) -> dict[str, float | None]:
    """The draft's acceptance over the window (accepted over drafted tokens, as both engines count it), when the
    servers drafted in it; unusable values leave it unknown (it only ever turns a draft off)."""
    drafted = rates.counters.get(signals.draft_tokens or "")
    accepted = rates.counters.get(signals.draft_accepted or "")
    if drafted is None or accepted is None or _unusable(drafted) or _unusable(accepted):
        return {}
    if drafted == 0:  # counted, and nothing drafted: no acceptance, and a server that may not be drafting at all
        return {"drafted_per_second": 0.0}
    return {"draft_acceptance_rate": min(1.0, accepted / drafted), "drafted_per_second": drafted}


def _statistic(release: engines.EngineRelease | None) -> str:
    """The statistic an observation of this release would have had (status shows it beside the problem)."""
    return MEAN_FROM_COUNTERS if release is not None and release.slo_signals.kind == "counters" else P95_FROM_BUCKETS
