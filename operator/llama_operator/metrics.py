"""The operator's own Prometheus metrics.

Why this module looks the way it does:

* **Its own registry.** Everything lives in one :class:`prometheus_client.CollectorRegistry` owned
  by an :class:`OperatorMetrics` instance, not in the library's global registry. Tests create as
  many instances as they like without "Duplicated timeseries" errors, and the exporter serves
  exactly the operator's series (no accidental process/platform collectors from other imports).

* **Per-deployment state is a snapshot, not a pile of label sets.** The gauges describing a
  LlamaDeployment (phase, variant in force, SLO targets, predictions, replicas) are rendered by a
  custom collector from one record per deployment. ``set_deployment`` replaces that record whole,
  so when the phase or the chosen model changes the old label set simply is not rendered any more:
  no stale ``phase="Deploying"`` next to ``phase="Ready"``, no second ``deployment_info`` for the
  model that was in force yesterday. A scrape sees each deployment either before or after an
  update, never half of it (the collector copies the records under a lock).

* **The SLO loop's figures are a second record per deployment** (slo_metrics.py, same design):
  ``set_slo`` replaces what the loop observed and concluded, so a figure it no longer has, or a
  correction that expired, is not rendered any more.

* **Counters and the reconcile histogram are ordinary prometheus-client metrics**, because their
  values accumulate and must survive phase changes; ``forget_deployment`` removes the deployment's
  error and SLO action counters explicitly.

* **One static alert rule file serves every LlamaDeployment.** The SLO targets are published as
  gauges (``llama_operator_slo_ttft_seconds``...) so the rules can compare a runtime's observed
  latency with *this* deployment's target through a join on ``(namespace, llamadeployment)``. For
  the error-budget (burn-rate) rules, which need "how many requests met the target", the operator
  also publishes ``llama_operator_slo_bucket_info{sli, le}``: the vLLM histogram bucket boundary it
  picked for each target, with ``le`` spelled exactly as vLLM spells its bucket labels. The rules
  join vLLM's ``_bucket`` series on ``(namespace, llamadeployment, le)`` to select that bucket.
  docs/alerts.md explains the join and its limits.

The kopf handlers call the small API below; nothing here talks to the Kubernetes API.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import status
from .slo_metrics import SLO_ACTIONS, SLOCollector, slo_families, slo_record

__all__ = [
    "PHASES",
    "PLAN_OUTCOMES",
    "SLO_ACTIONS",
    "RUNTIMES",
    "VLLM_TTFT_BUCKETS",
    "VLLM_TPOT_BUCKETS",
    "OperatorMetrics",
    "METRIC_NAMES",
    "slo_bucket",
    "format_le",
]

#: Phases a LlamaDeployment can be in. The alert rules select on two of them (Unschedulable,
#: Invalid); the `llama_operator_deployments` gauge always carries all of them, zeros included,
#: so a dashboard shows "0 Unschedulable" instead of "no data".
PHASES: tuple[str, ...] = tuple(status.PHASES)

#: Outcomes of one planning pass (`llama_operator_plans_total{outcome}`).
PLAN_OUTCOMES: tuple[str, ...] = ("requested", "fallback", "infeasible", "invalid")

#: Runtimes the operator renders. Only vLLM exposes latency histograms.
RUNTIMES: tuple[str, ...] = ("vllm", "llamacpp")

#: Bucket boundaries of vLLM's `vllm:time_to_first_token_seconds` histogram (vllm/v1/metrics/
#: loggers.py; unchanged from v0.6 to v0.11). The burn-rate rules can only count "requests at or
#: under the target" at one of these boundaries.
VLLM_TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)

#: Bucket boundaries of `vllm:time_per_output_token_seconds` and of its successor
#: `vllm:inter_token_latency_seconds` (vLLM >= 0.11); both use the same list.
VLLM_TPOT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)

_DEPLOYMENT_LABELS = ("namespace", "llamadeployment")
_INFO_LABELS = ("requested_model", "model", "quantization", "runtime", "gpu_product")

# Reconciles range from a few milliseconds (nothing changed) to tens of seconds (API retries).
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def format_le(boundary: float) -> str:
    """Spell a bucket boundary the way vLLM's exposition spells its `le` labels.

    vLLM uses the Python prometheus-client, which renders boundaries with Python's float repr
    (``1.0``, ``0.25``, ``2560.0``, ``+Inf``). The join in the burn-rate rules compares label
    *strings*, so the operator must produce the identical spelling; it uses the same function.
    """
    return floatToGoString(float(boundary))


def slo_bucket(target_s: float, buckets: Sequence[float]) -> float:
    """The bucket boundary the burn-rate rules use as "met the target" for `target_s`.

    The largest boundary at or below the target, so that every request counted as good really was
    at or under the target (conservative: requests between that boundary and the target count as
    bad, so the rules may page slightly early, never late). A target below the smallest boundary
    gets the smallest boundary: the histogram cannot resolve anything finer.
    """
    if not math.isfinite(target_s) or target_s <= 0:
        raise ValueError(f"an SLO target must be a positive number of seconds, got {target_s!r}")
    ordered = sorted(buckets)
    chosen = ordered[0]
    for boundary in ordered:
        if boundary <= target_s + 1e-12:
            chosen = boundary
    return chosen


@dataclass(frozen=True)
class _DeploymentRecord:
    """Everything the collector renders for one LlamaDeployment (replaced whole on update)."""

    phase: str
    requested_model: str
    model: str
    quantization: str
    runtime: str
    gpu_product: str
    fallback: bool
    slo_ttft_s: Optional[float]
    slo_tpot_s: Optional[float]
    predicted_ttft_s: Optional[float]
    predicted_tpot_s: Optional[float]
    replicas_desired: int
    replicas_ready: int


class _DeploymentCollector(Collector):
    """Renders the per-deployment gauges from the current records (see module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], _DeploymentRecord] = {}

    def put(self, key: tuple[str, str], record: _DeploymentRecord) -> None:
        with self._lock:
            self._records[key] = record

    def drop(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None

    def snapshot(self) -> dict[tuple[str, str], _DeploymentRecord]:
        with self._lock:
            return dict(self._records)

    def describe(self) -> Iterable[Metric]:
        # Names only (empty families): lets the registry detect duplicate registrations.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        records = self.snapshot()
        by_name = {family.name: family for family in families}

        counts = {phase: 0 for phase in PHASES}
        for (namespace, name), rec in sorted(records.items()):
            key = [namespace, name]
            counts[rec.phase] += 1
            by_name["llama_operator_deployment_phase"].add_metric(key + [rec.phase], 1)
            by_name["llama_operator_deployment_info"].add_metric(
                key + [rec.requested_model, rec.model, rec.quantization, rec.runtime, rec.gpu_product], 1
            )
            by_name["llama_operator_fallback_in_force"].add_metric(key, 1 if rec.fallback else 0)
            if rec.slo_ttft_s is not None:
                by_name["llama_operator_slo_ttft_seconds"].add_metric(key, rec.slo_ttft_s)
            if rec.slo_tpot_s is not None:
                by_name["llama_operator_slo_tpot_seconds"].add_metric(key, rec.slo_tpot_s)
            if rec.predicted_ttft_s is not None:
                by_name["llama_operator_predicted_ttft_seconds"].add_metric(key, rec.predicted_ttft_s)
            if rec.predicted_tpot_s is not None:
                by_name["llama_operator_predicted_tpot_seconds"].add_metric(key, rec.predicted_tpot_s)
            by_name["llama_operator_replicas_desired"].add_metric(key, rec.replicas_desired)
            by_name["llama_operator_replicas_ready"].add_metric(key, rec.replicas_ready)
            # Only vLLM has the histograms the burn-rate rules join against.
            if rec.runtime == "vllm":
                bucket_family = by_name["llama_operator_slo_bucket_info"]
                if rec.slo_ttft_s is not None:
                    le = format_le(slo_bucket(rec.slo_ttft_s, VLLM_TTFT_BUCKETS))
                    bucket_family.add_metric(key + ["ttft", le], 1)
                if rec.slo_tpot_s is not None:
                    le = format_le(slo_bucket(rec.slo_tpot_s, VLLM_TPOT_BUCKETS))
                    bucket_family.add_metric(key + ["tpot", le], 1)
        for phase in PHASES:
            by_name["llama_operator_deployments"].add_metric([phase], counts[phase])
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        dl = list(_DEPLOYMENT_LABELS)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        return [
            gauge("llama_operator_deployments",
                  "Number of LlamaDeployments in each phase.", ["phase"]),
            gauge("llama_operator_deployment_phase",
                  "1 for the LlamaDeployment's current phase (only that phase is exposed).",
                  dl + ["phase"]),
            gauge("llama_operator_deployment_info",
                  "The variant in force: requested model, model and quantization served, runtime "
                  "and GPU product (empty when not applicable). Always 1.",
                  dl + list(_INFO_LABELS)),
            gauge("llama_operator_fallback_in_force",
                  "1 when the operator serves a fallback variant instead of the requested one.", dl),
            gauge("llama_operator_slo_ttft_seconds",
                  "Declared p95 time-to-first-token target (spec.slo.ttftP95).", dl),
            gauge("llama_operator_slo_tpot_seconds",
                  "Declared p95 time-per-output-token target (spec.slo.tpotP95).", dl),
            gauge("llama_operator_predicted_ttft_seconds",
                  "The plan's predicted time to first token for the variant in force.", dl),
            gauge("llama_operator_predicted_tpot_seconds",
                  "The plan's predicted time per output token for the variant in force.", dl),
            gauge("llama_operator_replicas_desired", "Replicas the operator asked for.", dl),
            gauge("llama_operator_replicas_ready", "Replicas that are ready.", dl),
            gauge("llama_operator_slo_bucket_info",
                  "vLLM histogram bucket boundary (le, spelled as vLLM spells it) that the burn-rate "
                  "rules count as meeting the SLO target of each sli (ttft, tpot). Always 1.",
                  dl + ["sli", "le"]),
        ]


#: Every metric name a PromQL expression may use from the operator (samples as scraped).
METRIC_NAMES: frozenset[str] = frozenset(
    [f.name for f in _DeploymentCollector._families()]
    + [f.name for f in slo_families()]
    + [
        "llama_operator_reconcile_duration_seconds_bucket",
        "llama_operator_reconcile_duration_seconds_count",
        "llama_operator_reconcile_duration_seconds_sum",
        "llama_operator_reconcile_errors_total",
        "llama_operator_plans_total",
        "llama_operator_slo_actions_total",
    ]
)


class OperatorMetrics:
    """The operator's metrics and the calls the kopf handlers make to keep them true.

    One instance per process (tests make their own). All methods are safe to call from the kopf
    event loop while the exporter thread serves scrapes.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconcile_duration = Histogram(
            "llama_operator_reconcile_duration_seconds",
            "Wall-clock time of one reconcile of a LlamaDeployment.",
            buckets=_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "llama_operator_reconcile_errors",
            "Reconciles that ended in an error (kopf will retry).",
            labelnames=_DEPLOYMENT_LABELS,
            registry=self.registry,
        )
        self.plans = Counter(
            "llama_operator_plans",
            "Planning passes by outcome: requested variant, fallback, infeasible, invalid spec.",
            labelnames=("outcome",),
            registry=self.registry,
        )
        # Zero-initialise every outcome so rate() has a starting point and dashboards show 0.
        for outcome in PLAN_OUTCOMES:
            self.plans.labels(outcome=outcome)
        self.slo_actions = Counter(
            "llama_operator_slo_actions",
            "What the SLO loop did on its own: ScaledOut, ScaledIn, Replanned, DraftOff.",
            labelnames=_DEPLOYMENT_LABELS + ("action",),
            registry=self.registry,
        )
        self._deployments = _DeploymentCollector()
        self.registry.register(self._deployments)
        self._slo = SLOCollector()
        self.registry.register(self._slo)
        self._server = None

    # --- calls from the handlers -------------------------------------------------------------

    def observe_reconcile(self, seconds: float, error: bool, namespace: str, name: str) -> None:
        """Record one reconcile: its duration, and an error for this deployment if it failed.

        The duration histogram has no labels on purpose: per-deployment latency histograms would
        multiply series by the number of deployments for a number nobody alerts on per object.
        """
        self.reconcile_duration.observe(max(0.0, float(seconds)))
        if error:
            self.reconcile_errors.labels(namespace=namespace, llamadeployment=name).inc()
        # A successful reconcile does not create the counter: after forget_deployment (deletion),
        # a late observation must not resurrect the deleted deployment's series.

    def record_plan_outcome(self, outcome: str) -> None:
        """Count one planning pass; `outcome` is one of :data:`PLAN_OUTCOMES`."""
        if outcome not in PLAN_OUTCOMES:
            raise ValueError(f"unknown plan outcome {outcome!r}; expected one of {PLAN_OUTCOMES}")
        self.plans.labels(outcome=outcome).inc()

    def set_deployment(
        self,
        namespace: str,
        name: str,
        *,
        phase: str,
        requested_model: str,
        model: Optional[str],
        quantization: Optional[str],
        runtime: Optional[str],
        gpu_product: Optional[str],
        fallback: bool,
        slo_ttft_s: Optional[float],
        slo_tpot_s: Optional[float],
        predicted_ttft_s: Optional[float],
        predicted_tpot_s: Optional[float],
        replicas_desired: int,
        replicas_ready: int,
    ) -> None:
        """Publish the current state of one LlamaDeployment, replacing whatever was published.

        Idempotent: calling it twice with the same arguments changes nothing. Calling it with a new
        phase or a new variant replaces the old label sets (the collector renders one record per
        deployment), so no stale series linger. ``None`` means "not known": a missing plan omits the
        predicted_* series, a missing SLO omits the slo_* series, and missing variant fields are
        rendered as empty label values (Prometheus treats an empty label as absent).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        for label, value in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        record = _DeploymentRecord(
            phase=phase,
            requested_model=requested_model or "",
            model=model or "",
            quantization=quantization or "",
            runtime=runtime or "",
            gpu_product=gpu_product or "",
            fallback=bool(fallback),
            slo_ttft_s=None if slo_ttft_s is None else float(slo_ttft_s),
            slo_tpot_s=None if slo_tpot_s is None else float(slo_tpot_s),
            predicted_ttft_s=None if predicted_ttft_s is None else float(predicted_ttft_s),
            predicted_tpot_s=None if predicted_tpot_s is None else float(predicted_tpot_s),
            replicas_desired=int(replicas_desired),
            replicas_ready=int(replicas_ready),
        )
        self._deployments.put((namespace, name), record)
        # Create the error counter at 0 so the first error is visible to rate()/increase().
        self.reconcile_errors.labels(namespace=namespace, llamadeployment=name)

    def set_slo(
        self,
        namespace: str,
        name: str,
        *,
        observed_ttft_s: Optional[float],
        observed_tpot_s: Optional[float],
        requests_running: Optional[float],
        requests_waiting: Optional[float],
        slo_met: Optional[bool],
        statistic: Optional[str],
        corrections: Sequence[tuple[str, str, float, float]],
        draft_acceptance: Optional[float] = None,
    ) -> None:
        """Publish what the SLO loop last observed of one LlamaDeployment and what it concluded.

        Replaces the previous record whole, like ``set_deployment``: ``None`` removes that series
        (``slo_met=None``, the SLOMet condition Unknown, renders no ``llama_operator_slo_met`` at
        all, so nothing alerts on missing data), and a correction left out of `corrections` (tuples
        of (variant, hardware, ttft_factor, tpot_factor), status.corrections) disappears.
        `statistic` is "p95" or "mean" (or observe.Observation.statistic); it labels both latencies.
        `draft_acceptance`: accepted over drafted tokens of the plan's draft (status.observed.draftAcceptanceRate).
        The action counters start at 0 here so the first action is visible to increase().
        """
        record = slo_record(
            observed_ttft_s=observed_ttft_s, observed_tpot_s=observed_tpot_s,
            requests_running=requests_running, requests_waiting=requests_waiting,
            slo_met=slo_met, statistic=statistic, corrections=corrections, draft_acceptance=draft_acceptance,
        )
        self._slo.put((namespace, name), record)
        for action in SLO_ACTIONS:
            self.slo_actions.labels(namespace=namespace, llamadeployment=name, action=action)

    def record_slo_action(self, namespace: str, name: str, action: str) -> None:
        """Count one thing the SLO loop did to a deployment; `action` is one of :data:`SLO_ACTIONS`."""
        if action not in SLO_ACTIONS:
            raise ValueError(f"unknown SLO action {action!r}; expected one of {SLO_ACTIONS}")
        self.slo_actions.labels(namespace=namespace, llamadeployment=name, action=action).inc()

    def forget_deployment(self, namespace: str, name: str) -> None:
        """Remove every series of a deleted LlamaDeployment: gauges, SLO figures, its counters."""
        self._deployments.drop((namespace, name))
        self._slo.drop((namespace, name))
        for counter, labels in [(self.reconcile_errors, (namespace, name))] + [
            (self.slo_actions, (namespace, name, action)) for action in SLO_ACTIONS
        ]:
            try:
                counter.remove(*labels)
            except KeyError:
                pass

    # --- exposition ----------------------------------------------------------------------------

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the HTTP exporter (`/metrics`, any path really) in a daemon thread.

        Returns the server; call ``shutdown()`` and ``server_close()`` on it to stop (tests do).
        Port 0 picks a free port: read it from ``server.server_port``.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server

    def render(self) -> str:
        """The exposition text a scrape would receive (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")

    def deployments(self) -> Iterator[tuple[str, str]]:
        """(namespace, name) of every deployment currently published."""
        return iter(sorted(self._deployments.snapshot()))
