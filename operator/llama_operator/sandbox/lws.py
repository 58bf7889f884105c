"""A stand-in for the LeaderWorkerSet controller and its pod webhook (sigs.k8s.io/lws v0.10.0), for the sandbox
and the tests: what a replica spanning nodes looks like to the operator (docs/multinode.md).

For each LeaderWorkerSet it makes `replicas` groups of `leaderWorkerTemplate.size` pods, named as LWS names
them (the leader `<lws>-<group>`, workers `<lws>-<group>-<worker>`), labelled and given the environment LWS's
webhook gives them (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX), binds each to a node it fits, and
reports status.replicas / readyReplicas / updatedReplicas as groups. A changed template recreates the groups
(restartPolicy RecreateGroupOnPodRestart, the operator's). Nothing here validates what LWS's webhook would
refuse: the renderer's tests check the objects against LWS's own CRD (tests/vendor/lws).
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"
CRD_NAME = "leaderworkersets.leaderworkerset.x-k8s.io"
NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
REVISION_LABEL = "leaderworkerset.sigs.k8s.io/template-revision-hash"


def minimal_crd() -> dict:
    """LeaderWorkerSet's CRD as the sandbox declares it: the kind and its status subresource, the schema left
    open (the emulator validates no schema; LWS's own CRD is under tests/vendor/lws)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": "leaderworkerset.x-k8s.io", "scope": "Namespaced",
            "names": {"kind": KIND, "plural": "leaderworkersets", "singular": "leaderworkerset",
                      "shortNames": ["lws"], "listKind": "LeaderWorkerSetList"},
            "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object",
                                                         "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


def _revision(lws: dict) -> str:
    template = (lws.get("spec") or {}).get("leaderWorkerTemplate") or {}
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _pod(lws: dict, group: int, worker: int, revision: str, node: str | None) -> dict:
    """One pod of a group, as LWS's StatefulSets and webhook make it."""
    name = lws["metadata"]["name"]
    ns = lws["metadata"]["namespace"]
    spec = lws["spec"]["leaderWorkerTemplate"]
    size = int(spec.get("size") or 1)
    template = (spec.get("leaderTemplate") or spec["workerTemplate"]) if worker == 0 else spec["workerTemplate"]
    pod_name = f"{name}-{group}" if worker == 0 else f"{name}-{group}-{worker}"
    env = [{"name": "LWS_LEADER_ADDRESS", "value": f"{name}-{group}.{name}.{ns}"},
           {"name": "LWS_GROUP_SIZE", "value": str(size)},
           {"name": "LWS_WORKER_INDEX", "value": str(worker)}]
    pod_spec = json.loads(json.dumps(template["spec"]))
    for c in pod_spec.get("containers") or []:
        c["env"] = [*(c.get("env") or []), *env]
    labels = {**((template.get("metadata") or {}).get("labels") or {}), NAME_LABEL: name,
              GROUP_INDEX_LABEL: str(group), WORKER_INDEX_LABEL: str(worker), REVISION_LABEL: revision}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": ns, "labels": labels},
        "spec": {**pod_spec, "hostname": pod_name, "subdomain": name, **({"nodeName": node} if node else {})},
        "status": {"phase": "Running" if node else "Pending"},
    }


def sync_leaderworkersets(dyn, pods: list[dict], place: Callable[[dict], str | None],
                          bind: Callable[[dict], None], pod_res) -> None:
    """One round of the controller: groups made or recreated, pods of gone LeaderWorkerSets removed, status
    reported. `pods`: every pod; `place(pod_spec)`: a node the pod fits (its resources then taken), or None;
    `bind(pod)`: bind a pod still unscheduled where it fits now."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    # Looked up only once its CRD is listed: a kind the discovery does not know makes the dynamic client drop
    # its whole discovery cache and fetch it again, which, on every round, would slow everything down.
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    if not any(c["metadata"]["name"] == CRD_NAME for c in crds.get().to_dict()["items"]):
        return  # LeaderWorkerSet is not installed
    try:
        res = dyn.resources.get(api_version=API_VERSION, kind=KIND)
    except ResourceNotFoundError:  # a discovery cached before the kind was declared
        dyn.resources.invalidate_cache()
        res = dyn.resources.get(api_version=API_VERSION, kind=KIND)
    sets = res.get().to_dict()["items"]
    live = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in sets}
    ours = [p for p in pods if NAME_LABEL in (p["metadata"].get("labels") or {})]
    for p in ours:
        if (p["metadata"]["namespace"], p["metadata"]["labels"][NAME_LABEL]) not in live:
            pod_res.delete(name=p["metadata"]["name"], namespace=p["metadata"]["namespace"])
    for lws in sets:
        _sync(lws, [p for p in ours if p["metadata"]["namespace"] == lws["metadata"]["namespace"]
                    and p["metadata"]["labels"][NAME_LABEL] == lws["metadata"]["name"]], place, bind, pod_res, res)


def _sync(lws: dict, pods: list[dict], place: Callable[[dict], str | None], bind: Callable[[dict], None],
          pod_res, res) -> None:
    ns, name = lws["metadata"]["namespace"], lws["metadata"]["name"]
    revision = _revision(lws)
    replicas = int(lws["spec"].get("replicas", 1))
    size = int(lws["spec"]["leaderWorkerTemplate"].get("size") or 1)
    groups: dict[int, list[dict]] = {}
    for p in pods:
        labels = p["metadata"]["labels"]
        group = int(labels.get(GROUP_INDEX_LABEL, "0"))
        if labels.get(REVISION_LABEL) != revision or group >= replicas:  # a new template, or scaled in
            pod_res.delete(name=p["metadata"]["name"], namespace=ns)
        else:
            bind(p)  # still unscheduled: the scheduler's retry
            groups.setdefault(group, []).append(p)
    for group in range(replicas):
        have = {int(p["metadata"]["labels"][WORKER_INDEX_LABEL]) for p in groups.get(group, [])}
        for worker in range(size):
            if worker not in have:
                pod = _pod(lws, group, worker, revision, None)
                node = place(pod["spec"])
                pod = _pod(lws, group, worker, revision, node)
                pod_res.create(body=pod, namespace=ns)
                groups.setdefault(group, []).append(pod)
    ready = sum(1 for g in range(replicas)
                if len(groups.get(g, [])) == size and all((p.get("spec") or {}).get("nodeName") for p in groups[g]))
    status = {
        "observedGeneration": lws["metadata"].get("generation", 1),
        "replicas": len([g for g in groups if g < replicas]),
        "readyReplicas": ready,
        "updatedReplicas": len([g for g in groups if g < replicas]),
        "conditions": [{"type": "Available", "status": "True" if ready >= replicas else "False",
                        "reason": "AllGroupsReady" if ready >= replicas else "GroupsNotReady", "message": ""}],
    }
    if lws.get("status") != status:
        res.status.patch(body={"status": status}, name=name, namespace=ns,
                         content_type="application/merge-patch+json")
