"""Writing the objects a plan renders, the status, and Events.

Writes go through the official client's dynamic API (in a worker thread, so kopf's event loop keeps
serving) and only happen when what is on the server differs from the rendered object (its content, see
live.py, not only its hash annotation).

Every call has a deadline (a hung API server cannot wedge a reconcile pass), and a transient failure
(kubeclient.retry_delay) is retried a few times with a short backoff before the pass gives up and the
handler's own backoff takes over. Each write is idempotent, so a retry after a lost answer does no harm:
a create that did happen answers 409 and the live object is read and compared instead (as when the
watch has not shown an object yet), patches carry the whole wanted state, and Events are created under
a name chosen once, so a retried post never makes a second Event.

Ownership and refusals (docs/operator.md, "How it runs"):

* The Writer only ever patches an object whose controller ownerReference is the LlamaDeployment it
  writes for. Anything else of the same name (a Service someone made, a claim of another app, a
  Deployment left by a deleted LlamaDeployment of the same name) is a conflict: nothing of it is
  changed, and `Applied` says who holds it.
* A write the API server refuses for good (kubeclient.refusal: an invalid object, an admission
  webhook's no) is not retried here and not raised: `Applied` carries the server's message.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, TypeVar

import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ConflictError, DynamicApiError, NotFoundError

from .api import API_VERSION, KIND
from .kubeclient import USER_AGENT, api_message, refusal, retry_delay, status_line
from .live import WORKLOAD_KINDS, Live, content_fingerprint, is_current
from .ownership import HASH_ANNOTATION, owner_uid, sha256_hex
from .units import utc_now


EVENT_SOURCE = "llama-operator"
#: (connect, read) seconds for every request the Writer sends.
REQUEST_TIMEOUT = (5.0, 30.0)
#: Attempts per request for transient failures.
ATTEMPTS = 4
EVENT_MESSAGE_LIMIT = 1024  # what the API server accepts
#: Requests the Writer has in flight at most (its own threads and connections: kopf runs its work in
#: the loop's default executor, which must not wait behind API calls).
WRITER_THREADS = 16

log = logging.getLogger("llama_operator")
_T = TypeVar("_T")
#: `Writer._apply`: the live object is not known, read it first.
_UNKNOWN = object()


# --- what writing an object did -----------------------------------------------------------------------

CREATED, PATCHED, RESTORED, UNCHANGED = "created", "patched", "restored", "unchanged"
#: Not written: another owner's object of that name (CONFLICT), one a deleted LlamaDeployment of the same name
#: left for the garbage collector (SUPERSEDED), refused by the API server (REFUSED), or a Deployment held
#: back because the claim it mounts is one of those (BLOCKED).
CONFLICT, SUPERSEDED, REFUSED, BLOCKED = "conflict", "superseded", "refused", "blocked"
PROBLEMS = (CONFLICT, SUPERSEDED, REFUSED, BLOCKED)
#: Order of writes: the claim a Deployment mounts first, so a Deployment never mounts a claim that is not its own.
_APPLY_ORDER = {"PersistentVolumeClaim": 0, "Deployment": 1, "LeaderWorkerSet": 1, "Service": 2}
#: The API versions of what the operator deletes (Writer.delete): the workload a new plan replaced, the
#: NetworkPolicy a spec no longer asks for.
DELETABLE_API_VERSIONS = {"Deployment": "apps/v1", "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1",
                          "NetworkPolicy": "networking.k8s.io/v1"}


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
        """fn(), retried on transient failures (see kubeclient.retry_delay) with a short jittered backoff."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                wait = retry_delay(e, conflict_ok=conflict_ok)
                if wait is None or attempt == ATTEMPTS:
                    raise
                wait = max(wait, 0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, status_line(e), attempt, ATTEMPTS - 1, wait)
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

    def _apply(self, obj: dict, live: Live | None | object, accepted: tuple[str, str] | None) -> Applied:
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
            if retry_delay(e, conflict_ok=False) is not None:
                raise  # the API server is struggling: the pass is retried later, with this Event
            # Events are auxiliary: one the server refuses for good (403, 422) must not block the status.
            log.warning("the Event %s/%s was refused (%s); going on without it", meta["namespace"], meta["name"],
                        status_line(e))

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
        return await self._in_thread(self._apply_all, objects, known, accepted, settled, set(recheck))

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
                   settled: list[Applied | None], recheck: Collection[tuple[str, str]]) -> list[Applied]:
        results: list[Applied | None] = list(settled)
        claim_problem: Applied | None = None
        for i in sorted(range(len(objects)), key=lambda i: _APPLY_ORDER.get(objects[i]["kind"], 1)):
            obj = objects[i]
            kind, name = obj["kind"], obj["metadata"]["name"]
            if results[i] is None:
                if kind in WORKLOAD_KINDS and claim_problem is not None:
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

    async def delete(self, kind: str, namespace: str, name: str, owner_uid: str | None) -> bool:
        """Delete an object this LlamaDeployment controls (a Deployment or LeaderWorkerSet a new plan replaced, a
        NetworkPolicy its spec no longer asks for); read again first, so an object someone else now holds is
        left alone. Whether it was deleted."""
        return await self._in_thread(self._delete, kind, namespace, name, owner_uid)

    def _delete(self, kind: str, namespace: str, name: str, owner_uid: str | None) -> bool:
        api_version = DELETABLE_API_VERSIONS[kind]
        body = self._get(api_version, kind, namespace, name)
        if body is None or not Live.from_body(kind, body).owned_by(owner_uid):
            return False
        res = self._call(f"discovery of {kind}", lambda: self._resource(api_version, kind))
        uid = (body.get("metadata") or {}).get("uid")
        try:
            # The uid precondition: the object read above, not one created under its name since.
            self._call(f"delete {kind} {namespace}/{name}", lambda: res.delete(
                name=name, namespace=namespace, _request_timeout=REQUEST_TIMEOUT,
                body={"propagationPolicy": "Background", "preconditions": {"uid": uid}}))
        except NotFoundError:
            return False
        return True


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


def _escape(key: str) -> str:
    """JSON pointer escaping (RFC 6901) for label keys like llama-operator.dev/model."""
    return key.replace("~", "~0").replace("/", "~1")
