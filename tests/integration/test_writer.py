"""The Writer (llama_operator.kube) against the emulator: it writes only what the LlamaDeployment controls,
judges drift from the content of the server's copy (server defaults taken out), and reports refusals
instead of raising them. The operator end to end is in tests/reliability/test_guards.py.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
from pathlib import Path

import kubernetes
import pytest

from llama_operator import planner
from llama_operator.api import parse_spec
from llama_operator.inventory import Inventory
from llama_operator.kube import (BLOCKED, CONFLICT, CREATED, REFUSED, RESTORED, SUPERSEDED, UNCHANGED, Writer,
                                 ownership_problem)
from llama_operator.kubeclient import load_client_configuration
from llama_operator.live import Live, content_fingerprint, is_current, rendered_fingerprint
from llama_operator.render import Owner, render
from llama_operator.sandbox.admission import CLAIMS, DEPLOYMENTS
from llama_operator.sandbox.server import EmulatorThread

from kit.examples import cluster_nodes, example

pytestmark = pytest.mark.looptime(False)
UID = "0b7c3c1e-0000-4000-8000-000000000001"
_VERSIONS = itertools.count(4711)


def rendered(cache: dict | None = None, name: str = "chat", uid: str = UID) -> list[dict]:
    doc = example("chat.yaml")
    if cache is not None:
        doc["spec"]["source"]["cache"] = cache
    spec = parse_spec(doc["spec"])
    inventory = Inventory.from_manifests(cluster_nodes("mixed.yaml"), [])
    plan = planner.plan(spec, inventory).chosen.to_chosen_plan()
    return render(Owner(name=name, namespace="default", uid=uid), spec, plan)


def by_kind(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def as_a_real_server_returns_it(obj: dict) -> dict:
    """The object as a real API server (1.30) returns it: defaults, allocated fields, canonical quantities,
    managedFields, a status, the Deployment controller's revision annotation, kubectl's annotation."""
    live = copy.deepcopy(obj)
    meta = live["metadata"]
    # (Live.from_body keeps what it built per uid and resourceVersion, as a server's versions never change.)
    meta.update(uid=UID, resourceVersion=str(next(_VERSIONS)), generation=3, creationTimestamp="2025-01-01T00:00:00Z",
                managedFields=[{"manager": "llama-operator", "operation": "Update"}])
    meta["annotations"]["deployment.kubernetes.io/revision"] = "2"
    meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    meta["labels"]["team"] = "search"  # someone's label: theirs
    spec = live["spec"]
    if live["kind"] == "Deployment":
        spec.update(progressDeadlineSeconds=600)
        template = spec["template"]
        template["metadata"]["creationTimestamp"] = None
        template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2025-01-02T00:00:00Z"
        pod = template["spec"]
        pod.update(restartPolicy="Always", terminationGracePeriodSeconds=30, dnsPolicy="ClusterFirst",
                   schedulerName="default-scheduler")
        pod.setdefault("securityContext", {})
        for c in pod["containers"]:
            c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File",
                     imagePullPolicy="IfNotPresent")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    c[probe] = {"timeoutSeconds": 1, "successThreshold": 1, **c[probe]}
                    c[probe]["httpGet"] = {"scheme": "HTTP", **c[probe]["httpGet"]}
            for section in ("requests", "limits"):
                for k, v in list(c["resources"].get(section, {}).items()):
                    if isinstance(v, str) and v.endswith("Mi") and int(v[:-2]) % 1024 == 0:
                        c["resources"][section][k] = f"{int(v[:-2]) // 1024}Gi"
        live["status"] = {"observedGeneration": 3, "replicas": 1, "readyReplicas": 1}
    else:
        spec.update(clusterIP="10.96.12.34", clusterIPs=["10.96.12.34"], ipFamilies=["IPv4"],
                    ipFamilyPolicy="SingleStack", sessionAffinity="None", internalTrafficPolicy="Cluster")
        live["status"] = {"loadBalancer": {}}
    return live


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_a_real_servers_copy_of_the_render_is_current(kind):
    obj = by_kind(rendered(), kind)
    live = Live.from_body(kind, as_a_real_server_returns_it(obj))
    assert live.fingerprint == rendered_fingerprint(obj) and is_current(obj, live)
    assert live.owned_by(UID) and not live.owned_by("another-uid")


def _pod(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


EDITS = {
    "image": lambda d: _pod(d)["containers"][0].update(image="docker.io/evil/miner:latest"),
    "privileged": lambda d: _pod(d)["containers"][0].setdefault("securityContext", {}).update(privileged=True),
    "hostPath": lambda d: _pod(d).setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}}),
    "replicas": lambda d: d["spec"].update(replicas=3),
    "hostNetwork": lambda d: _pod(d).update(hostNetwork=True),
    "runAsUser 0": lambda d: _pod(d).setdefault("securityContext", {}).update(runAsUser=0),
    "env": lambda d: _pod(d)["containers"][0].setdefault("env", []).append({"name": "X", "value": "1"}),
    "pull policy": lambda d: _pod(d)["containers"][0].update(imagePullPolicy="Always"),
    "a default changed": lambda d: d["spec"].update(progressDeadlineSeconds=60),
    "our label": lambda d: d["metadata"]["labels"].update({"llama-operator.dev/llamadeployment": "other"}),
    "service selector": lambda s: s["spec"]["selector"].update(app="nothing"),
    "service type": lambda s: s["spec"].update(type="NodePort"),
    "service port": lambda s: s["spec"]["ports"][0].update(port=9999),
    "externalIPs": lambda s: s["spec"].update(externalIPs=["1.2.3.4"]),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edit_is_not_current(edit):
    kind = "Service" if edit.startswith(("service", "externalIPs")) else "Deployment"
    obj = by_kind(rendered(), kind)
    live = as_a_real_server_returns_it(obj)
    EDITS[edit](live)
    assert not is_current(obj, Live.from_body(kind, live)), edit


def test_whose_object_it_is():
    obj = by_kind(rendered(), "Service")
    body = as_a_real_server_returns_it(obj)
    assert ownership_problem(obj, Live.from_body("Service", body)) is None
    body["metadata"]["resourceVersion"] = "1"  # a fresh Live, not the cached one
    del body["metadata"]["ownerReferences"]
    nobody = ownership_problem(obj, Live.from_body("Service", body))
    assert nobody.result == CONFLICT and "it has no controller" in nobody.message
    assert "Rename the LlamaDeployment or remove the Service" in nobody.message
    body["metadata"].update(resourceVersion="2", ownerReferences=[
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u-web", "controller": True}])
    other = ownership_problem(obj, Live.from_body("Service", body))
    assert other.result == CONFLICT and "controlled by Deployment web (uid u-web)" in other.message
    body["metadata"].update(resourceVersion="3", ownerReferences=[dict(obj["metadata"]["ownerReferences"][0],
                                                                       uid="u-deleted")])
    predecessor = ownership_problem(obj, Live.from_body("Service", body))
    assert predecessor.result == SUPERSEDED and "garbage collector" in predecessor.message


# --- against the emulator -----------------------------------------------------------------------------------


@pytest.fixture
def writer(emulator_thread: EmulatorThread, kubeconfig: Path):
    w = Writer(load_client_configuration(str(kubeconfig)))
    yield w
    w.close()


def _core(kube_api) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_api)


@pytest.fixture
def owner(kube_api) -> str:
    """A live object's uid to render for (the emulator's garbage collector removes what a dead uid owns)."""
    return _core(kube_api).create_namespaced_config_map("default", {"metadata": {"name": "owner"}}).metadata.uid


def test_someone_elses_service_is_left_alone(writer, kube_api, owner):
    web = _core(kube_api).create_namespaced_service("default", {
        "metadata": {"name": "chat", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    objects = rendered(uid=owner)
    applied = asyncio.run(writer.apply(objects, {"Deployment": {}, "Service": {}}))
    assert [a.result for a in applied] == [CREATED, CONFLICT]
    assert "Service default/chat exists and is not owned by this LlamaDeployment" in applied[1].message
    after = _core(kube_api).read_namespaced_service("chat", "default")
    assert after.metadata.resource_version == web.metadata.resource_version
    assert after.spec.selector == {"app": "web"} and after.metadata.owner_references is None


def test_a_claim_that_is_not_its_own_is_not_mounted(writer, kube_api, owner):
    _core(kube_api).create_namespaced_persistent_volume_claim("default", {
        "metadata": {"name": "chat-model-cache"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}})
    objects = rendered(cache={"size": "100Gi"}, uid=owner)
    applied = asyncio.run(writer.apply(objects, {"Deployment": {}, "Service": {}}))
    results = {o["kind"]: a.result for o, a in zip(objects, applied)}
    assert results == {"PersistentVolumeClaim": CONFLICT, "Deployment": BLOCKED, "Service": CREATED}
    assert kubernetes.client.AppsV1Api(kube_api).list_namespaced_deployment("default").items == []


def test_a_refusal_is_reported_not_raised_and_not_sent_again(writer, emulator_thread, owner):
    message = 'admission webhook "deny.example.com" denied the request: no GPUs in this namespace'
    emulator_thread.emulator.admission.append(lambda r, obj, old: (400, message) if r == DEPLOYMENTS else None)
    objects = rendered(uid=owner)
    applied = asyncio.run(writer.apply(objects, {"Deployment": {}, "Service": {}}))
    assert applied[0].result == REFUSED and message in applied[0].message
    assert applied[0].message.startswith("the API server refused Deployment default/chat: ")
    assert applied[1].result == CREATED
    seen = len(emulator_thread.emulator._requests)
    dep = objects[0]
    remembered = {("Deployment", "chat"): (dep["metadata"]["annotations"]["llama-operator.dev/spec-hash"],
                                           applied[0].message)}
    again = asyncio.run(writer.apply(objects[:1], {"Deployment": {}}, refused=remembered))
    assert again[0].result == REFUSED and len(emulator_thread.emulator._requests) == seen  # nothing sent


def test_a_claim_refused_holds_the_deployment_back(writer, emulator_thread, owner):
    quota = 'persistentvolumeclaims "chat-model-cache" is forbidden: exceeded quota: storage'
    emulator_thread.emulator.admission.append(lambda r, obj, old: (403, quota) if r == CLAIMS else None)
    objects = rendered(cache={"size": "100Gi"}, uid=owner)
    applied = asyncio.run(writer.apply(objects, {"Deployment": {}, "Service": {}}))
    results = {o["kind"]: a for o, a in zip(objects, applied)}
    assert results["PersistentVolumeClaim"].result == REFUSED and quota in results["PersistentVolumeClaim"].message
    assert results["Deployment"].result == BLOCKED


def test_a_hand_edit_is_written_back_and_an_unchanged_object_is_not(writer, kube_api, owner):
    objects = rendered(uid=owner)
    created = asyncio.run(writer.apply(objects, {"Deployment": {}, "Service": {}}))
    assert [a.result for a in created] == [CREATED, CREATED]
    apps = kubernetes.client.AppsV1Api(kube_api)
    raw = kube_api.sanitize_for_serialization
    body = raw(apps.read_namespaced_deployment("chat", "default"))
    live = {"Deployment": {"chat": Live.from_body("Deployment", body)},
            "Service": {"chat": Live.from_body("Service", raw(_core(kube_api).read_namespaced_service("chat", "default")))}}
    # The emulator defaulted fields and canonicalised quantities: still current, nothing to send.
    assert body["spec"]["progressDeadlineSeconds"] == 600
    assert [a.result for a in asyncio.run(writer.apply(objects, live))] == [UNCHANGED, UNCHANGED]

    context = body["spec"]["template"]["spec"]["containers"][0].get("securityContext") or {}
    apps.patch_namespaced_deployment("chat", "default", [
        {"op": "add", "path": "/spec/template/spec/containers/0/securityContext", "value": {**context, "privileged": True}}])
    edited = raw(apps.read_namespaced_deployment("chat", "default"))
    live["Deployment"]["chat"] = Live.from_body("Deployment", edited)
    restored = asyncio.run(writer.apply(objects, live))
    assert restored[0].result == RESTORED and restored[1].result == UNCHANGED
    assert restored[0].resource_version == edited["metadata"]["resourceVersion"]
    back = raw(apps.read_namespaced_deployment("chat", "default"))
    assert "privileged" not in (back["spec"]["template"]["spec"]["containers"][0].get("securityContext") or {})
    assert restored[0].fingerprint == content_fingerprint("Deployment", back) == rendered_fingerprint(objects[0])
