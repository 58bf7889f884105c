"""The SLO loop without data acts on nothing: an operator whose Prometheus is down says so in the SLOMet
condition (Unknown, NoData, with the source's error) and leaves a deployment three times over its planned
load as it is. (Every other bad answer, a 500, a slow or NaN or empty or stale one, a pod without metrics,
is turned into the same kind of problem by the sources: tests/alerts/test_observer_prometheus.py,
tests/integration/test_observer_pods.py; and a problem into no action: tests/unit/test_slo.py.)"""
from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest

from llama_operator.slo import SloSettings

from kit.examples import example_docs
from kit.operator import OperatorThread, fast_settings
from kit.poll import wait_until

pytestmark = pytest.mark.looptime(False)

SLO = SloSettings(window=timedelta(seconds=2), cooldown=timedelta(seconds=2), calm_window=timedelta(seconds=4),
                  correction_ttl=timedelta(hours=1))


def test_prometheus_down_is_no_data_and_no_action(llama_cluster, kubeconfig, kubelet):
    cluster = llama_cluster
    cluster.add_nodes("slo-loop")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    operator = OperatorThread(kubeconfig, settings=fast_settings(slo=SLO, slo_interval_seconds=0.5),
                              slo_source="prometheus", prometheus_url=down).start()
    try:
        busy = next(d for d in example_docs("slo-loop.yaml") if d["metadata"]["name"] == "busy")
        cluster.create(busy)

        def condition() -> dict:
            return next((c for c in cluster.status("busy").get("conditions") or [] if c["type"] == "SLOMet"), {})
        wait_until(lambda: condition().get("reason") == "NoData" and "cannot connect" in condition().get("message", ""),
                   30, "SLOMet to say Prometheus cannot be reached")
        time.sleep(4 * SLO.window.total_seconds())  # long past a window and a cooldown: still nothing done
        status = cluster.status("busy")
        assert condition()["status"] == "Unknown" and down in condition()["message"]
        assert status["replicas"] == 1 and not (status.get("slo") or {}).get("lastAction")
        assert not [e for e in cluster.events("busy") if e["reason"] in ("ScaledOut", "SLOBreached", "Replanned")]
    finally:
        operator.stop()
