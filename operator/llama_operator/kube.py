"""Talking to the Kubernetes API: connection settings, and writing the objects a plan renders.

The operator reaches any API server through a kubeconfig or in-cluster config; kopf gets the same
credentials through a login handler. Writes go through the official client's dynamic API (in a worker
thread, so kopf's event loop keeps serving) and only happen when the rendered object's hash differs
from the one already on the server. What is on the server is known from the operator's watches
(`Live`, kept in kopf indexes) for the kinds it watches, so a pass that changes nothing sends nothing;
other kinds are read with a GET.

Every call has a deadline (a hung API server cannot wedge a reconcile pass), and a transient failure
(429 with its Retry-After, 5xx, a dropped connection, a conflict on a patch) is retried a few times
with a short backoff before the pass gives up and the handler's own backoff takes over. Each write is
idempotent, so a retry after a lost answer does no harm: a create that did happen answers 409 and the
live object is read and compared instead (as when the watch has not shown
an object yet), patches carry the whole wanted state, and Events are created under
a name chosen once, so a retried post never makes a second Event.
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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple, TypeVar

import kopf
import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ConflictError, DynamicApiError, NotFoundError
from urllib3.exceptions import HTTPError as Urllib3Error

from .api import API_VERSION, KIND
from .render import HASH_ANNOTATION, sha256_hex


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
    """What the operator keeps of an object it owns, as its watch last showed it: enough to tell whether a
    write is due and how to write it, and the status a Deployment reports."""

    kind: str
    name: str
    spec_hash: str | None
    #: Which of metadata.labels / metadata.annotations exist: a JSON patch must create a missing map first.
    sections: frozenset[str]
    generation: int = 0
    status: dict = field(default_factory=dict)

    @property
    def observed(self) -> bool:
        """Whether the object's controller has acted on its latest spec (a Deployment's status describes it)."""
        return int(self.status.get("observedGeneration") or 0) >= self.generation

    @classmethod
    def from_body(cls, kind: str, body: Mapping[str, Any]) -> "Live":
        meta = body.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        return cls(kind=kind, name=meta.get("name") or "", spec_hash=annotations.get(HASH_ANNOTATION),
                   sections=frozenset(s for s in ("labels", "annotations") if meta.get(s)),
                   generation=int(meta.get("generation") or 0) if kind == "Deployment" else 0,
                   status=dict(body.get("status") or {}) if kind == "Deployment" else {})


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

    def _apply(self, obj: dict, known: Mapping[str, Live] | None = None) -> str:
        """Create, or patch when the content hash differs. Returns created | patched | unchanged.

        `known`: the objects of this kind the watch shows (by name); None: read the live object first.
        The watch may lag behind a write it has not delivered yet: a create answered 409 reads the live
        object and compares it, and a patch answered 404 (deleted meanwhile) creates."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        meta = obj["metadata"]
        res = self._call(f"discovery of {kind}", lambda: self._resource(api_version, kind))
        live = self._read_live(api_version, kind, meta["namespace"], meta["name"]) if known is None \
            else known.get(meta["name"])
        if live is None:
            try:
                return self._create(res, obj)
            except ConflictError:  # it exists: made by an earlier pass whose answer was lost, or not watched yet
                live = self._read_live(api_version, kind, meta["namespace"], meta["name"])
                if live is None:
                    raise
        if _is_current(obj, live):
            return "unchanged"
        if kind == "PersistentVolumeClaim":
            return "unchanged"  # a claim's spec is immutable once bound; size changes are left to people
        try:
            self._patch(res, obj, live)
        except NotFoundError:  # deleted since the watch showed it
            return self._create(res, obj)
        return "patched"

    def _create(self, res, obj: dict) -> str:
        meta = obj["metadata"]
        self._call(f"create {obj['kind']} {meta['namespace']}/{meta['name']}", lambda: res.create(
            body=obj, namespace=meta["namespace"], _request_timeout=REQUEST_TIMEOUT, serializer=_plain))
        return "created"

    def _patch(self, res, obj: dict, live: Live) -> None:
        meta = obj["metadata"]
        body: Any
        if obj["kind"] == "Deployment":
            # Replace the whole spec (JSON patch), so fields the new render drops really go away;
            # labels and annotations are merged key by key so others' keys survive.
            body = [{"op": "replace", "path": "/spec", "value": obj["spec"]}]
            for section in ("labels", "annotations"):
                if section not in live.sections:
                    body.append({"op": "add", "path": f"/metadata/{section}", "value": {}})
                for k, v in meta.get(section, {}).items():
                    body.append({"op": "add", "path": f"/metadata/{section}/{_escape(k)}", "value": v})
            content_type = "application/json-patch+json"
        else:
            # Services keep server-assigned fields (clusterIP): merge only what we own.
            body = {"metadata": {"labels": meta.get("labels", {}), "annotations": meta.get("annotations", {})},
                    "spec": {k: obj["spec"][k] for k in ("type", "selector", "ports") if k in obj["spec"]}}
            content_type = "application/merge-patch+json"
        self._call(f"patch {obj['kind']} {meta['namespace']}/{meta['name']}", lambda: res.patch(
            body=body, name=meta["name"], namespace=meta["namespace"], content_type=content_type,
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

    async def write(self, objects: list[dict], known: Mapping[str, Mapping[str, Live]] | None = None,
                    events: Sequence[dict] = (), status: tuple[str, str, dict] | None = None) -> Written:
        """One pass's writes, in this order: each object that differs from the server, the Events (built by
        `event_body`; one that exists already, 409, counts as posted), then the status, a merge patch of
        (namespace, name, status) into a LlamaDeployment. A status is never written before the Events of
        its transition. One trip to a writer thread for all of them, and none when there is nothing to send.

        `known`: per kind, the objects of that kind the operator's watch shows ({name: Live}); kinds not in
        it are read with a GET first."""
        known = known or {}
        results: list[str | None] = [
            "unchanged" if obj["kind"] in known and _is_current(obj, known[obj["kind"]].get(obj["metadata"]["name"]))
            else None for obj in objects]
        if all(results) and not events and status is None:
            return Written(applied=list(results), status_found=True)  # type: ignore[arg-type]
        return await self._in_thread(self._write, objects, known, results, list(events), status)

    def _write(self, objects: list[dict], known: Mapping[str, Mapping[str, Live]], results: list[str | None],
               events: list[dict], status: tuple[str, str, dict] | None) -> Written:
        applied = [done or self._apply(obj, known.get(obj["kind"])) for obj, done in zip(objects, results)]
        for event in events:
            self._post_event(event)
        found = self._patch_status(*status) if status is not None else True
        return Written(applied=applied, status_found=found)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object as the server has it now; None when it does not exist."""
        return await self._in_thread(self._get, api_version, kind, namespace, name)


class Written(NamedTuple):
    """What `Writer.write` did: per object, created | patched | unchanged; and whether the LlamaDeployment
    whose status it patched still exists (False: the patch answered 404, the object was deleted)."""

    applied: list[str]
    status_found: bool


def event_body(involved: dict, type_: str, reason: str, message: str, instance: str = "",
               seed: str | None = None) -> dict:
    """A core/v1 Event about `involved` (a LlamaDeployment's apiVersion/kind/name/namespace/uid).

    Its name is derived from `seed` (what identifies the occurrence: the caller passes the object's uid and
    the status the transition starts from) and the event itself, so posting it again, from a retry or
    from a restarted operator redoing the same pass, is answered 409 instead of making a second Event.
    Without a seed the name is random."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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


def _is_current(obj: dict, live: Live | None) -> bool:
    """Whether the object on the server carries the content hash of the rendered `obj` (nothing to write)."""
    return live is not None and live.spec_hash == obj["metadata"]["annotations"].get(HASH_ANNOTATION)


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


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
