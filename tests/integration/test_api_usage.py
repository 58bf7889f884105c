"""What the operator really asks of the Kubernetes API, against what the Helm chart's RBAC grants.

The operator runs against the emulator through its whole life (plans on both runtimes, a cache
claim, a NetworkPolicy made, changed, deleted and made again, an invalid spec, an update, a delete, peering), every request it sends is recorded, and each
becomes (apiGroup, resource, verb). One path no scenario here can time is driven directly: the
Writer applying objects its watch has not shown yet (a create answered 409, then a GET to compare). tests/chart/operator-api-usage.json keeps that set: this test fails
when it is stale, and tests/chart/test_chart_rbac.py checks the rendered RBAC against it (nothing
missing, nothing more).
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from llama_operator.api import parse_spec
from llama_operator.crd import crd_manifest
from llama_operator.kube import Writer
from llama_operator.kubeclient import load_client_configuration
from llama_operator.ownership import FINALIZER
from llama_operator.render import Owner, render
from llama_operator.sandbox.demo import SandboxOperator, _install_leaderworkerset, load_docs, wait_for
from llama_operator.sandbox.emulator import declare_crd
from llama_operator.sandbox.kubelet import SimulatedKubelet, dynamic_client
from llama_operator.sandbox.server import EmulatorThread
from llama_operator.state import Settings
from llama_operator.status import ChosenPlan

ROOT = Path(__file__).resolve().parents[2]
USAGE_FILE = ROOT / "tests" / "chart" / "operator-api-usage.json"
pytestmark = pytest.mark.looptime(False)


def _verb(method: str, path_parts: list[str], params) -> tuple[str, str, str] | None:
    """(apiGroup, resource, verb) of one request path like /apis/apps/v1/namespaces/ns/deployments/x."""
    if path_parts[:1] == ["api"]:
        group, rest = "", path_parts[2:]
    elif path_parts[:1] == ["apis"] and len(path_parts) >= 3:
        group, rest = path_parts[1], path_parts[3:]
    else:
        return None  # discovery, /version, /healthz: not authorised per resource
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # namespaced resource
    if not rest:
        return None
    resource, named, sub = rest[0], len(rest) >= 2, rest[2] if len(rest) >= 3 else None
    if sub:
        resource = f"{resource}/{sub}"
    method = method.upper()
    if method == "GET":
        verb = "watch" if str(params.get("watch", "")).lower() in ("true", "1") else "get" if named else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update",
                "DELETE": "delete" if named else "deletecollection"}[method]
    return group, resource, verb


def _observed(emulator) -> set[tuple[str, str, str]]:
    out = set()
    for request in list(emulator._requests):
        agent = (request.headers or {}).get("User-Agent", "")
        if not (agent.startswith("kopf") or agent.startswith("llama-operator/") or agent == "llama-operator"):
            continue
        parts = [p for p in request.url.path.split("/") if p]
        verb = _verb(str(getattr(request.method, "value", request.method)), parts, request.params or {})
        if verb is not None:
            out.add(verb)
    return out


def _exercise(peering: str | None, namespaces: list[str] | None = None) -> set[tuple[str, str, str]]:
    with EmulatorThread() as emu:
        declare_crd(emu.emulator, crd_manifest())
        for crd in load_docs(ROOT / "charts" / "llama-operator" / "crds" / "kopf-peerings.yaml"):
            declare_crd(emu.emulator, crd)
        kubeconfig = str(emu.write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig"))
        api = dynamic_client(kubeconfig, user_agent="test")
        nodes = api.resources.get(api_version="v1", kind="Node")
        for n in [n for n in load_docs(ROOT / "examples" / "clusters" / "mixed.yaml") if n.get("kind") == "Node"]:
            nodes.create(body={**n, "metadata": {"name": n["metadata"]["name"], "labels": n["metadata"]["labels"]}})
        if peering and not namespaces:
            api.resources.get(api_version="kopf.dev/v1", kind="ClusterKopfPeering").create(
                body={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})
        for ns in namespaces or []:
            if peering:
                api.resources.get(api_version="kopf.dev/v1", kind="KopfPeering").create(
                    body={"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}},
                    namespace=ns)
        lds = api.resources.get(api_version="llama-operator.dev/v1alpha1", kind="LlamaDeployment")
        # Made by a version that had kopf put its finalizer on every object: kopf takes it off (a patch).
        upgraded = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
        upgraded["metadata"] = {"name": "upgraded", "finalizers": [FINALIZER]}
        lds.create(body=upgraded, namespace="default")
        kubelet = SimulatedKubelet(kubeconfig).start()
        settings = Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=2)
        operator = SandboxOperator(kubeconfig, settings)
        operator.options.peering = peering
        operator.options.namespaces = list(namespaces or [])
        operator.start()
        try:
            docs = [yaml.safe_load((ROOT / "examples" / f).read_text()) for f in ("chat.yaml", "tiny-cpu.yaml")]
            docs[0]["spec"]["source"]["cache"] = {"size": "100Gi"}
            docs[0]["spec"]["access"] = {"allowedClients": [{"podLabels": {"app": "gateway"}}]}  # a NetworkPolicy
            bad = {"apiVersion": "llama-operator.dev/v1alpha1", "kind": "LlamaDeployment",
                   "metadata": {"name": "bad"}, "spec": {"model": "llama-9"}}
            for doc in docs + [bad]:
                lds.create(body=doc, namespace="default")
            assert wait_for(lambda: all((i.get("status") or {}).get("phase") in ("Ready", "Invalid")
                                     for i in lds.get(namespace="default").to_dict()["items"]), 30)
            lds.patch(body={"spec": {"contextLength": 4096,  # the NetworkPolicy changes too: a patch
                                     "access": {"allowedClients": [{"podLabels": {"app": "router"}}]}}},
                      name="chat", namespace="default", content_type="application/merge-patch+json")
            assert wait_for(lambda: (lds.get(name="chat", namespace="default").to_dict().get("status") or {})
                         .get("observedGeneration") == 2, 30)
            lds.patch(body={"spec": {"access": None}},  # no clients listed: the NetworkPolicy is deleted
                      name="chat", namespace="default", content_type="application/merge-patch+json")
            policies = api.resources.get(api_version="networking.k8s.io/v1", kind="NetworkPolicy")
            assert wait_for(lambda: not policies.get(namespace="default").items, 30)
            lds.patch(body={"spec": {"access": {"allowedClients": [{"podLabels": {"app": "router"}}]}}},
                      name="chat", namespace="default", content_type="application/merge-patch+json")
            assert wait_for(lambda: policies.get(namespace="default").items, 30)
            for name in ("tiny", "upgraded"):
                lds.delete(name=name, namespace="default")
                assert wait_for(lambda: not [i for i in lds.get(namespace="default").to_dict()["items"]
                                          if i["metadata"]["name"] == name], 30), name
            _across_nodes(emu.emulator, api, lds)
            time.sleep(3)  # a resync pass
        finally:
            operator.stop()
            kubelet.stop()
        _apply_unwatched(kubeconfig, lds.get(name="chat", namespace="default").to_dict())
        return _observed(emu.emulator)


def _across_nodes(emulator, api, lds) -> None:
    """A replica spanning nodes (docs/multinode.md): LeaderWorkerSet installed, 405B on one 8x H100 node (FP8,
    a Deployment), a second node (bf16 across both: a LeaderWorkerSet, the Deployment deleted), a spec change
    (the LeaderWorkerSet patched), the second node gone (FP8 again: the LeaderWorkerSet deleted)."""
    _install_leaderworkerset(emulator, api)
    nodes = api.resources.get(api_version="v1", kind="Node")
    pair = [n for n in load_docs(ROOT / "examples" / "clusters" / "h100-8x-pair.yaml") if n.get("kind") == "Node"]
    doc = yaml.safe_load((ROOT / "examples" / "multinode-405b.yaml").read_text())

    def plan() -> dict:
        return (lds.get(name=doc["metadata"]["name"], namespace="default").to_dict().get("status") or {}) \
            .get("plan") or {}

    nodes.create(body={**pair[0], "metadata": {"name": pair[0]["metadata"]["name"],
                                               "labels": pair[0]["metadata"]["labels"]}})
    lds.create(body=doc, namespace="default")
    assert wait_for(lambda: plan().get("quantization") == "fp8", 30)
    nodes.create(body={**pair[1], "metadata": {"name": pair[1]["metadata"]["name"],
                                               "labels": pair[1]["metadata"]["labels"]}})
    assert wait_for(lambda: plan().get("nodesPerReplica") == 2, 30)
    lds.patch(body={"spec": {"contextLength": 8192}}, name=doc["metadata"]["name"], namespace="default",
              content_type="application/merge-patch+json")
    assert wait_for(lambda: (lds.get(name=doc["metadata"]["name"], namespace="default").to_dict().get("status")
                             or {}).get("observedGeneration") == 2, 30)
    nodes.delete(name=pair[1]["metadata"]["name"])
    groups = api.resources.get(api_version="leaderworkerset.x-k8s.io/v1", kind="LeaderWorkerSet")
    assert wait_for(lambda: plan().get("nodesPerReplica") == 1 and not groups.get(namespace="default").items, 30)


def _apply_unwatched(kubeconfig: str, ld: dict) -> None:
    """What a pass does when the watch has not shown its objects yet: create, 409, then GET and compare."""
    owner = Owner(name=ld["metadata"]["name"], namespace=ld["metadata"]["namespace"], uid=ld["metadata"]["uid"])
    objects = render(owner, parse_spec(ld["spec"]), ChosenPlan.model_validate(ld["status"]["plan"]))
    writer = Writer(load_client_configuration(kubeconfig))
    written = asyncio.run(writer.write(objects, {"Deployment": {}, "Service": {}}))
    assert written.applied == ["unchanged"] * len(objects), written


def _as_usage(seen: set[tuple[str, str, str]]) -> dict[str, list[str]]:
    usage: dict[str, set[str]] = {}
    for group, resource, verb in seen:
        usage.setdefault(f"{group}/{resource}" if group else resource, set()).add(verb)
    return {k: sorted(v) for k, v in sorted(usage.items())}


def observed_usage() -> dict[str, dict[str, list[str]]]:
    """Per install mode of the chart: cluster-wide (standalone and with peering), and namespaced."""
    return {
        "clusterwide": _as_usage(_exercise(peering=None) | _exercise(peering="llama-operator")),
        "namespaced": _as_usage(_exercise(peering="llama-operator", namespaces=["default"])),
    }


def test_committed_api_usage_is_what_the_operator_does():
    usage = observed_usage()
    committed = json.loads(USAGE_FILE.read_text())["usage"] if USAGE_FILE.exists() else None
    assert committed == usage, (
        f"{USAGE_FILE.relative_to(ROOT)} is stale; what the operator did:\n" + json.dumps(usage, indent=1)
        + "\nRegenerate with: .venv/bin/python tests/integration/test_api_usage.py")


if __name__ == "__main__":
    USAGE_FILE.write_text(json.dumps({
        "about": "The (apiGroup/resource -> verbs) the operator used against the emulator in "
                 "tests/integration/test_api_usage.py. The chart's RBAC must grant exactly these.",
        "usage": observed_usage()}, indent=1) + "\n")
    print(f"wrote {USAGE_FILE}")
