"""The SLO loop end to end (docs/slo-loop.md): the operator observes the sandbox's simulated engines, which
serve real Prometheus /metrics on 127.0.x.y in each engine's own format, with latency = the plan's estimate x
the latency-factor annotation and load = concurrency x replicas x the load-factor annotation.

The issue's "done when", as a user sees it: a deployment whose engine runs 4x slower than predicted is
corrected and re-planned; one with three times the planned load scales out to its maxReplicas with a
ScaledOut Event; one that meets its SLO is left alone. Then a restarted operator keeps the corrections and
does not act again; and the same loop with a real Prometheus server (Debian's) scraping the engines as its
source.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from llama_operator.ownership import LABEL_DEPLOYMENT, LABEL_RUNTIME, MANAGED_BY, PORTS
from llama_operator.slo import SloSettings

from kit.examples import example_docs
from kit.operator import OperatorThread, fast_settings
from kit.poll import wait_until
from kit.prometheus import running_prometheus

pytestmark = pytest.mark.looptime(False)

SLO = SloSettings(window=timedelta(seconds=4), cooldown=timedelta(seconds=8), calm_window=timedelta(seconds=10),
                  correction_ttl=timedelta(hours=1), min_samples=3)
SETTINGS = dict(slo=SLO, slo_interval_seconds=0.5)
SLOW, BUSY, MEETS = "slow-engine", "busy", "meets-slo"


def _slo_reasons(cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.events(name)
            if e["reason"] in ("SLOBreached", "ScaledOut", "ScaledIn", "Replanned", "Degraded")]


def _met(status: dict) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == "SLOMet"), {})


def _apply_examples(cluster) -> None:
    for doc in example_docs("slo-loop.yaml"):
        cluster.create(doc)


def _wait_for_the_loop(cluster, timeout: float = 120) -> None:
    def done() -> bool:
        slow, busy, meets = (cluster.status(n) for n in (SLOW, BUSY, MEETS))
        return bool(slow.get("corrections")) and slow.get("phase") == "Ready" and \
            (busy.get("slo") or {}).get("replicas") == 3 and busy.get("phase") == "Ready" and \
            _met(meets).get("status") == "True"
    wait_until(done, timeout, "the loop to correct slow-engine, scale busy out and see meets-slo met")


def test_a_slow_engine_is_replanned_a_busy_one_scaled_out_and_one_that_meets_left_alone(llama_cluster, kubeconfig,
                                                                                           kubelet):
    cluster = llama_cluster
    cluster.add_nodes("slo-loop")
    operator = OperatorThread(kubeconfig, settings=fast_settings(**SETTINGS), slo_source="pods").start()
    try:
        _apply_examples(cluster)
        _wait_for_the_loop(cluster)
    finally:
        operator.stop()

    slow = cluster.status(SLOW)
    (correction,) = slow["corrections"]
    assert correction["variant"] == "llama-3.1-8b-instruct/f16" and correction["hardware"] == "1x NVIDIA-L4"
    assert 3.8 <= correction["tpotFactor"] <= 4.2 and correction["samples"] > 0  # the latency-factor 4, measured
    assert slow["variant"] != "llama-3.1-8b-instruct/f16"  # moved to a rung that meets the SLO corrected
    replanned = [e["message"] for e in cluster.events(SLOW) if e["reason"] == "Replanned"]
    assert replanned and "TPOT mean" in replanned[0] and "(target 200ms)" in replanned[0]
    assert _slo_reasons(cluster, SLOW)[:2] == ["SLOBreached", "Replanned"]

    busy = cluster.status(BUSY)
    assert busy["replicas"] == 3 and busy["ready"] == "3/3" and busy["slo"]["lastAction"] == "ScaledOut"
    deployment = cluster.resource("apps/v1", "Deployment").get(name=BUSY, namespace="default").to_dict()
    assert deployment["spec"]["replicas"] == 3  # within maxReplicas 3
    scaled = [e["message"] for e in cluster.events(BUSY) if e["reason"] == "ScaledOut"]
    # One step when the first window already shows all 24 requests; two when it caught the load still building.
    assert 1 <= len(scaled) <= 2 and "waiting for 8 planned" in scaled[0], scaled
    assert scaled[-1].endswith("to 3 replica(s) (maxReplicas 3)"), scaled
    assert "Degraded" not in _slo_reasons(cluster, BUSY)

    meets = cluster.status(MEETS)
    assert _slo_reasons(cluster, MEETS) == [] and not meets.get("corrections")
    assert meets["variant"] == "llama-3.1-8b-instruct/bf16" and meets["replicas"] == 1
    assert meets["observed"]["source"] == "pods" and meets["observed"]["statistic"] == "p95 from histogram buckets"
    assert meets["observed"]["ttftP95Seconds"] < 1.0 and meets["observed"]["requestsRunning"] == 4

    # A restarted operator reads the corrections and the loop's timers back from status: no second action,
    # the plan in force stays, the scaled replicas stay.
    before = {n: cluster.status(n) for n in (SLOW, BUSY)}
    events_before = {n: _slo_reasons(cluster, n) for n in (SLOW, BUSY)}
    operator = OperatorThread(kubeconfig, settings=fast_settings(**SETTINGS), slo_source="pods").start()
    try:
        wait_until(lambda: _met(cluster.status(BUSY)).get("lastTransitionTime") is not None and
                   cluster.status(BUSY).get("observed", {}).get("sampledAt") != before[BUSY]["observed"]["sampledAt"],
                   30, "the restarted operator to observe again")
        time.sleep(SLO.window.total_seconds())
        for name in (SLOW, BUSY):
            now = cluster.status(name)
            assert now["corrections"] == before[name]["corrections"]
            assert now["slo"].get("lastActionAt") == before[name]["slo"].get("lastActionAt")
            assert now["variant"] == before[name]["variant"] and now["replicas"] == before[name]["replicas"]
            assert _slo_reasons(cluster, name) == events_before[name]
    finally:
        operator.stop()


# --- The same loop with a real Prometheus as its source ------------------------------------------------------


class PodTargets:
    """Prometheus's file_sd targets for the operator's model pods, kept in step with the cluster (the job a
    PodMonitor does in a real cluster: the pod's address, and the namespace, llamadeployment and pod labels)."""

    def __init__(self, cluster, path: Path):
        self.cluster, self.path = cluster, path
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def write(self) -> None:
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        groups = []
        for pod in self.cluster.pods.get(namespace="default", label_selector=selector).to_dict()["items"]:
            ip, labels = (pod.get("status") or {}).get("podIP"), pod["metadata"]["labels"]
            if ip:
                groups.append({"targets": [f"{ip}:{PORTS[labels[LABEL_RUNTIME]]}"],
                               "labels": {"namespace": "default", "llamadeployment": labels[LABEL_DEPLOYMENT],
                                          "pod": pod["metadata"]["name"]}})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.write()
            except Exception:  # noqa: BLE001 - the emulator may be stopping
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_loop_reads_a_real_prometheus_and_scales_out(llama_cluster, kubeconfig, kubelet, tmp_path):
    cluster = llama_cluster
    cluster.add_nodes("slo-loop")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "model-servers", "honor_labels": True,
                                  "file_sd_configs": [{"files": [str(tmp_path / "pods.json")],
                                                       "refresh_interval": "1s"}]}]}
    targets = PodTargets(cluster, tmp_path / "pods.json")
    try:
        with running_prometheus(config, tmp_path) as prometheus:
            operator = OperatorThread(kubeconfig, settings=fast_settings(**SETTINGS), slo_source="prometheus",
                                      prometheus_url=prometheus.url).start()
            try:
                for doc in example_docs("slo-loop.yaml"):
                    if doc["metadata"]["name"] in (BUSY, MEETS):
                        cluster.create(doc)
                wait_until(lambda: (cluster.status(BUSY).get("slo") or {}).get("replicas") == 3 and
                           _met(cluster.status(MEETS)).get("status") == "True", 120,
                           "busy to scale out and meets-slo to be met, from Prometheus's figures")
                busy, meets = cluster.status(BUSY), cluster.status(MEETS)
                assert busy["observed"]["source"] == "prometheus" and meets["observed"]["source"] == "prometheus"
                assert [e["reason"] for e in cluster.events(BUSY) if e["reason"] == "ScaledOut"] == ["ScaledOut"]
                assert _slo_reasons(cluster, MEETS) == []
                assert 0.1 < meets["observed"]["ttftP95Seconds"] < 1.0  # the engine's p95, through rate() and buckets
            finally:
                operator.stop()
    finally:
        targets.stop()
