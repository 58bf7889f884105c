"""A namespaced operator (`run --namespace team-a`) and the Pods of other namespaces.

kopf watches namespaced kinds only in the watched namespaces, Pods included: the GPU a pod of another
namespace holds looks free, and a plan counts on it. With `--pods-all-namespaces` (the chart passes it in
a namespaced install, whose ClusterRole grants list and watch on pods) the operator reads the Pods of
every namespace all the same (runner.ClusterPods): listed before the first pass, then watched.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from llama_operator.state import Settings

from kit.cluster import Cluster
from kit.nodes import node_manifest
from kit.operator import OperatorThread

pytestmark = pytest.mark.looptime(False)

TEAM = "team-a"
#: Llama 3.2 1B on one L4, vLLM only, nothing smaller or on CPU: the one L4 or nothing.
SPEC = {"model": "llama-3.2-1b-instruct", "runtime": "vllm", "memoryBudget": "20Gi", "contextLength": 4096,
        "slo": {"ttftP95": "5s", "tpotP95": "500ms", "promptTokens": 256},
        "fallback": {"allowCPU": False, "allowSmallerModels": False}}


def _ld(name: str) -> dict:
    return {"apiVersion": "llama-operator.dev/v1alpha1", "kind": "LlamaDeployment",
            "metadata": {"name": name, "namespace": TEAM}, "spec": SPEC}


def _gpu_pod(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "training", "namespace": namespace},
            "spec": {"nodeName": "l4", "containers": [{"name": "t", "image": "busybox",
                                                      "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
            "status": {"phase": "Running"}}


def _start(kubeconfig: Path, *, all_pods: bool) -> OperatorThread:
    op = OperatorThread(kubeconfig, settings=Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=30),
                        watch_timeout=60, namespaces=[TEAM], pods_all_namespaces=all_pods)
    return op.start(timeout=20)


@pytest.fixture
def cluster(llama_cluster: Cluster) -> Cluster:
    team = Cluster(llama_cluster.kubeconfig, namespace=TEAM)
    team.add_nodes([node_manifest("l4", "NVIDIA-L4", 1, memory_mib=23034, compute="8.9", cpu="16",
                                  memory="64Gi")])
    team.pods.create(body=_gpu_pod("batch"), namespace="batch")  # another namespace holds the only L4
    yield team
    team.close()


def test_a_namespaced_operator_counts_the_gpus_other_namespaces_hold(cluster: Cluster, kubeconfig: Path):
    op = _start(kubeconfig, all_pods=True)
    try:
        cluster.llamas.create(body=_ld("chat"), namespace=TEAM)
        st = cluster.wait_phase("chat", "Unschedulable", timeout=20)
        assert "only 0 such placement(s) are free" in st["message"], st
        # the watch: the other namespace's pod goes, the GPU is free, the plan follows
        cluster.pods.delete(name="training", namespace="batch")
        st = cluster.wait_status("chat", lambda s: (s.get("plan") or {}).get("gpuProduct") == "NVIDIA-L4",
                                 timeout=20, what="chat to plan on the freed L4")
        # and back: a new pod elsewhere taking the GPU is seen as well (the plan in force keeps its GPU,
        # so a second deployment finds none)
        cluster.pods.create(body=_gpu_pod("batch"), namespace="batch")
        cluster.llamas.create(body=_ld("second"), namespace=TEAM)
        cluster.wait_phase("second", "Unschedulable", timeout=20)
    finally:
        op.stop()


def test_without_the_flag_only_the_watched_namespaces_pods_are_seen(cluster: Cluster, kubeconfig: Path):
    op = _start(kubeconfig, all_pods=False)
    try:
        cluster.llamas.create(body=_ld("chat"), namespace=TEAM)
        # the L4 the "batch" pod holds looks free: the plan counts on it (what the flag is for)
        cluster.wait_status("chat", lambda s: (s.get("plan") or {}).get("gpuProduct") == "NVIDIA-L4",
                            timeout=20, what="chat to plan on the L4 it cannot see taken")
    finally:
        op.stop()


async def test_without_cluster_wide_permission_it_keeps_to_the_watched_namespaces(caplog):
    # RBAC is not emulated: a 403 on the cluster-wide listing, as a Role-only install would get it.
    import kubernetes

    from llama_operator.runner import ClusterPods
    from llama_operator.state import Indexes

    class State:
        indexes = Indexes(nodes={}, pods={"kopf's": "index"}, deployments={}, services={})

        def pod_seen(self, key, use):  # pragma: no cover - nothing is listed
            raise AssertionError("no pod may be reported")

    pods = ClusterPods(kubernetes.client.Configuration(), State())

    def forbidden():
        raise kubernetes.client.ApiException(status=403, reason="Forbidden")

    pods._list = forbidden
    assert await pods.start() is False
    assert State.indexes.pods == {"kopf's": "index"} and not pods.active
    assert "may not list Pods cluster-wide" in caplog.text
