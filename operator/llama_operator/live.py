"""What is on the server of an object the operator writes, and whether it holds what was rendered.

What is on the server is known from the operator's watches (`Live`, kept in kopf indexes) for the kinds
it watches, so a pass that changes nothing sends nothing; other kinds are read with a GET.

Whether an owned object is as rendered is judged from its content, not only from the operator's hash
annotation: `content_fingerprint` hashes what the operator owns of an object (its spec, and its own
labels and annotations) with the fields the API server defaults or assigns taken out, so a hand edit of
an owned Deployment (an image, a securityContext, a volume, replicas) is seen and written back, while a
server's defaulting is not taken for a change. What the server answered to the operator's own write is
remembered as well (the Writer's `Applied.fingerprint`), so defaulting this module does not know costs
at most one write, never a write per pass.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .ownership import GPU_PRODUCT_ANNOTATION, HASH_ANNOTATION, OUR_ANNOTATION_PREFIXES, OUR_LABEL_PREFIXES, canonical, sha256_hex
from .units import quantity_exact


#: The kinds that run the model servers and report their rollout in their status: a Deployment for a replica
#: on one node, a LeaderWorkerSet for replicas that span nodes (docs/multinode.md).
WORKLOAD_KINDS = ("Deployment", "LeaderWorkerSet")


@dataclass(frozen=True)
class Live:
    """What the operator keeps of an object, as its watch last showed it (or a GET read it): enough to
    tell whether it is this LlamaDeployment's, whether a write is due and how to write it, and the
    status a Deployment reports."""

    kind: str
    name: str
    spec_hash: str | None
    #: Which of metadata.labels / metadata.annotations exist: a JSON patch must create a missing map first.
    sections: frozenset[str]
    generation: int = 0
    status: dict = field(default_factory=dict)
    #: (kind, name, uid) of the object's controller ownerReference; None when nothing controls it.
    controller: tuple[str, str, str] | None = None
    #: content_fingerprint of the object: what the operator owns of it, server defaults taken out.
    fingerprint: str = ""
    resource_version: str = ""
    #: Service fields the API server assigns (clusterIP...), carried over when the spec is replaced.
    assigned: dict = field(default_factory=dict)
    #: A workload's GPU product (its GPU_PRODUCT_ANNOTATION); None on CPU, or for other kinds.
    gpu_product: str | None = None

    @property
    def observed(self) -> bool:
        """Whether the object's controller has acted on its latest spec (a Deployment's status describes it)."""
        return int(self.status.get("observedGeneration") or 0) >= self.generation

    def owned_by(self, uid: str | None) -> bool:
        """Whether `uid` (a LlamaDeployment's) is this object's controller: the only objects the operator patches."""
        return self.controller is not None and bool(uid) and self.controller[2] == uid

    @classmethod
    def from_body(cls, kind: str, body: Mapping[str, Any]) -> "Live":
        meta = body.get("metadata") or {}
        key = (kind, meta.get("uid"), meta.get("resourceVersion"))
        if key[1] and key[2]:
            with _cache_lock:
                cached = _live_cache.get(key)
            if cached is not None:
                return cached
        annotations = meta.get("annotations") or {}
        controller = next(((r.get("kind") or "", r.get("name") or "", r.get("uid") or "")
                           for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
        spec = body.get("spec") or {}
        live = cls(kind=kind, name=meta.get("name") or "", spec_hash=annotations.get(HASH_ANNOTATION),
                   sections=frozenset(s for s in ("labels", "annotations") if meta.get(s)),
                   generation=int(meta.get("generation") or 0) if kind in WORKLOAD_KINDS else 0,
                   status=dict(body.get("status") or {}) if kind in WORKLOAD_KINDS else {},
                   controller=controller, fingerprint=content_fingerprint(kind, body),
                   resource_version=str(meta.get("resourceVersion") or ""),
                   assigned={k: spec[k] for k in SERVICE_ASSIGNED if k in spec} if kind == "Service" else {},
                   gpu_product=annotations.get(GPU_PRODUCT_ANNOTATION) if kind in WORKLOAD_KINDS else None)
        if key[1] and key[2]:
            with _cache_lock:
                if len(_live_cache) >= _LIVE_CACHE_LIMIT:
                    del _live_cache[next(iter(_live_cache))]
                _live_cache[key] = live
        return live


#: The index and the event handler of one watch event read the same body: build its Live once.
_live_cache: dict[tuple[str, Any, Any], Live] = {}
_LIVE_CACHE_LIMIT = 256
#: Both caches here are used from the event loop and from the Writer's threads.
_cache_lock = threading.Lock()


# --- what the operator owns of an object, with what the API server adds taken out -----------------------

#: Service fields the API server allocates: any value is the server's, not a change.
SERVICE_ASSIGNED = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy")
# Defaults the API server fills in (k8s.io/kubernetes pkg/apis/{apps,core}/v1/defaults.go). A field that
# holds its default counts as absent on both sides, so a render that leaves it out and a server that
# fills it in agree, and a hand edit to another value is still a change.
_DEPLOYMENT_DEFAULTS = {"replicas": 1, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600}
_STRATEGY_DEFAULT = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
_POD_DEFAULTS = {"restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                 "securityContext": {}, "schedulerName": "default-scheduler"}
_CONTAINER_DEFAULTS = {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
_PROBE_DEFAULTS = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
_SERVICE_DEFAULTS = {"type": "ClusterIP", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                     "externalTrafficPolicy": "Cluster", "allocateLoadBalancerNodePorts": True}
_VOLUME_MODES = ("secret", "configMap", "downwardAPI", "projected")


def _without(d: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not (k in defaults and v == defaults[k])}


def _quantities(d: Any) -> Any:
    return {k: quantity_exact(v) for k, v in d.items()} if isinstance(d, Mapping) else d


def _default_pull_policy(image: Any) -> str:
    """The server's imagePullPolicy for an image: Always for :latest or no tag, else IfNotPresent."""
    ref = str(image or "")
    if "@" in ref:
        return "IfNotPresent"
    last = ref.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _norm_probe(probe: Any) -> Any:
    if not isinstance(probe, Mapping):
        return probe
    out = _without(probe, _PROBE_DEFAULTS)
    if isinstance(out.get("httpGet"), Mapping):
        out["httpGet"] = _without(out["httpGet"], {"scheme": "HTTP", "path": "/"})
    return out


def _norm_container(c: Any) -> Any:
    if not isinstance(c, Mapping):
        return c
    out = _without(c, {**_CONTAINER_DEFAULTS, "imagePullPolicy": _default_pull_policy(c.get("image"))})
    if isinstance(out.get("ports"), list):
        out["ports"] = [_without(p, {"protocol": "TCP"}) if isinstance(p, Mapping) else p for p in out["ports"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in out:
            out[probe] = _norm_probe(out[probe])
    if isinstance(out.get("resources"), Mapping):
        res = {k: _quantities(v) if k in ("requests", "limits") else v for k, v in out["resources"].items()}
        out["resources"] = {k: v for k, v in res.items() if v != {}}
        if not out["resources"]:
            del out["resources"]
    if isinstance(out.get("env"), list):
        env = []
        for e in out["env"]:
            ref = ((e.get("valueFrom") or {}).get("fieldRef") if isinstance(e, Mapping) else None)
            if isinstance(ref, Mapping) and ref.get("apiVersion") == "v1":
                e = {**e, "valueFrom": {**e["valueFrom"], "fieldRef": _without(ref, {"apiVersion": "v1"})}}
            env.append(e)
        out["env"] = env
    return out


def _norm_volume(v: Any) -> Any:
    if not isinstance(v, Mapping):
        return v
    out = dict(v)
    for mode in _VOLUME_MODES:
        if isinstance(out.get(mode), Mapping):
            out[mode] = _without(out[mode], {"defaultMode": 420})
    if isinstance(out.get("emptyDir"), Mapping) and "sizeLimit" in out["emptyDir"]:
        out["emptyDir"] = {**out["emptyDir"], "sizeLimit": quantity_exact(out["emptyDir"]["sizeLimit"])}
    if isinstance(out.get("hostPath"), Mapping):
        out["hostPath"] = _without(out["hostPath"], {"type": ""})
    return out


def _norm_pod_template(t: Any) -> Any:
    if not isinstance(t, Mapping):
        return t
    out = dict(t)
    meta = out.get("metadata")
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if not (k == "creationTimestamp" and v is None)}
        if isinstance(meta.get("annotations"), Mapping):
            meta["annotations"] = {k: v for k, v in meta["annotations"].items()
                                   if k.startswith(OUR_ANNOTATION_PREFIXES)}
        out["metadata"] = {k: v for k, v in meta.items() if v != {}}
    spec = out.get("spec")
    if isinstance(spec, Mapping):
        spec = _without(spec, _POD_DEFAULTS)
        for key in ("containers", "initContainers"):
            if isinstance(spec.get(key), list):
                spec[key] = [_norm_container(c) for c in spec[key]]
        if isinstance(spec.get("volumes"), list):
            spec["volumes"] = [_norm_volume(v) for v in spec["volumes"]]
        out["spec"] = spec
    return out


def _norm_spec(kind: str, spec: Any) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    if kind == "Deployment":
        out = _without(spec, {**_DEPLOYMENT_DEFAULTS, "strategy": _STRATEGY_DEFAULT})
        if "template" in out:
            out["template"] = _norm_pod_template(out["template"])
        return out
    if kind == "Service":
        out = _without({k: v for k, v in spec.items() if k not in SERVICE_ASSIGNED}, _SERVICE_DEFAULTS)
        if isinstance(out.get("ports"), list):
            ports = []
            for p in out["ports"]:
                if isinstance(p, Mapping):
                    p = _without({k: v for k, v in p.items() if k != "nodePort"},
                                 {"protocol": "TCP", "targetPort": p.get("port")})
                ports.append(p)
            out["ports"] = ports
        return out
    return spec


def normalized(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator owns of an object, comparable between its render and the server's copy: the spec
    with server defaults and assigned fields taken out (quantities as exact numbers), the labels and
    annotations of the operator's own keys."""
    meta = body.get("metadata") or {}
    return {
        "labels": {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(OUR_LABEL_PREFIXES)},
        "annotations": {k: v for k, v in (meta.get("annotations") or {}).items()
                        if k.startswith(OUR_ANNOTATION_PREFIXES)},
        "spec": _norm_spec(kind, body.get("spec")),
    }


def content_fingerprint(kind: str, body: Mapping[str, Any]) -> str:
    """A hash of `normalized(kind, body)`: equal for a rendered object and the server's copy of it, unless
    someone changed what the operator owns."""
    return sha256_hex(canonical(normalized(kind, body)))[:16]


_rendered_fingerprints: dict[tuple[str, str], str] = {}
_RENDERED_FINGERPRINTS_LIMIT = 4096


def rendered_fingerprint(obj: Mapping[str, Any]) -> str:
    """content_fingerprint of a rendered object, kept per content hash (each pass renders again)."""
    key = (obj["kind"], (obj["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) or "")
    with _cache_lock:
        found = _rendered_fingerprints.get(key) if key[1] else None
    if found is None:
        found = content_fingerprint(obj["kind"], obj)
        if key[1]:
            with _cache_lock:
                if len(_rendered_fingerprints) >= _RENDERED_FINGERPRINTS_LIMIT:
                    del _rendered_fingerprints[next(iter(_rendered_fingerprints))]
                _rendered_fingerprints[key] = found
    return found


def is_current(obj: Mapping[str, Any], live: Live | None, accepted: tuple[str, str] | None = None) -> bool:
    """Whether the server's copy `live` holds what the operator rendered as `obj`: the same content
    fingerprint, or the fingerprint the server answered with when the operator last wrote this render
    (`accepted`: (content hash, fingerprint))."""
    if live is None:
        return False
    if live.fingerprint == rendered_fingerprint(obj):
        return True
    return accepted is not None and live.spec_hash == accepted[0] == obj["metadata"]["annotations"].get(
        HASH_ANNOTATION) and live.fingerprint == accepted[1]
