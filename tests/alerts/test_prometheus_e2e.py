"""End to end: a real Prometheus scrapes a simulated vLLM and the operator, and evaluates the rules.

What it proves that promtool's unit tests cannot:
- the shipped rule file loads into a real server, unchanged;
- the operator's exporter (metrics.py, served over HTTP) is scraped and its series join with vLLM's
  (`namespace`/`llamadeployment` added by the scrape config, as the PodMonitor does; the operator's
  own labels kept by honor_labels);
- the p95 TTFT alert goes pending (state pending or firing: its `for: 10m` is too long to wait for,
  and pending happens on the first evaluation where the expression is true) for the slow deployment,
  and not for the healthy one with the same target;
- so does the SLO loop's alert (LlamaDeploymentSLOBreached, `for: 15m`), from the operator's
  `set_slo` series alone, with the observed figure and the target in its description.

Everything listens on 127.0.0.1 on free ports; everything started is stopped afterwards.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from llama_operator.metrics import VLLM_TPOT_BUCKETS, VLLM_TTFT_BUCKETS, OperatorMetrics, format_le
from kit.http_stub import Reply, Request, Serve, stub_servers
from kit.paths import ROOT
from kit.prometheus import running_prometheus

RULE_FILE = ROOT / "charts" / "llama-operator" / "files" / "prometheus-rules.yaml"
TOTAL_BUDGET_S = 60.0
ALERT = "LlamaDeploymentTTFTAboveTarget"
SLO_ALERT = "LlamaDeploymentSLOBreached"


class FakeVLLM:
    """A plain-text /metrics endpoint imitating one vLLM server (colons intact, see TOOLCHAIN.md).

    Every scrape records `requests_per_scrape` more requests, all with the same TTFT and inter-token
    latency, so rate() over the histograms is non-zero from the second scrape on.
    """

    def __init__(self, serve: Serve, model: str, ttft_s: float, itl_s: float, requests_per_scrape: int = 5):
        """`serve` is kit.http_stub.stub_servers()'s: it starts the server, and stops it with the test."""
        self.model = model
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.per_scrape = requests_per_scrape
        self.requests = 0
        self._lock = threading.Lock()
        self.port = serve(self.answer).port

    def answer(self, request: Request) -> Reply:
        if request.path.split("?")[0] != "/metrics":
            return Reply(404)
        return Reply(body=self.scrape())

    def _histogram(self, name: str, help_text: str, buckets, value: float, count: int) -> list[str]:
        labels = f'engine="0",model_name="{self.model}"'
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for boundary in buckets:
            n = count if value <= boundary else 0
            lines.append(f'{name}_bucket{{{labels},le="{format_le(boundary)}"}} {float(n)}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(count)}')
        lines.append(f"{name}_count{{{labels}}} {float(count)}")
        lines.append(f"{name}_sum{{{labels}}} {value * count}")
        return lines

    def scrape(self) -> str:
        with self._lock:
            self.requests += self.per_scrape
            requests = self.requests
        tokens = requests * 20
        labels = f'engine="0",model_name="{self.model}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} 2.0",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(tokens)}",
        ]
        lines += self._histogram("vllm:time_to_first_token_seconds",
                                 "Histogram of time to first token in seconds.",
                                 VLLM_TTFT_BUCKETS, self.ttft_s, requests)
        lines += self._histogram("vllm:inter_token_latency_seconds",
                                 "Histogram of inter-token latency in seconds.",
                                 VLLM_TPOT_BUCKETS, self.itl_s, tokens)
        return "\n".join(lines) + "\n"


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def _set_deployment(metrics: OperatorMetrics, name: str, model: str) -> None:
    metrics.set_deployment(
        "team-a", name, phase="Ready", requested_model=model, model=model, quantization="bf16",
        runtime="vllm", gpu_product="NVIDIA-L4", fallback=False,
        slo_ttft_s=1.0, slo_tpot_s=0.1, predicted_ttft_s=0.4, predicted_tpot_s=0.03,
        replicas_desired=1, replicas_ready=1,
    )


