"""The Grafana dashboard is valid JSON and its PromQL names only metrics that exist.

"Exist" means: exported by the operator (llama_operator.metrics.METRIC_NAMES), or by the runtimes,
as listed below from their sources. The rule file is held to the same standard (plus its own
recorded series and Prometheus' `up`), so a typo in a metric name cannot hide in either.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from llama_operator.metrics import METRIC_NAMES as OPERATOR_METRICS
from kit.paths import ROOT
from kit.tools import require_tool

DASHBOARD = ROOT / "charts" / "llama-operator" / "files" / "dashboard.json"
RULE_FILE = ROOT / "charts" / "llama-operator" / "files" / "prometheus-rules.yaml"


def _histogram(name: str) -> set[str]:
    return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}


#: vLLM's Prometheus metrics (vllm/v1/metrics/loggers.py, v0.6 to v0.11+; `vllm:` prefix).
VLLM_METRICS: set[str] = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
    "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:cache_config_info",
    # speculative decoding (vllm/v1/spec_decode/metrics.py:228-264, 0.34.0)
    "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
}
for _h in (
    "vllm:time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds",      # deprecated in 0.11
    "vllm:inter_token_latency_seconds",        # its successor (0.11+)
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:iteration_tokens_total",
):
    VLLM_METRICS |= _histogram(_h)

#: llama.cpp server metrics with `--metrics` (tools/server/server.cpp; `llamacpp:` prefix).
LLAMACPP_METRICS: set[str] = {
    "llamacpp:prompt_tokens_total", "llamacpp:prompt_seconds_total",
    "llamacpp:tokens_predicted_total", "llamacpp:tokens_predicted_seconds_total",
    "llamacpp:n_decode_total", "llamacpp:n_busy_slots_per_decode", "llamacpp:n_tokens_max",
    "llamacpp:prompt_tokens_seconds", "llamacpp:predicted_tokens_seconds",
    "llamacpp:kv_cache_usage_ratio", "llamacpp:kv_cache_tokens",
    "llamacpp:requests_processing", "llamacpp:requests_deferred",
    # speculative decoding (tools/server/server-task.cpp:1564-1625, b11434)
    "llamacpp:spec_decode_num_draft_tokens_total", "llamacpp:spec_decode_num_accepted_tokens_total",
    "llamacpp:spec_decode_num_drafts_total",
}

KNOWN_METRICS = set(OPERATOR_METRICS) | VLLM_METRICS | LLAMACPP_METRICS

#: Operator series without a per-deployment label.
OPERATOR_WIDE = {
    "llama_operator_deployments", "llama_operator_plans_total",
    "llama_operator_reconcile_duration_seconds_bucket", "llama_operator_reconcile_duration_seconds_count",
    "llama_operator_reconcile_duration_seconds_sum",
}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and label names excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                                            # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                                           # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _variable_queries(dashboard: dict) -> list[str]:
    queries = []
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            queries.append(query)
    return queries


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (namespace, le) (rate(vllm:time_to_first_token_seconds_bucket'
            '{namespace=~"$namespace",le="+Inf"}[5m])) or on (namespace) 1e5 * up) > bool 2')
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "up"}


def test_dashboard_is_valid_grafana_json():
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "llamadeployment"} <= set(variables)
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard["panels"]):
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        for target in panel.get("targets", []):
            assert target.get("refId"), panel["title"]
            # Per-deployment series follow the deployment variables; only operator-wide ones may not.
            names = metric_names(target.get("expr", ""))
            if names - OPERATOR_WIDE:
                assert '$llamadeployment' in target["expr"] and '$namespace' in target["expr"], (
                    f"{panel['title']}: {target['expr']} ignores the deployment variables")
    titles = " | ".join(p["title"] for p in _panels(dashboard["panels"]))
    for needed in ("Variant in force", "time to first token", "time per output token",
                   "tokens per second", "Replicas desired and ready"):
        assert needed.lower() in titles.lower(), f"no panel about {needed!r}: {titles}"


def test_dashboard_promql_names_only_known_metrics():
    dashboard = _dashboard()
    exprs = _exprs(dashboard)
    assert exprs, "the dashboard has no PromQL"
    problems = []
    for title, expr in exprs:
        names = metric_names(expr)
        if not names:
            problems.append(f"{title}: selects no metric: {expr}")
        for name in sorted(names - KNOWN_METRICS):
            problems.append(f"{title}: unknown metric {name!r} in {expr}")
    for query in _variable_queries(dashboard):
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
        assert inner, f"unexpected variable query {query!r}"
        for name in sorted(metric_names(inner.group(1)) - KNOWN_METRICS):
            problems.append(f"variable: unknown metric {name!r} in {query}")
    assert not problems, "\n".join(problems)


def test_dashboard_promql_parses(tmp_path):
    """Each expression (Grafana variables are plain strings in matchers) passes promtool's parser."""
    promtool = require_tool("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(_exprs(_dashboard()))
    ]}]}
    path = tmp_path / "dashboard-exprs.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_file_names_only_known_metrics():
    groups = yaml.safe_load(RULE_FILE.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    allowed = KNOWN_METRICS | recorded | {"up"}
    problems = [
        f"{rule.get('alert') or rule.get('record')}: unknown metric {name!r}"
        for rule in rules
        for name in sorted(metric_names(rule["expr"]) - allowed)
    ]
    assert not problems, "\n".join(problems)
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    # The contract's runtime series really are used by the rules.
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "llamacpp:predicted_tokens_seconds",
                 "llamacpp:requests_deferred", "llama_operator_slo_bucket_info"):
        assert name in used, name


@pytest.mark.parametrize("name", sorted(OPERATOR_METRICS))
def test_operator_metric_names_follow_conventions(name):
    assert name.startswith("llama_operator_") and ":" not in name
