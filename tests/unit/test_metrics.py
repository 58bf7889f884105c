"""The operator's metrics, asserted on the exposition text a scrape would receive."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from llama_operator.metrics import (
    METRIC_NAMES,
    PHASES,
    PLAN_OUTCOMES,
    SLO_ACTIONS,
    VLLM_TPOT_BUCKETS,
    VLLM_TTFT_BUCKETS,
    OperatorMetrics,
    format_le,
    slo_bucket,
)


def _deploy(m: OperatorMetrics, namespace: str = "team-a", name: str = "chat", **overrides) -> None:
    args = dict(
        phase="Ready",
        requested_model="meta-llama/Llama-3.1-70B-Instruct",
        model="meta-llama/Llama-3.1-70B-Instruct",
        quantization="fp8",
        runtime="vllm",
        gpu_product="NVIDIA-H100-80GB-HBM3",
        fallback=False,
        slo_ttft_s=0.8,
        slo_tpot_s=0.05,
        predicted_ttft_s=0.35,
        predicted_tpot_s=0.03,
        replicas_desired=2,
        replicas_ready=2,
    )
    args.update(overrides)
    m.set_deployment(namespace, name, **args)


def _slo(m: OperatorMetrics, namespace: str = "team-a", name: str = "chat", **overrides) -> None:
    args = dict(
        observed_ttft_s=0.9,
        observed_tpot_s=0.04,
        requests_running=6.5,
        requests_waiting=1.0,
        slo_met=False,
        statistic="p95",
        corrections=[("meta-llama/Llama-3.1-70B-Instruct/fp8", "2x NVIDIA-H100-80GB-HBM3", 1.4, 1.1)],
    )
    args.update(overrides)
    m.set_slo(namespace, name, **args)


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample called `name` in exposition `text`."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found


def _of(text: str, name: str, namespace: str = "team-a", deployment: str = "chat") -> list[tuple[dict, float]]:
    return [
        (labels, value)
        for labels, value in _samples(text, name)
        if labels.get("namespace") == namespace and labels.get("llamadeployment") == deployment
    ]


def test_uses_its_own_registry_not_the_global_one():
    m = OperatorMetrics()
    assert m.registry is not REGISTRY
    _deploy(m)
    OperatorMetrics()  # a second instance registers without "Duplicated timeseries"
    assert "llama_operator_deployment_phase" not in {f.name for f in REGISTRY.collect()}


def test_all_contract_metrics_are_exposed_with_their_types():
    m = OperatorMetrics()
    _deploy(m)
    _slo(m)
    m.observe_reconcile(0.2, False, "team-a", "chat")
    types = {f.name: f.type for f in text_string_to_metric_families(m.render())}
    assert types["llama_operator_reconcile_duration_seconds"] == "histogram"
    assert types["llama_operator_reconcile_errors"] == "counter"
    assert types["llama_operator_plans"] == "counter"
    assert types["llama_operator_slo_actions"] == "counter"
    for gauge in (
        "llama_operator_deployments", "llama_operator_deployment_phase", "llama_operator_deployment_info",
        "llama_operator_fallback_in_force", "llama_operator_slo_ttft_seconds", "llama_operator_slo_tpot_seconds",
        "llama_operator_predicted_ttft_seconds", "llama_operator_predicted_tpot_seconds",
        "llama_operator_replicas_desired", "llama_operator_replicas_ready", "llama_operator_slo_bucket_info",
        "llama_operator_observed_ttft_seconds", "llama_operator_observed_tpot_seconds",
        "llama_operator_observed_requests_running", "llama_operator_observed_requests_waiting",
        "llama_operator_slo_met", "llama_operator_correction_factor",
    ):
        assert types[gauge] == "gauge", gauge
    # METRIC_NAMES (used by the dashboard test) lists what is really exposed.
    exposed = {s.name for f in text_string_to_metric_families(m.render()) for s in f.samples}
    assert METRIC_NAMES <= exposed | {"llama_operator_reconcile_errors_total"}


def test_deployment_series_carry_the_contract_values():
    m = OperatorMetrics()
    _deploy(m, fallback=True, model="meta-llama/Llama-3.1-8B-Instruct", replicas_ready=1)
    text = m.render()
    assert _of(text, "llama_operator_deployment_info") == [({
        "namespace": "team-a", "llamadeployment": "chat",
        "requested_model": "meta-llama/Llama-3.1-70B-Instruct", "model": "meta-llama/Llama-3.1-8B-Instruct",
        "quantization": "fp8", "runtime": "vllm", "gpu_product": "NVIDIA-H100-80GB-HBM3",
    }, 1.0)]
    assert [v for _, v in _of(text, "llama_operator_fallback_in_force")] == [1.0]
    assert [v for _, v in _of(text, "llama_operator_slo_ttft_seconds")] == [0.8]
    assert [v for _, v in _of(text, "llama_operator_slo_tpot_seconds")] == [0.05]
    assert [v for _, v in _of(text, "llama_operator_predicted_ttft_seconds")] == [0.35]
    assert [v for _, v in _of(text, "llama_operator_predicted_tpot_seconds")] == [0.03]
    assert [v for _, v in _of(text, "llama_operator_replicas_desired")] == [2.0]
    assert [v for _, v in _of(text, "llama_operator_replicas_ready")] == [1.0]


def test_phase_change_leaves_exactly_one_phase_series():
    m = OperatorMetrics()
    for phase in ("Pending", "Deploying", "Unschedulable", "Deploying", "Ready"):
        _deploy(m, phase=phase)
    series = _of(m.render(), "llama_operator_deployment_phase")
    assert series == [({"namespace": "team-a", "llamadeployment": "chat", "phase": "Ready"}, 1.0)]


def test_variant_change_replaces_the_info_series():
    m = OperatorMetrics()
    _deploy(m)
    _deploy(m, model="meta-llama/Llama-3.1-8B-Instruct", quantization="int4", runtime="llamacpp",
            gpu_product=None, fallback=True)
    info = _of(m.render(), "llama_operator_deployment_info")
    assert len(info) == 1
    labels, _ = info[0]
    assert (labels["model"], labels["quantization"], labels["runtime"], labels["gpu_product"]) == (
        "meta-llama/Llama-3.1-8B-Instruct", "int4", "llamacpp", "")


def test_set_deployment_is_idempotent():
    m = OperatorMetrics()
    _deploy(m)
    first = m.render()
    _deploy(m)
    _deploy(m)
    assert _strip_created(m.render()) == _strip_created(first)


def _strip_created(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "_created" not in line)


def test_forget_removes_every_series_of_the_deployment():
    m = OperatorMetrics()
    _deploy(m, name="chat")
    _deploy(m, name="search")
    m.observe_reconcile(1.0, True, "team-a", "chat")
    m.forget_deployment("team-a", "chat")
    text = m.render()
    assert 'llamadeployment="chat"' not in text
    assert 'llamadeployment="search"' in text
    # A late successful reconcile observation does not resurrect the deleted deployment.
    m.observe_reconcile(0.1, False, "team-a", "chat")
    assert 'llamadeployment="chat"' not in m.render()
    m.forget_deployment("team-a", "chat")  # forgetting twice is harmless


def test_counts_per_phase_add_up():
    m = OperatorMetrics()
    phases = ["Ready", "Ready", "Ready", "Unschedulable", "Invalid", "Deploying", "Degraded"]
    for i, phase in enumerate(phases):
        _deploy(m, namespace=f"ns-{i % 2}", name=f"d{i}", phase=phase)
    _deploy(m, namespace="ns-0", name="d0", phase="Degraded")  # a phase change moves the count
    m.forget_deployment("ns-1", "d3")  # an Unschedulable one is deleted
    counts = {labels["phase"]: value for labels, value in _samples(m.render(), "llama_operator_deployments")}
    assert set(counts) == set(PHASES)  # zeros included
    assert counts == {"Pending": 0, "Deploying": 1, "Ready": 2, "Degraded": 2, "Unschedulable": 0, "Invalid": 1}
    assert sum(counts.values()) == len(list(m.deployments())) == 6
    per_deployment = _samples(m.render(), "llama_operator_deployment_phase")
    assert len(per_deployment) == 6


def test_plan_outcomes_start_at_zero_and_count():
    m = OperatorMetrics()
    outcomes = {labels["outcome"]: v for labels, v in _samples(m.render(), "llama_operator_plans_total")}
    assert outcomes == {o: 0.0 for o in PLAN_OUTCOMES}
    m.record_plan_outcome("fallback")
    m.record_plan_outcome("fallback")
    m.record_plan_outcome("requested")
    outcomes = {labels["outcome"]: v for labels, v in _samples(m.render(), "llama_operator_plans_total")}
    assert outcomes == {"requested": 1.0, "fallback": 2.0, "infeasible": 0.0, "invalid": 0.0}
    with pytest.raises(ValueError):
        m.record_plan_outcome("maybe")


def test_reconcile_duration_and_errors():
    m = OperatorMetrics()
    _deploy(m)
    m.observe_reconcile(0.02, False, "team-a", "chat")
    m.observe_reconcile(3.0, True, "team-a", "chat")
    m.observe_reconcile(0.5, True, "team-a", "chat")
    text = m.render()
    count = _samples(text, "llama_operator_reconcile_duration_seconds_count")
    assert count == [({}, 3.0)]  # no labels on the duration histogram
    assert [v for _, v in _of(text, "llama_operator_reconcile_errors_total")] == [2.0]


def test_error_counter_exists_at_zero_once_a_deployment_is_published():
    m = OperatorMetrics()
    _deploy(m)
    assert [v for _, v in _of(m.render(), "llama_operator_reconcile_errors_total")] == [0.0]


def test_unknown_phase_and_bad_targets_are_rejected():
    m = OperatorMetrics()
    with pytest.raises(ValueError):
        _deploy(m, phase="Running")
    with pytest.raises(ValueError):
        _deploy(m, slo_ttft_s=0)
    assert list(m.deployments()) == []


def test_missing_plan_and_slo_omit_their_series():
    m = OperatorMetrics()
    _deploy(m, phase="Invalid", model=None, quantization=None, runtime=None, gpu_product=None,
            slo_ttft_s=None, slo_tpot_s=None, predicted_ttft_s=None, predicted_tpot_s=None,
            replicas_desired=0, replicas_ready=0)
    text = m.render()
    for name in ("llama_operator_slo_ttft_seconds", "llama_operator_slo_tpot_seconds",
                 "llama_operator_predicted_ttft_seconds", "llama_operator_predicted_tpot_seconds",
                 "llama_operator_slo_bucket_info"):
        assert _of(text, name) == [], name
    assert _of(text, "llama_operator_deployment_phase")[0][0]["phase"] == "Invalid"


# --- the SLO bucket the burn-rate rules join on ---------------------------------------------------

def test_le_is_spelled_like_vllm():
    # vLLM (Python prometheus-client) writes le="1.0", le="0.25", le="2560.0".
    assert [format_le(b) for b in (1.0, 0.25, 2560.0, 0.001, 10)] == ["1.0", "0.25", "2560.0", "0.001", "10.0"]


@pytest.mark.parametrize(
    "target, buckets, expected",
    [
        (1.0, VLLM_TTFT_BUCKETS, 1.0),      # exactly a boundary
        (0.8, VLLM_TTFT_BUCKETS, 0.75),     # between boundaries: the one below (conservative)
        (3.0, VLLM_TTFT_BUCKETS, 2.5),
        (0.0005, VLLM_TTFT_BUCKETS, 0.001),  # below the smallest: the smallest
        (5000, VLLM_TTFT_BUCKETS, 2560.0),
        (0.05, VLLM_TPOT_BUCKETS, 0.05),
        (0.06, VLLM_TPOT_BUCKETS, 0.05),
        (0.005, VLLM_TPOT_BUCKETS, 0.01),
    ],
)
def test_slo_bucket_is_the_largest_boundary_at_or_below_the_target(target, buckets, expected):
    assert slo_bucket(target, buckets) == expected


def test_bucket_info_only_for_vllm_and_follows_the_target():
    m = OperatorMetrics()
    _deploy(m, slo_ttft_s=0.8, slo_tpot_s=0.06)
    info = {labels["sli"]: labels["le"] for labels, _ in _of(m.render(), "llama_operator_slo_bucket_info")}
    assert info == {"ttft": "0.75", "tpot": "0.05"}
    _deploy(m, slo_ttft_s=2.0, slo_tpot_s=0.1)  # target changed: the old le disappears
    info = [labels for labels, _ in _of(m.render(), "llama_operator_slo_bucket_info")]
    assert sorted((i["sli"], i["le"]) for i in info) == [("tpot", "0.1"), ("ttft", "1.0")]
    _deploy(m, runtime="llamacpp")  # llama.cpp has no histograms to join
    assert _of(m.render(), "llama_operator_slo_bucket_info") == []


# --- the SLO loop's figures and actions ------------------------------------------------------------

_SLO_SERIES = (
    "llama_operator_observed_ttft_seconds", "llama_operator_observed_tpot_seconds",
    "llama_operator_observed_requests_running", "llama_operator_observed_requests_waiting",
    "llama_operator_slo_met", "llama_operator_correction_factor",
)


def _slo_series(text: str, namespace: str = "team-a", deployment: str = "chat") -> set[tuple]:
    """Every SLO gauge sample of one deployment as (name, labels other than the deployment's, value)."""
    out = set()
    for name in _SLO_SERIES:
        for labels, value in _of(text, name, namespace, deployment):
            rest = tuple(sorted((k, v) for k, v in labels.items() if k not in ("namespace", "llamadeployment")))
            out.add((name, rest, value))
    return out


def test_set_slo_renders_exactly_the_expected_series():
    m = OperatorMetrics()
    _slo(m)
    variant, hardware = "meta-llama/Llama-3.1-70B-Instruct/fp8", "2x NVIDIA-H100-80GB-HBM3"
    assert _slo_series(m.render()) == {
        ("llama_operator_observed_ttft_seconds", (("statistic", "p95"),), 0.9),
        ("llama_operator_observed_tpot_seconds", (("statistic", "p95"),), 0.04),
        ("llama_operator_observed_requests_running", (), 6.5),
        ("llama_operator_observed_requests_waiting", (), 1.0),
        ("llama_operator_slo_met", (), 0.0),
        ("llama_operator_correction_factor", (("hardware", hardware), ("sli", "ttft"), ("variant", variant)), 1.4),
        ("llama_operator_correction_factor", (("hardware", hardware), ("sli", "tpot"), ("variant", variant)), 1.1),
    }
    # set_slo alone publishes no deployment gauges: the two records are independent.
    assert _of(m.render(), "llama_operator_deployment_phase") == []


def test_slo_met_true_is_1_and_unknown_is_absent():
    m = OperatorMetrics()
    _slo(m, slo_met=True)
    assert _of(m.render(), "llama_operator_slo_met") == [({"namespace": "team-a", "llamadeployment": "chat"}, 1.0)]
    _slo(m, slo_met=None)
    assert _of(m.render(), "llama_operator_slo_met") == []


def test_replacing_the_slo_record_drops_old_label_sets():
    m = OperatorMetrics()
    _slo(m)
    # The deployment moved to llama.cpp: means instead of p95s, no TPOT yet, no load figures, the old
    # correction expired and another one was measured.
    _slo(m, observed_ttft_s=2.0, observed_tpot_s=None, requests_running=None, requests_waiting=None,
         slo_met=True, statistic="mean", corrections=[("meta-llama/Llama-3.1-8B-Instruct/q4_k_m", "cpu", 2.0, 1.5)])
    assert _slo_series(m.render()) == {
        ("llama_operator_observed_ttft_seconds", (("statistic", "mean"),), 2.0),
        ("llama_operator_slo_met", (), 1.0),
        ("llama_operator_correction_factor",
         (("hardware", "cpu"), ("sli", "ttft"), ("variant", "meta-llama/Llama-3.1-8B-Instruct/q4_k_m")), 2.0),
        ("llama_operator_correction_factor",
         (("hardware", "cpu"), ("sli", "tpot"), ("variant", "meta-llama/Llama-3.1-8B-Instruct/q4_k_m")), 1.5),
    }
    # Nothing observed at all (no traffic): every gauge goes, whatever statistic is passed.
    _slo(m, observed_ttft_s=None, observed_tpot_s=None, requests_running=None, requests_waiting=None,
         slo_met=None, statistic=None, corrections=[])
    assert _slo_series(m.render()) == set()


def test_set_slo_is_idempotent_and_per_deployment():
    m = OperatorMetrics()
    _slo(m, name="chat")
    _slo(m, name="search", slo_met=True)
    first = m.render()
    _slo(m, name="chat")
    assert _strip_created(m.render()) == _strip_created(first)
    assert [v for _, v in _of(first, "llama_operator_slo_met", deployment="search")] == [1.0]
    assert [v for _, v in _of(first, "llama_operator_slo_met", deployment="chat")] == [0.0]


def test_statistic_accepts_the_observation_spelling():
    observe = pytest.importorskip("llama_operator.observe")
    m = OperatorMetrics()
    _slo(m, statistic=observe.MEAN_FROM_COUNTERS)
    assert {labels["statistic"] for labels, _ in _of(m.render(), "llama_operator_observed_tpot_seconds")} == {"mean"}
    _slo(m, statistic=observe.P95_FROM_BUCKETS)
    assert {labels["statistic"] for labels, _ in _of(m.render(), "llama_operator_observed_tpot_seconds")} == {"p95"}


@pytest.mark.parametrize("overrides", [
    dict(statistic=None),                       # a latency nobody can tell p95 from mean
    dict(statistic="p99"),
    dict(observed_ttft_s=float("nan")),
    dict(observed_tpot_s=-0.1),
    dict(requests_waiting=float("inf")),
    dict(corrections=[("m/q", "cpu", 0.0, 1.0)]),
    dict(corrections=[("m/q", "cpu", 1.2, 1.0), ("m/q", "cpu", 1.3, 1.0)]),  # one label set twice
])
def test_set_slo_refuses_what_it_cannot_render_honestly(overrides):
    m = OperatorMetrics()
    _slo(m)
    before = m.render()
    with pytest.raises(ValueError):
        _slo(m, **overrides)
    assert _strip_created(m.render()) == _strip_created(before)  # the previous record stays


def test_slo_actions_start_at_zero_and_count():
    m = OperatorMetrics()
    assert _samples(m.render(), "llama_operator_slo_actions_total") == []
    _slo(m)
    actions = {labels["action"]: v for labels, v in _of(m.render(), "llama_operator_slo_actions_total")}
    assert actions == {a: 0.0 for a in SLO_ACTIONS} == {"ScaledOut": 0.0, "ScaledIn": 0.0, "Replanned": 0.0,
                                                             "DraftOff": 0.0}
    m.record_slo_action("team-a", "chat", "ScaledOut")
    m.record_slo_action("team-a", "chat", "ScaledOut")
    m.record_slo_action("team-a", "chat", "Replanned")
    _slo(m, slo_met=True)  # a new record does not reset the counter
    actions = {labels["action"]: v for labels, v in _of(m.render(), "llama_operator_slo_actions_total")}
    assert actions == {"ScaledOut": 2.0, "ScaledIn": 0.0, "Replanned": 1.0, "DraftOff": 0.0}
    with pytest.raises(ValueError):
        m.record_slo_action("team-a", "chat", "Restarted")


def test_forget_removes_the_slo_series_and_action_counters():
    m = OperatorMetrics()
    for name in ("chat", "search"):
        _deploy(m, name=name)
        _slo(m, name=name)
        m.record_slo_action("team-a", name, "ScaledIn")
    m.forget_deployment("team-a", "chat")
    text = m.render()
    assert 'llamadeployment="chat"' not in text
    assert len(_of(text, "llama_operator_slo_actions_total", deployment="search")) == len(SLO_ACTIONS)
    assert _slo_series(text, deployment="search")
    m.forget_deployment("team-a", "chat")  # forgetting twice is harmless


# --- the HTTP exporter ------------------------------------------------------------------------------

def test_serve_exposes_the_render_over_http():
    m = OperatorMetrics()
    _deploy(m)
    server = m.serve(0, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'llama_operator_deployment_phase{llamadeployment="chat",namespace="team-a",phase="Ready"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()


def test_phases_match_the_api():
    """The alert rules select phases by name; metrics.py and the CRD's status must agree on them."""
    status = pytest.importorskip("llama_operator.status")
    assert tuple(status.PHASES) == PHASES