@pytest.fixture
def operator_metrics():
    metrics = OperatorMetrics()
    _set_deployment(metrics, "slow", "meta-llama/Llama-3.1-70B-Instruct")
    _set_deployment(metrics, "healthy", "meta-llama/Llama-3.1-8B-Instruct")
    # The SLO loop's verdicts, as it would publish them from what the fake servers report.
    for name, ttft_s, met in (("slow", 3.0, False), ("healthy", 0.05, True)):
        metrics.set_slo("team-a", name, observed_ttft_s=ttft_s, observed_tpot_s=0.03, requests_running=2.0,
                        requests_waiting=0.0, slo_met=met, statistic="p95", corrections=[])
    server = metrics.serve(0, host="127.0.0.1")
    yield server.server_port
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_vllms():
    with stub_servers() as serve:
        yield {"slow": FakeVLLM(serve, "meta-llama/Llama-3.1-70B-Instruct", ttft_s=3.0, itl_s=0.03),
               "healthy": FakeVLLM(serve, "meta-llama/Llama-3.1-8B-Instruct", ttft_s=0.05, itl_s=0.03)}


def _prometheus_config(operator_port: int, vllms: dict[str, FakeVLLM]) -> dict:
    vllm_targets = [
        {
            "targets": [f"127.0.0.1:{server.port}"],
            # What the chart's PodMonitor relabelings add from the pod.
            "labels": {"namespace": "team-a", "llamadeployment": name, "runtime": "vllm", "pod": f"{name}-0"},
        }
        for name, server in vllms.items()
    ]
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULE_FILE)],
        "scrape_configs": [
            {
                # Like the chart's ServiceMonitor: job "llama-operator", honorLabels.
                "job_name": "llama-operator",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
            },
            {
                "job_name": "llama-system/llama-operator-vllm",
                "static_configs": vllm_targets,
            },
        ],
    }


def test_ttft_alert_pending_for_the_slow_deployment_only(tmp_path: Path, operator_metrics, fake_vllms):
    started = time.monotonic()
    deadline = started + TOTAL_BUDGET_S
    with running_prometheus(_prometheus_config(operator_metrics, fake_vllms), tmp_path) as prometheus:
        base = prometheus.url
        alerts: list[dict] = []
        while time.monotonic() < deadline:
            prometheus.assert_running()
            alerts = _get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
            states = {
                (a["labels"].get("alertname"), a["labels"].get("llamadeployment")): a["state"]
                for a in alerts
            }
            for name in (ALERT, SLO_ALERT):
                assert (name, "healthy") not in states, f"{name} is {states[name, 'healthy']} for team-a/healthy"
            if {states.get((ALERT, "slow")), states.get((SLO_ALERT, "slow"))} <= {"pending", "firing"}:
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"{ALERT} and {SLO_ALERT} not both pending for team-a/slow within {TOTAL_BUDGET_S}s; alerts: {alerts}\n"
                f"p95: {_query(base, 'llamadeployment:vllm_ttft_seconds:p95_rate5m')}\n"
                f"targets: {_query(base, 'llama_operator_slo_ttft_seconds')}\n"
                f"up: {_query(base, 'up')}\n"
                f"log:\n{prometheus.log()}"
            )

        slow = next(a for a in alerts if a["labels"].get("alertname") == ALERT)
        assert slow["labels"]["namespace"] == "team-a"
        assert slow["labels"]["severity"] == "warning"
        assert "4.875s" in slow["annotations"]["description"], slow["annotations"]
        assert "spec.slo.ttftP95 = 1s" in slow["annotations"]["description"], slow["annotations"]
        breached = next(a for a in alerts if a["labels"].get("alertname") == SLO_ALERT)
        assert (breached["labels"]["namespace"], breached["labels"]["llamadeployment"]) == ("team-a", "slow")
        assert "time to first token p95 3s against spec.slo.ttftP95 = 1s" in breached["annotations"]["description"], (
            breached["annotations"])

        # One more evaluation later the healthy deployment, same 1s target, is still not alerting,
        # and its observed p95 is really below the target (the join did not just drop it).
        time.sleep(1.5)
        alerts = _get_json(f"{base}/api/v1/alerts")["data"]["alerts"]
        assert not [a for a in alerts if a["labels"].get("alertname") == ALERT
                    and a["labels"].get("llamadeployment") == "healthy"]
        p95 = {r["metric"]["llamadeployment"]: float(r["value"][1])
               for r in _query(base, "llamadeployment:vllm_ttft_seconds:p95_rate5m")}
        assert p95["healthy"] < 1.0 < p95["slow"], p95
        assert time.monotonic() - started <= TOTAL_BUDGET_S


def _query(base: str, expr: str) -> list[dict]:
    try:
        url = f"{base}/api/v1/query?query={urllib.request.quote(expr)}"
        return _get_json(url)["data"]["result"]
    except OSError as exc:  # diagnostics only
        return [{"error": str(exc)}]
