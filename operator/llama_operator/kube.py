"""Talking to the Kubernetes API: connection settings, and writing the objects a plan renders.

The operator reaches any API server through a kubeconfig or in-cluster config; kopf gets the same
credentials through a login handler. Writes go through the official client's dynamic API (in a worker
thread, so kopf's event loop keeps serving) and only happen when what is on the server differs from
the rendered object (its content, see below, not only its hash annotation). What is on the server is
known from the operator's watches (`Live`, kept in kopf indexes) for the kinds it watches, so a pass
that changes nothing sends nothing; other kinds are read with a GET.

Every call has a deadline (a hung API server cannot wedge a reconcile pass), and a transient failure
(429 with its Retry-After, 5xx, a dropped connection, a conflict on a patch) is retried a few times
with a short backoff before the pass gives up and the handler's own backoff takes over. Each write is
idempotent, so a retry after a lost answer does no harm: a create that did happen answers 409 and the
live object is read and compared instead (as when the watch has not shown
an object yet), patches carry the whole wanted state, and Events are created under
a name chosen once, so a retried post never makes a second Event.

Ownership, drift and refusals (docs/operator.md, "How it runs"):

* The Writer only ever patches an object whose controller ownerReference is the LlamaDeployment it
  writes for. Anything else of the same name (a Service someone made, a claim of another app, a
  Deployment left by a deleted LlamaDeployment of the same name) is a conflict: nothing of it is
  changed, and `Applied` says who holds it.
* Whether an owned object is as rendered is judged from its content, not only from the operator's hash
  annotation: `content_fingerprint` hashes what the operator owns of an object (its spec, and its own
  labels and annotations) with the fields the API server defaults or assigns taken out, so a hand edit
  of an owned Deployment (an image, a securityContext, a volume, replicas) is seen and written back,
  while a server's defaulting is not taken for a change. What the server answered to the operator's own
  write is remembered as well (`Applied.fingerprint`), so defaulting this module does not know costs at
  most one write, never a write per pass.
* A write the API server refuses for good (a 4xx other than 401, 404, 409 and 429: an invalid object,
  an admission webhook's no) is not retried here and not raised: `Applied` carries the server's message.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, TypeVar

import kopf
import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ConflictError, DynamicApiError, NotFoundError
from urllib3.exceptions import HTTPError as Urllib3Error

from .api import API_VERSION, KIND
from .ownership import (HASH_ANNOTATION, OUR_ANNOTATION_PREFIXES, OUR_LABEL_PREFIXES, canonical, owner_uid,
                        sha256_hex)
from .units import quantity_exact, utc_now


USER_AGENT = "llama-operator"
EVENT_SOURCE = "llama-operator"
#: (connect, read) seconds for every request the Writer sends.
REQUEST_TIMEOUT = (5.0, 30.0)
#: Attempts per request for transient failures, and the cap on a server's Retry-After.
ATTEMPTS = 4
MAX_RETRY_AFTER = 10.0
EVENT_MESSAGE_LIMIT = 1024  # what the API server accepts
#: Requests the Writer has in flight at most (its own threads and connections: kopf runs its work in
#: the loop's default executor, which must not wait behind API calls).
WRITER_THREADS = 16

log = logging.getLogger("llama_operator")
_T = TypeVar("_T")
#: `Writer._apply`: the live object is not known, read it first.
_UNKNOWN = object()


def _transient(e: BaseException, *, conflict_ok: bool) -> float | None:
    """Seconds to wait before retrying after `e`, or None when retrying cannot help."""
    if isinstance(e, (DynamicApiError, kubernetes.client.ApiException)):
        status = getattr(e, "status", None)
        if status == 429:
            headers = getattr(e, "headers", None) or {}
            try:
                hint = float(headers.get("Retry-After") or 1.0)
            except (TypeError, ValueError):
                hint = 1.0
            return min(max(hint, 0.1), MAX_RETRY_AFTER)
        if status in (500, 502, 503, 504) or (status == 409 and conflict_ok):
            return 0.0  # the caller adds its backoff
        return None
    if isinstance(e, (Urllib3Error, ConnectionError, TimeoutError)):
        return 0.0
    return None


class ConfigError(Exception):
    """No way to reach a cluster: neither in-cluster config nor a usable kubeconfig."""


def load_client_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In-cluster config when running in a pod, else the kubeconfig (`kubeconfig`, $KUBECONFIG, ~/.kube/config).

    $KUBECONFIG is read now, not when the kubernetes package was imported.
    """
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            return cfg
        except kubernetes.config.ConfigException:
            pass
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    path = path.split(os.pathsep)[0]
    try:
        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
    except (kubernetes.config.ConfigException, FileNotFoundError, OSError, TypeError) as e:
        raise ConfigError(f"cannot load kubeconfig {path}: {e}") from None
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client's configuration (token, client certificates, CA)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


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
                   generation=int(meta.get("generation") or 0) if kind == "Deployment" else 0,
                   status=dict(body.get("status") or {}) if kind == "Deployment" else {},
                   controller=controller, fingerprint=content_fingerprint(kind, body),
                   resource_version=str(meta.get("resourceVersion") or ""),
                   assigned={k: spec[k] for k in SERVICE_ASSIGNED if k in spec} if kind == "Service" else {})
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


