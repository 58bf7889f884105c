"""The SLO loop's gauges: what the operator observed of each LlamaDeployment and what it concluded.

A part of metrics.py, kept apart only for size; `OperatorMetrics.set_slo` is the way in. It follows
metrics.py's design: one record per deployment, replaced whole on every call and rendered by a custom
collector, so an observation that goes missing (None) takes its series with it, a statistic that
changes (p95 to mean, when a deployment moves from vLLM to llama.cpp) leaves no series under the old
label, and a correction that expires is not rendered any more. Nothing accumulates here: the
actions counter, whose value must survive record replacements, is an ordinary Counter in metrics.py.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import observe

#: What the SLO loop does on its own (`llama_operator_slo_actions_total{action}`; status.slo.lastAction).
SLO_ACTIONS: tuple[str, ...] = ("ScaledOut", "ScaledIn", "Replanned", "DraftOff")

#: The `statistic` label, from what the caller has: the label itself, or observe.Observation.statistic.
#: Short values, because vLLM's figures are p95s and llama.cpp's are means and dashboards must tell.
_STATISTIC_LABELS: dict[str, str] = {
    "p95": "p95",
    "mean": "mean",
    observe.P95_FROM_BUCKETS: "p95",
    observe.MEAN_FROM_COUNTERS: "mean",
}

_DEPLOYMENT_LABELS = ["namespace", "llamadeployment"]


@dataclass(frozen=True)
class SLORecord:
    """Everything the collector renders for one LlamaDeployment's SLO loop (replaced whole)."""

    observed_ttft_s: Optional[float]
    observed_tpot_s: Optional[float]
    requests_running: Optional[float]
    requests_waiting: Optional[float]
    slo_met: Optional[bool]
    statistic: str  # "p95" | "mean"; "" only when no latency was observed
    corrections: tuple[tuple[str, str, float, float], ...]


def slo_record(
    *,
    observed_ttft_s: Optional[float],
    observed_tpot_s: Optional[float],
    requests_running: Optional[float],
    requests_waiting: Optional[float],
    slo_met: Optional[bool],
    statistic: Optional[str],
    corrections: Sequence[tuple[str, str, float, float]],
) -> SLORecord:
    """Check the loop's figures and freeze them into a record.

    Refuses what would render a wrong or broken exposition rather than publish it: a negative or
    non-finite figure, a latency without a known statistic (a p95 and a mean must never look alike),
    a non-positive factor, and the same (variant, hardware) twice (two samples with one label set).
    """
    for label, value in (("observed_ttft_s", observed_ttft_s), ("observed_tpot_s", observed_tpot_s),
                         ("requests_running", requests_running), ("requests_waiting", requests_waiting)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    latency_known = observed_ttft_s is not None or observed_tpot_s is not None
    if latency_known and statistic not in _STATISTIC_LABELS:
        raise ValueError(f"statistic {statistic!r} must be one of {sorted(_STATISTIC_LABELS)} "
                         "when a latency is observed")
    seen: set[tuple[str, str]] = set()
    frozen = []
    for variant, hardware, ttft_factor, tpot_factor in corrections:
        for label, factor in (("ttft_factor", ttft_factor), ("tpot_factor", tpot_factor)):
            if not math.isfinite(factor) or factor <= 0:
                raise ValueError(f"{label} of {variant} on {hardware} must be a positive number, got {factor!r}")
        if (variant, hardware) in seen:
            raise ValueError(f"two corrections for {variant} on {hardware}")
        seen.add((variant, hardware))
        frozen.append((variant, hardware, float(ttft_factor), float(tpot_factor)))
    return SLORecord(
        observed_ttft_s=None if observed_ttft_s is None else float(observed_ttft_s),
        observed_tpot_s=None if observed_tpot_s is None else float(observed_tpot_s),
        requests_running=None if requests_running is None else float(requests_running),
        requests_waiting=None if requests_waiting is None else float(requests_waiting),
        slo_met=None if slo_met is None else bool(slo_met),
        statistic=_STATISTIC_LABELS[statistic] if latency_known else "",
        corrections=tuple(sorted(frozen)),
    )


class SLOCollector(Collector):
    """Renders the SLO loop's per-deployment gauges from the current records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], SLORecord] = {}

    def put(self, key: tuple[str, str], record: SLORecord) -> None:
        with self._lock:
            self._records[key] = record

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._records.pop(key, None)

    def describe(self) -> Iterable[Metric]:
        # Names only (empty families): lets the registry detect duplicate registrations.
        return slo_families()

    def collect(self) -> Iterable[Metric]:
        out = slo_families()
        by_name = {family.name: family for family in out}
        with self._lock:
            records = sorted(self._records.items())
        for (namespace, name), rec in records:
            key = [namespace, name]
            if rec.observed_ttft_s is not None:
                by_name["llama_operator_observed_ttft_seconds"].add_metric(key + [rec.statistic], rec.observed_ttft_s)
            if rec.observed_tpot_s is not None:
                by_name["llama_operator_observed_tpot_seconds"].add_metric(key + [rec.statistic], rec.observed_tpot_s)
            if rec.requests_running is not None:
                by_name["llama_operator_observed_requests_running"].add_metric(key, rec.requests_running)
            if rec.requests_waiting is not None:
                by_name["llama_operator_observed_requests_waiting"].add_metric(key, rec.requests_waiting)
            # Unknown renders nothing: an alert on `== 0` must not fire on missing data, and a 0.5
            # or a NaN would mean something to PromQL that nobody intended.
            if rec.slo_met is not None:
                by_name["llama_operator_slo_met"].add_metric(key, 1 if rec.slo_met else 0)
            for variant, hardware, ttft_factor, tpot_factor in rec.corrections:
                family = by_name["llama_operator_correction_factor"]
                family.add_metric(key + [variant, hardware, "ttft"], ttft_factor)
                family.add_metric(key + [variant, hardware, "tpot"], tpot_factor)
        return out


def slo_families() -> list[GaugeMetricFamily]:
    """The SLO loop's gauge families, empty (their names are part of metrics.METRIC_NAMES)."""
    dl = list(_DEPLOYMENT_LABELS)
    return [
        GaugeMetricFamily(
            "llama_operator_observed_ttft_seconds",
            "Time to first token the SLO loop observed over its window: vLLM's p95 from its histogram "
            "buckets (statistic=\"p95\"), llama.cpp's mean (statistic=\"mean\").", labels=dl + ["statistic"]),
        GaugeMetricFamily(
            "llama_operator_observed_tpot_seconds",
            "Time per output token the SLO loop observed over its window (statistic as for TTFT).",
            labels=dl + ["statistic"]),
        GaugeMetricFamily(
            "llama_operator_observed_requests_running",
            "Requests being served, all replicas, mean over the SLO loop's window.", labels=dl),
        GaugeMetricFamily(
            "llama_operator_observed_requests_waiting",
            "Requests queued, all replicas, mean over the SLO loop's window.", labels=dl),
        GaugeMetricFamily(
            "llama_operator_slo_met",
            "The SLOMet condition: 1 met, 0 breached; absent while unknown (no traffic, no data).", labels=dl),
        GaugeMetricFamily(
            "llama_operator_correction_factor",
            "Observed over estimated latency of a variant (model/quantization) on a hardware shape, which the "
            "planner multiplies its estimate by (status.corrections), per sli (ttft, tpot).",
            labels=dl + ["variant", "hardware", "sli"]),
    ]
