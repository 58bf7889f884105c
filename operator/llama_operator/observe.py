"""What a deployment's model servers were seen doing over a window: latency, load, traffic.

Pure. The SLO loop's sources (observer.py: a Prometheus server's HTTP API, or the pods' own /metrics)
reduce what they read to per-second rates of the engine's counters and histogram buckets, and means of
its gauges, per deployment (`Rates`); `observation` turns those into an `Observation` the same way for
both sources. Which series to read comes from the engine catalog (engines.SloSignals): vLLM's latency
histograms give a p95 and the share of requests over the target; llama.cpp's time and token totals give
means only, and say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

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
    requests_running: float | None = None  # summed over pods, mean over the window
    requests_waiting: float | None = None
    requests_per_second: float | None = None
    tokens_per_second: float | None = None
    pods: int = 0
    problem: str | None = None

    @property
    def traffic(self) -> bool:
        """Whether requests were served in the window (without any, latency says nothing)."""
        return bool(self.requests_per_second) or bool(self.tokens_per_second)