# --- what writing an object did -----------------------------------------------------------------------

CREATED, PATCHED, RESTORED, UNCHANGED = "created", "patched", "restored", "unchanged"
#: Not written: another owner's object of that name (CONFLICT), one a deleted LlamaDeployment of the same name
#: left for the garbage collector (SUPERSEDED), refused by the API server (REFUSED), or a Deployment held
#: back because the claim it mounts is one of those (BLOCKED).
CONFLICT, SUPERSEDED, REFUSED, BLOCKED = "conflict", "superseded", "refused", "blocked"
PROBLEMS = (CONFLICT, SUPERSEDED, REFUSED, BLOCKED)
#: Order of writes: the claim a Deployment mounts first, so a Deployment never mounts a claim that is not its own.
_APPLY_ORDER = {"PersistentVolumeClaim": 0, "Deployment": 1, "Service": 2}


class Applied(NamedTuple):
    """What applying one rendered object did.

    result: created | patched | restored (patched back after someone else changed it) | unchanged |
    conflict | superseded | refused | blocked. message: for the last four, what a person reads (who
    holds the object, the API server's answer). fingerprint: after a write, the content fingerprint of
    the object as the server answered. resource_version: for restored, the version that was undone."""

    result: str
    message: str = ""
    fingerprint: str | None = None
    resource_version: str = ""

    @property
    def problem(self) -> bool:
        return self.result in PROBLEMS


def holder(live: Live) -> str:
    """Who controls an object, for a message."""
    if live.controller is None:
        return "it has no controller"
    kind, name, uid = live.controller
    return f"it is controlled by {kind} {name} (uid {uid})"


