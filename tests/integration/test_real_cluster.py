"""The operator's core loop against a REAL Kubernetes cluster (opt-in).

Skipped unless the environment variable ``LLAMA_OPERATOR_TEST_KUBECONFIG`` names a kubeconfig file:

    LLAMA_OPERATOR_TEST_KUBECONFIG=$HOME/.kube/config \\
        .venv/bin/pytest tests/integration/test_real_cluster.py -v

What it does, in the kubeconfig's current context:

1. applies crds/llamadeployments.yaml if the CRD is not there yet (and removes it afterwards only if
   this test created it: an existing CRD, and the LlamaDeployments of others, are never touched);
2. creates a dedicated namespace ``llama-operator-test-<random>``;
3. runs the operator in a thread (``kit.operator.OperatorThread``) against that kubeconfig, watching only
   that namespace;
4. creates a small LlamaDeployment (Llama 3.2 1B, loose SLO, CPU allowed, so most clusters have room),
   checks that the operator plans it and renders a Deployment and Service for the planned runtime,
   owned by the LlamaDeployment, with the status written;
5. deletes it and checks that the cluster's garbage collector removes the Deployment and Service;
6. deletes the namespace.

It does not wait for the model server to become ready (that needs the image pulled and the weights
downloaded). The identity needs to create CRDs, namespaces, Deployments, Services and Events, and to
list Nodes and Pods. Nothing here runs unless the variable is set.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import kubernetes
import pytest
import yaml
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from llama_operator.api import API_VERSION, GROUP, KIND, PLURAL
from llama_operator.state import Settings
from llama_operator.engines import releases

from kit.cluster import Cluster
from kit.operator import OperatorThread
from kit.paths import CRD_FILE
from kit.poll import wait_until

ENV = "LLAMA_OPERATOR_TEST_KUBECONFIG"
KUBECONFIG = os.environ.get(ENV)

pytestmark = [
    pytest.mark.looptime(False),
    pytest.mark.skipif(not KUBECONFIG, reason=f"set {ENV} to a kubeconfig to run the operator against a real cluster"),
]

CRD_NAME = f"{PLURAL}.{GROUP}"
SMALL = {
    "apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "smoke"},
    "spec": {
        "model": "llama-3.2-1b-instruct",
        "slo": {"ttftP95": "30s", "tpotP95": "2s", "promptTokens": 256},
        "memoryBudget": "16Gi",
        "contextLength": 2048,
        "fallback": {"allowCPU": True, "quantizations": ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0",
                                                          "bf16", "fp8", "awq-int4"]},
    },
}


@pytest.fixture(scope="module")
def real_kubeconfig() -> str:
    assert KUBECONFIG is not None
    path = Path(KUBECONFIG).expanduser()
    if not path.is_file():
        pytest.fail(f"{ENV}={KUBECONFIG} is not a file")
    return str(path)


@pytest.fixture(scope="module")
def crd(real_kubeconfig: str) -> Iterator[None]:
    client = kubernetes.config.new_client_from_config(config_file=real_kubeconfig)
    ext = kubernetes.client.ApiextensionsV1Api(client)
    created = False
    try:
        ext.create_custom_resource_definition(yaml.safe_load(CRD_FILE.read_text()))
        created = True
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            raise
    try:
        def established() -> bool:
            conditions = ext.read_custom_resource_definition(CRD_NAME).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)
        wait_until(established, 60, "the CRD to be Established", interval=0.5)
        yield
    finally:
        if created:
            ext.delete_custom_resource_definition(CRD_NAME)
        client.close()


@pytest.fixture
def namespace(real_kubeconfig: str, crd) -> Iterator[str]:
    client = kubernetes.config.new_client_from_config(config_file=real_kubeconfig)
    core = kubernetes.client.CoreV1Api(client)
    name = f"llama-operator-test-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"app.kubernetes.io/created-by": "llama-operator-tests"}}})
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise
        client.close()


@pytest.fixture
def cluster(real_kubeconfig: str, namespace: str) -> Iterator[Cluster]:
    c = Cluster(real_kubeconfig, namespace=namespace)

    def discovered():  # the API server publishes a new CRD in discovery after a moment
        try:
            return c.llamas
        except ResourceNotFoundError:
            c.api = type(c.api)(c.client)  # a fresh discovery
            return None
    wait_until(discovered, 60, "the LlamaDeployment resource in discovery", interval=0.5)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def operator(real_kubeconfig: str, namespace: str) -> Iterator[OperatorThread]:
    op = OperatorThread(real_kubeconfig, settings=Settings(upgrade_delay=timedelta(seconds=2), resync_seconds=30),
                        watch_timeout=60, namespaces=[namespace])  # only this test's namespace
    op.start(timeout=60)
    try:
        yield op
    finally:
        op.stop()


def test_create_renders_the_planned_workload_and_delete_cleans_up(cluster: Cluster, operator: OperatorThread):
    ld = cluster.create(SMALL)
    st = cluster.wait_status("smoke", lambda s: s.get("phase"), 60, "the operator to write status")
    if st["phase"] == "Unschedulable":
        pytest.fail(f"the cluster has no room for a 1B model, so nothing could be rendered: {st.get('message')}")
    assert st["phase"] in ("Pending", "Deploying", "Ready", "Degraded"), st
    plan = st["plan"]
    runtime = plan["runtime"]
    port = 8000 if runtime == "vllm" else 8080
    assert st["runtime"] == runtime and st["observedGeneration"] == 1
    assert st["endpoint"] == f"http://smoke.{cluster.namespace}.svc:{port}/v1"

    dep = wait_until(lambda: cluster.deployment("smoke"), 30, "the Deployment")
    svc = wait_until(lambda: cluster.service("smoke"), 30, "the Service")
    for obj in (dep, svc):
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == \
            [(KIND, "smoke", ld["metadata"]["uid"], True)]
        assert obj["metadata"]["labels"]["llama-operator.dev/runtime"] == runtime
    c = dep["spec"]["template"]["spec"]["containers"][0]
    expected_images = {image for r in releases() if r.engine == runtime for image in r.images.values()}
    assert c["image"] in expected_images
    assert c["ports"][0]["containerPort"] == port and svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    wait_until(lambda: cluster.events("smoke", "Planned"), 30, "the Planned event")

    cluster.delete("smoke")
    wait_until(lambda: cluster.get("smoke") is None, 60, "the LlamaDeployment to be deleted (finalizer released)")
    wait_until(lambda: cluster.deployment("smoke") is None and cluster.service("smoke") is None, 120,
               "the garbage collector to delete the Deployment and Service", interval=1.0)
