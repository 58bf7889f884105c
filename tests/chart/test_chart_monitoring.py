"""Prometheus Operator and Grafana integration: ServiceMonitor (honorLabels), one PodMonitor per
runtime with the contract's relabelling, the PrometheusRule and dashboard ConfigMap wrapping the
files under charts/llama-operator/files/, and none of them by default."""
from __future__ import annotations

import json

import yaml

from chartkit import CHART, FULLNAME, NAMESPACE, WATCHED, by_kind, one

MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap")


def test_nothing_monitoring_by_default(scenario):
    docs = scenario("default")
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS]


def test_service_monitor_scrapes_the_operator_service_with_honor_labels(scenario):
    docs = scenario("all-on")
    sm = one(docs, "ServiceMonitor", FULLNAME)
    service = one(docs, "Service", FULLNAME)
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pod_monitors_one_per_runtime_with_relabelling(scenario):
    docs = scenario("all-on")
    monitors = {pm["spec"]["selector"]["matchLabels"]["llama-operator.dev/runtime"]: pm for pm in by_kind(docs, "PodMonitor")}
    assert set(monitors) == {"vllm", "llamacpp"}
    for runtime, pm in monitors.items():
        spec = pm["spec"]
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "llama-operator"
        assert spec["namespaceSelector"] == {"any": True}
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert relabel["llamadeployment"] == ["__meta_kubernetes_pod_label_llama_operator_dev_llamadeployment"]
        assert relabel["namespace"] == ["__meta_kubernetes_namespace"]


def test_pod_monitors_follow_the_watched_namespaces(scenario):
    for pm in by_kind(scenario("namespaced-all-on"), "PodMonitor"):
        assert pm["spec"]["namespaceSelector"] == {"matchNames": WATCHED}


def test_prometheus_rule_wraps_the_rule_file(scenario):
    rule = one(scenario("all-on"), "PrometheusRule", FULLNAME)
    source = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == (source.get("groups") or [])


def test_runbook_urls_can_point_at_your_own_copy_of_the_runbooks(render):
    _, docs = render("--set", "metrics.prometheusRule.enabled=true",
                     "--set", "metrics.prometheusRule.runbookBaseUrl=https://wiki.example.com/llm/alerts/")
    rules = [r for g in one(docs, "PrometheusRule", FULLNAME)["spec"]["groups"] for r in g["rules"] if "alert" in r]
    source = {r["alert"]: r for g in yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    assert rules and all("runbook_url" in (source[r["alert"]].get("annotations") or {}) for r in rules)
    for rule in rules:
        anchor = source[rule["alert"]]["annotations"]["runbook_url"].split("#")[1]
        assert rule["annotations"]["runbook_url"] == f"https://wiki.example.com/llm/alerts#{anchor}"
        assert {k: v for k, v in rule["annotations"].items() if k != "runbook_url"} == \
            {k: v for k, v in source[rule["alert"]]["annotations"].items() if k != "runbook_url"}


def test_dashboard_config_map_wraps_the_dashboard(scenario):
    cm = one(scenario("all-on"), "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    (content,) = cm["data"].values()
    source = (CHART / "files" / "dashboard.json").read_text()
    assert json.loads(content) == json.loads(source)


def test_dashboard_can_go_to_grafanas_namespace(render):
    _, docs = render("--set", "metrics.dashboard.enabled=true", "--set", "metrics.dashboard.namespace=monitoring")
    assert one(docs, "ConfigMap")["metadata"]["namespace"] == "monitoring"