def api_message(e: BaseException) -> str:
    """The API server's own message for a failed request (its Status body), else the status line."""
    body = getattr(e, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return str(message)
    return _short(e)


def refusal(e: BaseException) -> bool:
    """Whether the API server refused a write for good: retrying the same request cannot help (an invalid
    object, an admission webhook's or policy's no). Not: 401 (credentials), 404 and 409 (the Writer's
    own cases), 408 and 429 (transient)."""
    if not isinstance(e, (DynamicApiError, kubernetes.client.ApiException)):
        return False
    status = getattr(e, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (401, 404, 408, 409, 410, 429)


class Writer:
    """Creates and patches the objects a LlamaDeployment owns, and its status."""

    def __init__(self, cfg: kubernetes.client.Configuration):
        cfg = copy.copy(cfg)
        cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, WRITER_THREADS)
        self._api = kubernetes.client.ApiClient(cfg)
        self._api.user_agent = USER_AGENT
        self._threads = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="llama-operator-writer")
        self._dyn: dynamic.DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}
        #: The dynamic client's discovery cache is not thread-safe: the worker threads take turns.
        self._discovery = threading.Lock()

    def _resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        with self._discovery:
            if key not in self._resources:
                if self._dyn is None:
                    self._dyn = dynamic.DynamicClient(self._api)
                self._resources[key] = self._dyn.resources.get(api_version=api_version, kind=kind)
            return self._resources[key]

    def _call(self, what: str, fn: Callable[[], _T], *, conflict_ok: bool = False) -> _T:
        """fn(), retried on transient failures (see _transient) with a short jittered backoff."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                wait = _transient(e, conflict_ok=conflict_ok)
                if wait is None or attempt == ATTEMPTS:
                    raise
                wait = max(wait, 0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _short(e), attempt, ATTEMPTS - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    # --- sync bodies, run in a worker thread ---

    def _get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        res = self._call(f"discovery of {kind}", lambda: self._resource(api_version, kind))
        try:
            return self._call(f"get {kind} {namespace}/{name}", lambda: res.get(
                name=name, namespace=namespace, _request_timeout=REQUEST_TIMEOUT, serializer=_plain))
        except NotFoundError:
            return None

    def _read_live(self, api_version: str, kind: str, namespace: str, name: str) -> Live | None:
        body = self._get(api_version, kind, namespace, name)
        return None if body is None else Live.from_body(kind, body)

    def _apply(self, obj: dict, live: Live | None | object = _UNKNOWN, accepted: tuple[str, str] | None = None) -> Applied:
        """Create, or patch when the server's copy is not what was rendered (`is_current`); leave alone an
        object this LlamaDeployment does not control; report a refusal instead of raising it.

        `live`: the object as the watch shows it (None: not there); _UNKNOWN: read it first. The watch may
        lag behind a write it has not delivered yet: a create answered 409 reads the live object and
        compares it, and a patch answered 404 (deleted meanwhile) creates."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        meta = obj["metadata"]
        res = self._call(f"discovery of {kind}", lambda: self._resource(api_version, kind))
        if live is _UNKNOWN:
            live = self._read_live(api_version, kind, meta["namespace"], meta["name"])
        assert live is None or isinstance(live, Live)
        try:
            if live is None:
                try:
                    return self._create(res, obj)
                except ConflictError:  # it exists: made by an earlier pass whose answer was lost, or not watched
                    live = self._read_live(api_version, kind, meta["namespace"], meta["name"])
                    if live is None:
                        raise
            problem = ownership_problem(obj, live)
            if problem is not None:
                return problem
            if is_current(obj, live, accepted):
                return Applied(UNCHANGED)
            if kind == "PersistentVolumeClaim":
                return Applied(UNCHANGED)  # a claim's spec is immutable once bound; size changes are left to people
            try:
                body = self._patch(res, obj, live)
            except NotFoundError:  # deleted since the watch showed it
                return self._create(res, obj)
        except (DynamicApiError, kubernetes.client.ApiException) as e:
            if not refusal(e):
                raise
            return Applied(REFUSED, f"the API server refused {kind} {meta['namespace']}/{meta['name']}: "
                                    f"{api_message(e)}")
        fingerprint = content_fingerprint(kind, body) if isinstance(body, Mapping) else None
        changed = not isinstance(body, Mapping) or \
            str((body.get("metadata") or {}).get("resourceVersion") or "") != live.resource_version
        if not changed:  # the server's copy already held it: only this module's idea of defaults differed
            return Applied(UNCHANGED, fingerprint=fingerprint)
        if live.spec_hash == meta["annotations"].get(HASH_ANNOTATION):
            return Applied(RESTORED, f"{kind} {meta['namespace']}/{meta['name']} had been changed by someone else; "
                                     f"the operator wrote back what it renders", fingerprint, live.resource_version)
        return Applied(PATCHED, fingerprint=fingerprint)

    def _create(self, res, obj: dict) -> Applied:
        meta = obj["metadata"]
        body = self._call(f"create {obj['kind']} {meta['namespace']}/{meta['name']}", lambda: res.create(
            body=obj, namespace=meta["namespace"], _request_timeout=REQUEST_TIMEOUT, serializer=_plain))
        return Applied(CREATED, fingerprint=content_fingerprint(obj["kind"], body) if isinstance(body, Mapping)
                       else None)

    def _patch(self, res, obj: dict, live: Live) -> Any:
        """Write the rendered spec over the server's copy: the whole spec (a JSON patch replacing it), so
        fields someone else added (a privileged securityContext, a hostPath volume, a Service's
        externalIPs) go away, with a Service's server-assigned fields (clusterIP...) carried over; labels
        and annotations key by key, so others' keys survive. Returns the object as the server answered."""
        meta = obj["metadata"]
        spec = obj["spec"] if obj["kind"] != "Service" else {**obj["spec"], **live.assigned}
        body: list[dict] = [{"op": "replace", "path": "/spec", "value": spec}]
        for section in ("labels", "annotations"):
            if section not in live.sections:
                body.append({"op": "add", "path": f"/metadata/{section}", "value": {}})
            for k, v in meta.get(section, {}).items():
                body.append({"op": "add", "path": f"/metadata/{section}/{_escape(k)}", "value": v})
        return self._call(f"patch {obj['kind']} {meta['namespace']}/{meta['name']}", lambda: res.patch(
            body=body, name=meta["name"], namespace=meta["namespace"], content_type="application/json-patch+json",
            _request_timeout=REQUEST_TIMEOUT, serializer=_plain), conflict_ok=True)

    def _patch_status(self, namespace: str, name: str, status: dict) -> bool:
        res = self._call(f"discovery of {KIND}", lambda: self._resource(API_VERSION, KIND))
        try:
            self._call(f"patch status of {namespace}/{name}", lambda: res.status.patch(
                body={"status": status}, name=name, namespace=namespace,
                content_type="application/merge-patch+json", _request_timeout=REQUEST_TIMEOUT, serializer=_plain),
                conflict_ok=True)
        except NotFoundError:
            return False
        return True

    def _post_event(self, event: dict) -> None:
        res = self._call("discovery of Event", lambda: self._resource("v1", "Event"))
        meta = event["metadata"]
        try:
            self._call(f"post event {meta['namespace']}/{meta['name']}", lambda: res.create(
                body=event, namespace=meta["namespace"], _request_timeout=REQUEST_TIMEOUT, serializer=_plain))
        except ConflictError:
            pass  # posted by an earlier attempt whose answer was lost: the name is the event's identity
        except DynamicApiError as e:
            if _transient(e, conflict_ok=False) is not None:
                raise  # the API server is struggling: the pass is retried later, with this Event
            # Events are auxiliary: one the server refuses for good (403, 422) must not block the status.
            log.warning("the Event %s/%s was refused (%s); going on without it", meta["namespace"], meta["name"],
                        _short(e))

    # --- async API for handlers ---

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def close(self) -> None:
        """Let the worker threads go once the requests in flight are done."""
        self._threads.shutdown(wait=False)

    async def apply(self, objects: list[dict], known: Mapping[str, Mapping[str, Live]] | None = None,
                    accepted: Mapping[tuple[str, str], tuple[str, str]] | None = None,
                    refused: Mapping[tuple[str, str], tuple[str, str]] | None = None,
                    recheck: Collection[tuple[str, str]] = ()) -> list[Applied]:
        """Write each object that differs from the server's copy; one Applied per object, in their order.

        `known`: per kind, the objects of that kind the operator's watch shows ({name: Live}); kinds not in
        it are read with a GET first. `accepted`: per (kind, name), the (content hash, fingerprint) the
        server answered when this render was last written. `refused`: per (kind, name), the (content hash,
        message) of a write the server refused; the same render is not sent again (the caller drops the
        entry when it wants a retry). `recheck`: (kind, name) of objects to read with a GET whatever the
        watch shows (last found held by someone else, who may have removed it since). No trip to a writer
        thread when nothing is to be sent."""
        known, accepted, refused = known or {}, accepted or {}, refused or {}
        settled = [None if (obj["kind"], obj["metadata"]["name"]) in recheck
                   else self._settled(obj, known, accepted, refused) for obj in objects]
        if all(settled):
            return settled  # type: ignore[return-value]
        return await self._in_thread(self._apply_all, objects, known, accepted, refused, settled, set(recheck))

    @staticmethod
    def _settled(obj: dict, known: Mapping[str, Mapping[str, Live]], accepted: Mapping, refused: Mapping
                 ) -> Applied | None:
        """What applying `obj` comes to without a request, when the watch (or a remembered refusal) says."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        remembered = refused.get((kind, name))
        if remembered is not None and remembered[0] == obj["metadata"]["annotations"].get(HASH_ANNOTATION):
            return Applied(REFUSED, remembered[1])
        if kind not in known:
            return None
        live = known[kind].get(name)
        if live is None:
            return None
        problem = ownership_problem(obj, live)
        if problem is not None:
            return problem
        return Applied(UNCHANGED) if is_current(obj, live, accepted.get((kind, name))) else None

    def _apply_all(self, objects: list[dict], known: Mapping[str, Mapping[str, Live]], accepted: Mapping,
                   refused: Mapping, settled: list[Applied | None], recheck: Collection[tuple[str, str]] = ()
                   ) -> list[Applied]:
        results: list[Applied | None] = list(settled)
        claim_problem: Applied | None = None
        for i in sorted(range(len(objects)), key=lambda i: _APPLY_ORDER.get(objects[i]["kind"], 1)):
            obj = objects[i]
            kind, name = obj["kind"], obj["metadata"]["name"]
            if results[i] is None:
                if kind == "Deployment" and claim_problem is not None:
                    results[i] = Applied(BLOCKED, f"Deployment {obj['metadata']['namespace']}/{name} is not written "
                                                  f"while the claim it mounts is not its own")
                    continue
                live = known[kind].get(name) if kind in known and (kind, name) not in recheck else _UNKNOWN
                results[i] = self._apply(obj, live, accepted.get((kind, name)))
            if kind == "PersistentVolumeClaim" and results[i].problem:  # type: ignore[union-attr]
                claim_problem = results[i]
        return results  # type: ignore[return-value]

    async def record(self, events: Sequence[dict] = (), status: tuple[str, str, dict] | None = None) -> bool:
        """Post the Events (built by `event_body`; one that exists already, 409, counts as posted), then
        merge-patch the status ((namespace, name, status)) into a LlamaDeployment: a status is never
        written before the Events of its transition. Returns False when the LlamaDeployment is gone (the
        status patch answered 404). No trip to a writer thread when there is nothing to send."""
        if not events and status is None:
            return True
        return await self._in_thread(self._record, list(events), status)

    def _record(self, events: list[dict], status: tuple[str, str, dict] | None) -> bool:
        for event in events:
            self._post_event(event)
        return self._patch_status(*status) if status is not None else True

    async def write(self, objects: list[dict], known: Mapping[str, Mapping[str, Live]] | None = None,
                    events: Sequence[dict] = (), status: tuple[str, str, dict] | None = None) -> Written:
        """`apply` the objects, then `record` the Events and the status, whatever the objects came to."""
        applied = await self.apply(objects, known)
        found = await self.record(events, status)
        return Written(applied=[a.result for a in applied], status_found=found, details=applied)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object as the server has it now; None when it does not exist."""
        return await self._in_thread(self._get, api_version, kind, namespace, name)


class Written(NamedTuple):
    """What `Writer.write` did: per object, created | patched | unchanged | ... (see Applied); and whether
    the LlamaDeployment whose status it patched still exists (False: the patch answered 404, the object
    was deleted)."""

    applied: list[str]
    status_found: bool
    details: list[Applied] = []


def ownership_problem(obj: Mapping[str, Any], live: Live) -> Applied | None:
    """None when `live` is controlled by the LlamaDeployment `obj` is rendered for; else why it is left alone."""
    uid = owner_uid(obj)
    if live.owned_by(uid):
        return None
    meta = obj["metadata"]
    what = f"{obj['kind']} {meta['namespace']}/{meta['name']}"
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), {})
    if live.controller is not None and live.controller[0] == owner.get("kind") and live.controller[1] == owner.get("name"):
        return Applied(SUPERSEDED, f"{what} belongs to a deleted {owner.get('kind')} of the same name "
                                   f"(uid {live.controller[2]}); waiting for the garbage collector to remove it")
    return Applied(CONFLICT, f"{what} exists and is not owned by this {owner.get('kind') or 'owner'} ({holder(live)}); "
                             f"the operator leaves it as it is. Rename the {owner.get('kind') or 'owner'} or remove "
                             f"the {obj['kind']}")


def event_body(involved: dict, type_: str, reason: str, message: str, instance: str = "",
               seed: str | None = None) -> dict:
    """A core/v1 Event about `involved` (a LlamaDeployment's apiVersion/kind/name/namespace/uid).

    Its name is derived from `seed` (what identifies the occurrence: the caller passes the object's uid and
    the status the transition starts from) and the event itself, so posting it again, from a retry or
    from a restarted operator redoing the same pass, is answered 409 instead of making a second Event.
    Without a seed the name is random."""
    now = utc_now()
    if len(message) > EVENT_MESSAGE_LIMIT:
        message = message[:EVENT_MESSAGE_LIMIT - 3] + "..."
    if seed is None:
        suffix = uuid.uuid4().hex[:16]
    else:
        suffix = sha256_hex(json.dumps([seed, type_, reason, message]))[:16]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{involved['name'][:200]}.{suffix}", "namespace": involved["namespace"]},
        "involvedObject": dict(involved),
        "type": type_,
        "reason": reason,
        "message": message,
        "action": reason,
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
        "reportingInstance": instance or EVENT_SOURCE,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def _plain(_client, data: Any) -> Any:
    """The answer as the JSON it is: the dynamic client's default wraps every field of it in an object."""
    return data


def _short(e: BaseException) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    return f"{status} {reason}" if status else type(e).__name__


def _escape(key: str) -> str:
    """JSON pointer escaping (RFC 6901) for label keys like llama-operator.dev/model."""
    return key.replace("~", "~0").replace("/", "~1")
