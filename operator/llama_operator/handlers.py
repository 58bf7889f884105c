"""The kopf shell: watches feed an in-memory view of the cluster and a work queue; a few workers run a
pass for each LlamaDeployment in the queue. A deployment is queued whenever something it depends on
changes, and on a slow resync (workqueue.py says why this is not a kopf daemon per object).

Thin by design: reading, calling the pure core (planner, reconcile.decide, render), writing.

What a pass reads comes from kopf indexes (Nodes, Pods holding resources, and the Deployments and
Services the operator owns), which kopf fills from the initial listings before any pass runs; a pass
that changes nothing sends no request. What wakes a pass is a change that can alter its outcome: a
spec, generation or deletion change of its LlamaDeployment (not the operator's own status
write); an owned object that differs from what the operator last wrote or saw; a Node or a Pod's use
of a node that changed; capacity freed by another deployment. A new plan only takes capacity that was
free after every other plan in force, so it wakes only the deployments waiting to upgrade.

Objects it does not own are never written: a Deployment, Service or claim of the same name that this
LlamaDeployment does not control is a conflict (status Degraded, one Warning Event), and stays as it is.
Owned objects are compared with their render by content (kube.is_current), so a hand edit is written
back. An object the API server refuses (an invalid toleration, a storage class name...) makes the
status Invalid with the server's message, once; the same render is not sent again before the spec (or
the plan) changes or the resync period has passed.

Reliability rules (tests/reliability/ proves them): a failed pass is retried with a backoff that
doubles up to `max_error_backoff_seconds` and resets after a good pass, so neither a broken object nor
an API outage makes a hot loop; an invalid spec is written down once (phase Invalid, one Warning
Event) and then costs nothing. A pass posts its Events before it writes the status that records the
transition, each under a name derived from that transition (the object's uid, the status the pass
started from, the event), so a pass that is retried or redone by a restarted operator posts the same
names again: an Event is neither lost (the status is not written until it is posted) nor doubled
(the API server answers 409 to the second post).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from collections.abc import Mapping
from typing import Any

import kopf

from . import api, placement, planner
from .api import GROUP, PLURAL, VERSION, SpecError
from .fields import name_problems
from .inventory import Inventory, Node, PodUsage, node_from_manifest, pod_usage
from .kube import BLOCKED, REFUSED, RESTORED, Applied, Writer, event_body
from .kubeclient import api_message, connection_info
from .live import Live, is_current, rendered_fingerprint
from .metrics import OperatorMetrics
from .peering import PeeringGate, own_priority
from .reconcile import (OWNERSHIP_CONFLICT, WAITING_FOR_GC, WARNING, Decision, ObjectIssue,
                        Observed, decide, decide_invalid, decide_objects)
from .ownership import FINALIZER, HASH_ANNOTATION, LABEL_DEPLOYMENT, MANAGED_BY, canonical
from .render import Images, Owner, render
from .status import ChosenPlan, LlamaDeploymentStatus
from .units import parse_time
from .workqueue import WorkQueue, Workers

log = logging.getLogger("llama_operator")

LD = (GROUP, VERSION, PLURAL)
#: The finalizer earlier builds had kopf put on every LlamaDeployment (for a daemon per object). No handler
#: needs it now; kopf takes it off the objects that still carry it, because `configure` still names it.
Key = tuple[str, str]  # (namespace, name)
#: The kinds of owned objects the operator watches (and so never reads before writing).
WATCHED_KINDS = ("Deployment", "Service")


@dataclass
class Settings:
    upgrade_delay: timedelta = timedelta(minutes=2)
    resync_seconds: float = 300.0
    error_backoff_seconds: float = 10.0
    #: A pass that keeps failing is retried after error_backoff_seconds, doubling up to this.
    max_error_backoff_seconds: float = 120.0
    images: Images = field(default_factory=Images)
    #: kopf peering priority; None: derived from $POD_ID / $HOSTNAME (replicas of one Deployment differ).
    peering_priority: int | None = None
    #: Passes run at once (on different deployments): one pass's writes overlap the others' planning.
    workers: int = 16
    #: At shutdown, how long the passes in progress may take to finish.
    stop_timeout_seconds: float = 15.0
    #: Taint keys a LlamaDeployment's tolerations never count for (`run --forbid-toleration`): in planning
    #: and in the pods (placement.effective_tolerations).
    forbidden_tolerations: frozenset[str] = placement.DEFAULT_FORBIDDEN_TOLERATIONS


@dataclass
class _Promise:
    """The plan a LlamaDeployment holds, for the others' planning: its replicas take capacity even
    before their pods exist."""

    spec: api.LlamaDeploymentSpec
    plan: ChosenPlan

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Promise) and self.spec == other.spec and self.plan.same_choice(other.plan)


@dataclass(frozen=True)
class Indexes:
    """kopf's indexes, as a pass reads them.

    nodes: {name: store of Node}; pods: {(namespace, pod): store of (PodUsage, owning deployment)};
    deployments and services: {(namespace, owning deployment): store of Live}."""

    nodes: Any
    pods: Any
    deployments: Any
    services: Any

    def owned(self, key: Key) -> dict[str, dict[str, Live]]:
        """The watched objects `key` owns, per kind and name, as `Writer.write` takes them."""
        return {kind: {live.name: live for live in index.get(key, ())}
                for kind, index in (("Deployment", self.deployments), ("Service", self.services))}


class OperatorState:
    """Everything the handlers share: the cluster view, plans in force, the work queue."""

    def __init__(self, writer: Writer, settings: Settings, metrics: OperatorMetrics, client_config=None):
        self.writer = writer
        self.settings = settings
        self.metrics = metrics
        self.client_config = client_config
        self.bodies: dict[Key, dict] = {}
        #: The status this operator last wrote, per deployment. The operator is the only writer of
        #: status, and watch events may still carry an older one, so decisions start from this.
        self.written_status: dict[Key, dict] = {}
        self.promises: dict[Key, _Promise] = {}
        #: Deployments waiting for a pass; fed by the watch handlers, the passes' timers and other passes.
        self.queue: WorkQueue[Key] = WorkQueue()
        #: Consecutive failed passes per deployment (the retry backoff doubles with each).
        self.failures: dict[Key, int] = {}
        #: With peering on: the workers wait while kopf has this replica paused (set by the runner).
        self.peering: PeeringGate | None = None
        #: kopf's indexes, as the startup handler hands them over (filled before any pass runs).
        self.indexes: Indexes | None = None
        self.workers: Workers[Key] | None = None
        self._inventory: Inventory | None = None
        #: The inventory with every promise reserved, in the order they were made, and how many that is:
        #: what a deployment with no plan or pods of its own yet (every new one) plans on.
        self._all_reserved: tuple[Inventory, int] | None = None
        #: The last state seen of each Node, of each Pod's use of a node, and of each owned object's
        #: status ((kind, namespace, name) -> status): a watch event that repeats it wakes nobody.
        self.seen_nodes: dict[str, Node] = {}
        self.seen_pods: dict[Key, tuple[PodUsage, str | None] | None] = {}
        self.seen_status: dict[tuple[str, str, str], dict] = {}
        #: The content fingerprint (kube.content_fingerprint) the operator last rendered for each owned
        #: object, recorded before it writes.
        self.rendered: dict[tuple[str, str, str], str] = {}
        #: Per deployment, per owned object (kind, name): the (content hash, fingerprint) the API server
        #: answered when the operator last wrote that render (its defaulting included).
        self.accepted: dict[Key, dict[tuple[str, str], tuple[str, str]]] = {}
        #: Per deployment, per owned object: (content hash, the server's message, when) of a write the API
        #: server refused. The same render is not sent again before the resync period has passed.
        self.refused: dict[Key, dict[tuple[str, str], tuple[str, str, float]]] = {}
        #: Per deployment, the owned objects last found held by someone else (or a deleted predecessor):
        #: the next pass reads them (GET) instead of trying to create them again.
        self.unowned: dict[Key, set[tuple[str, str]]] = {}

    # --- cluster view ---

    def invalidate(self) -> None:
        """The cluster changed: rebuild the inventory, and let every deployment re-plan."""
        self._inventory = None
        self._all_reserved = None
        self.wake_all()

    def wake_all(self) -> None:
        for key in self.bodies:
            self.queue.add(key)

    def wake(self, keys) -> None:
        for key in keys:
            if key in self.bodies:
                self.queue.add(key)

    def node_seen(self, name: str, node: Node | None) -> None:
        """A Node as its watch shows it now (None: deleted); the cluster changed when it differs."""
        before = self.seen_nodes.pop(name, None)
        if node is not None:
            self.seen_nodes[name] = node
        if before != node:
            self.invalidate()

    def pod_seen(self, key: Key, use: tuple[PodUsage, str | None] | None) -> None:
        """What a Pod takes from its node now and its owning deployment (None: nothing, or deleted)."""
        before = self.seen_pods.pop(key, None)
        if use is not None:
            self.seen_pods[key] = use
        if before != use:
            self.invalidate()

    def owned_seen(self, namespace: str, owner: str, live: Live, deleted: bool = False) -> None:
        """An owned object as its watch shows it: wake the owner when it is gone, carries another content
        than the operator rendered for it (a new render, or someone's hand edit: the content fingerprint
        says, not only the hash annotation), or reports a new status. The operator's own create or patch
        (its event may arrive before the write's answer) wakes nobody."""
        ident = (live.kind, namespace, live.name)
        status_before = self.seen_status.pop(ident, {})
        if deleted:
            self.wake([(namespace, owner)])
            return
        self.seen_status[ident] = live.status
        accepted = self.accepted.get((namespace, owner), {}).get((live.kind, live.name))
        expected = live.fingerprint == self.rendered.get(ident) or \
            (accepted is not None and accepted == (live.spec_hash, live.fingerprint))
        if not expected or live.status != status_before:
            self.wake([(namespace, owner)])

    def applied(self, key: Key, objects: list[dict], applied: list[Applied], refused: Mapping) -> list[str]:
        """Record what writing `key`'s objects came to: what the server answered (accepted fingerprints),
        refusals (with when, unless `refused` shows the pass only remembered them), objects held by
        others. Returns the refusals that are new, for the log."""
        now = time.monotonic()
        accepted = self.accepted.setdefault(key, {})
        refusals = self.refused.setdefault(key, {})
        unowned = self.unowned.setdefault(key, set())
        new = []
        for obj, a in zip(objects, applied):
            ident = (obj["kind"], obj["metadata"]["name"])
            content = obj["metadata"]["annotations"].get(HASH_ANNOTATION) or ""
            if a.fingerprint:
                accepted[ident] = (content, a.fingerprint)
            if a.result == REFUSED:
                if ident not in refused:  # sent, and refused (again)
                    before = refusals.get(ident)
                    if before is None or before[:2] != (content, a.message):
                        new.append(a.message)
                    refusals[ident] = (content, a.message, now)
            elif a.result != BLOCKED:
                refusals.pop(ident, None)
            if a.problem and a.result != REFUSED and a.result != BLOCKED:
                unowned.add(ident)
            else:
                unowned.discard(ident)
        return new

    def refusals_for(self, key: Key) -> dict[tuple[str, str], tuple[str, str]]:
        """The refusals of `key`'s objects not to send again yet: younger than the resync period."""
        now = time.monotonic()
        return {ident: (content, message) for ident, (content, message, when) in self.refused.get(key, {}).items()
                if now - when < self.settings.resync_seconds}

    # --- promises (kept in the order they were made: each was planned with the earlier ones reserved) ---

    def set_promise(self, key: Key, promise: _Promise) -> _Promise | None:
        """Record the plan `key` holds; returns the one it held before."""
        before = self.promises.pop(key, None)
        self.promises[key] = promise
        if before is not None:
            self._all_reserved = None  # no longer a prefix of the order
        return before

    def drop_promise(self, key: Key) -> bool:
        if self.promises.pop(key, None) is None:
            return False
        self._all_reserved = None
        return True

    def inventory_for(self, key: Key) -> Inventory:
        """The cluster minus what others hold or are promised; this deployment's own pods count as free."""
        indexes = self.indexes
        assert indexes is not None, "the startup handler hands over kopf's indexes before any pass"
        pods: list[tuple[Key, PodUsage, str | None]] = [
            (pod_key, usage, owner) for pod_key, store in indexes.pods.items() for usage, owner in store
        ]
        if self._inventory is None:
            nodes = [node for store in indexes.nodes.values() for node in store]
            self._inventory = Inventory(nodes, [usage for _, usage, _ in pods])
            self._all_reserved = None
        own = [usage for (ns, _), usage, owner in pods if ns == key[0] and owner == key[1]]
        bound: dict[Key, int] = {}
        for (ns, _), _, owner in pods:
            if owner:
                bound[(ns, owner)] = bound.get((ns, owner), 0) + 1

        def reserve(inv: Inventory, other: Key, promise: _Promise) -> Inventory:
            missing = promise.spec.replicas - bound.get(other, 0)  # replicas without a bound pod yet
            return placement.reserve_plan(inv, promise.spec, promise.plan, missing,
                                          forbidden_tolerations=self.settings.forbidden_tolerations) \
                if missing > 0 else inv

        if not own and key not in self.promises:  # extend the cached fold by the promises made since
            inv, folded = self._all_reserved or (self._inventory, 0)
            for other, promise in list(self.promises.items())[folded:]:
                inv = reserve(inv, other, promise)
            self._all_reserved = (inv, len(self.promises))
            return inv
        inv = self._inventory.release(own) if own else self._inventory
        for other, promise in self.promises.items():
            if other != key:
                inv = reserve(inv, other, promise)
        return inv

    def forget(self, key: Key) -> None:
        """`key` was deleted: drop what the operator keeps about it."""
        self.bodies.pop(key, None)
        self.written_status.pop(key, None)
        self.failures.pop(key, None)
        self.queue.forget(key)
        for kind in WATCHED_KINDS:  # named like their owner
            self.rendered.pop((kind, *key), None)
        for kept in (self.accepted, self.refused, self.unowned):
            kept.pop(key, None)
        if self.drop_promise(key):
            self.wake_all()  # its capacity is free again
        self.metrics.forget_deployment(*key)


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf deep-copies every watched object's essence on every event (Nodes, Pods, Deployments...), to diff
    it for on.create / on.update handlers. The operator has none (indexes and event handlers only), so
    there is no essence to build, keep or compare."""

    def build(self, *, body, extra_fields=None):  # noqa: ARG002 - kopf's signature
        return None

    def fetch(self, *, body):  # noqa: ARG002
        return None

    def store(self, *, body, patch, essence) -> None:  # noqa: ARG002
        return None


def _state(memo: kopf.Memo) -> OperatorState:
    return memo["state"]


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the operator's handlers to `registry`."""

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, node_index: kopf.Index,
                        pod_index: kopf.Index, deployment_index: kopf.Index, service_index: kopf.Index, **_):
        settings.persistence.diffbase_storage = _NoDiffBase()
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = memo.get("watch_timeout", 300)
        settings.posting.level = logging.WARNING
        if "state" not in memo or _state(memo).workers is not None:  # kopf retries a startup handler that failed
            return
        state = _state(memo)
        # Replicas of one Deployment start with the same arguments, and kopf pauses all peers of equal
        # priority: each takes its priority from its own pod identity, unless Settings.peering_priority
        # says (several operators in one process, as in tests). The peering gate applies the same one.
        settings.peering.priority = own_priority(state.settings.peering_priority)
        # kopf's index objects stay the same objects as they fill; kopf runs no handler before they are full.
        state.indexes = Indexes(nodes=node_index, pods=pod_index, deployments=deployment_index,
                                services=service_index)
        gate = None
        if state.peering is not None:
            state.peering.start()
            gate = state.peering.wait
        state.workers = Workers(state.queue, functools.partial(run_pass, state), state.settings.workers, gate)
        state.workers.start()

    @kopf.on.cleanup(id="stop_workers", registry=registry)
    async def stop_workers(memo: kopf.Memo, **_):
        if "state" not in memo:
            return
        state = _state(memo)
        if state.workers is not None:
            await state.workers.stop(state.settings.stop_timeout_seconds)
        if state.peering is not None:
            await state.peering.stop()

    @kopf.on.login(id="login", registry=registry)
    def login(memo: kopf.Memo, **_):
        return connection_info(_state(memo).client_config)

    # Indexes: kopf starts no other handler until these are filled from the initial listing, so the
    # first plan of every deployment sees the whole cluster.
    # These handlers and the watch handlers are coroutines: kopf runs a plain function in a worker
    # thread, and they touch the shared state and the work queue, which belong to the loop.
    @kopf.index("", "v1", "nodes", id="node_index", registry=registry)
    async def node_index(name: str, body: kopf.Body, **_):
        return {name: node_from_manifest(dict(body))}

    @kopf.index("", "v1", "pods", id="pod_index", registry=registry)
    async def pod_index(namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, **_):
        use = _pod_use(body, labels)
        return None if use is None else {(namespace, name): use}

    @kopf.index("apps", "v1", "deployments", labels=MANAGED_BY, id="deployment_index", registry=registry)
    async def deployment_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("Deployment", body)} if owner else None

    @kopf.index("", "v1", "services", labels=MANAGED_BY, id="service_index", registry=registry)
    async def service_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("Service", body)} if owner else None

    # kopf updates the indexes before it calls these, so a pass they wake reads the new state.
    @kopf.on.event("", "v1", "nodes", id="node_event", registry=registry)
    async def node_event(type: str, name: str, body: kopf.Body, memo: kopf.Memo, **_):
        _state(memo).node_seen(name, None if type == "DELETED" else node_from_manifest(dict(body)))

    @kopf.on.event("", "v1", "pods", id="pod_event", registry=registry)
    async def pod_event(type: str, namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, memo: kopf.Memo, **_):
        _state(memo).pod_seen((namespace, name), None if type == "DELETED" else _pod_use(body, labels))

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY, id="deployment_event", registry=registry)
    async def deployment_event(type: str, namespace: str, body: kopf.Body, labels: kopf.Labels, memo: kopf.Memo, **_):
        if labels.get(LABEL_DEPLOYMENT):
            _state(memo).owned_seen(namespace, labels[LABEL_DEPLOYMENT], Live.from_body("Deployment", body),
                                    deleted=type == "DELETED")

    @kopf.on.event("", "v1", "services", labels=MANAGED_BY, id="service_event", registry=registry)
    async def service_event(type: str, namespace: str, body: kopf.Body, labels: kopf.Labels, memo: kopf.Memo, **_):
        if labels.get(LABEL_DEPLOYMENT):
            _state(memo).owned_seen(namespace, labels[LABEL_DEPLOYMENT], Live.from_body("Service", body),
                                    deleted=type == "DELETED")

    @kopf.on.event(*LD, id="llamadeployment_event", registry=registry)
    async def llamadeployment_event(type: str, body: kopf.Body, memo: kopf.Memo, **_):
        state = _state(memo)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if type == "DELETED":
            state.forget(key)
            return
        before = state.bodies.get(key)
        state.bodies[key] = dict(body)
        if _needs_pass(before, state.bodies[key]):
            state.queue.add(key)


async def run_pass(state: OperatorState, key: Key) -> None:
    """A worker's pass for `key`, and when the next unprompted one is due: after the resync period, when a
    waiting upgrade has waited long enough, or after a failure, with a backoff that doubles up to
    `max_error_backoff_seconds` and resets after a good pass (no hot loop on a broken object or an API
    outage)."""
    if key not in state.bodies:
        return  # deleted since it was queued
    settings = state.settings
    try:
        decision = await reconcile(state, key)
    except Exception as e:  # noqa: BLE001 - logged, retried
        failures = state.failures[key] = state.failures.get(key, 0) + 1
        backoff = min(settings.error_backoff_seconds * 2 ** (failures - 1),
                      max(settings.max_error_backoff_seconds, settings.error_backoff_seconds))
        if isinstance(getattr(e, "status", None), int):  # the API server's answer: it says what went wrong
            log.error("reconcile of %s/%s failed: %s (%s); retrying in %gs", *key, getattr(e, "status"),
                      api_message(e), backoff)
        else:
            log.exception("reconcile of %s/%s failed; retrying in %gs", *key, backoff)
        if key in state.bodies:
            state.queue.add_after(key, backoff)
        return
    state.failures.pop(key, None)
    if key not in state.bodies:
        return  # deleted during the pass
    delay = settings.resync_seconds
    if decision is not None and any(c.type == "Progressing" and c.reason == WAITING_FOR_GC
                                    for c in decision.status.conditions):
        delay = min(delay, settings.error_backoff_seconds)  # the claim is not watched: look again soon
    pending = decision.status.pendingChange if decision is not None else None
    if pending is not None:  # wake when the better plan has waited long enough
        due = parse_time(pending.since) \
            + settings.upgrade_delay
        delay = min(delay, max(0.5, (due - datetime.now(timezone.utc)).total_seconds() + 0.5))
    state.queue.add_after(key, delay)


def _parse_spec(raw: Any) -> api.LlamaDeploymentSpec:
    """api.parse_spec, where any failure is a SpecError: a spec that trips an unexpected error in the checks
    (a bug) is reported as Invalid like any other bad spec, instead of failing every pass for ever."""
    try:
        return api.parse_spec(raw)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001
        log.debug("parsing a spec raised %r; reporting it as invalid", e)
        raise SpecError(_enum_problems(raw) or [f"spec: cannot be read ({type(e).__name__}: {e})"]) from e


def _enum_problems(raw: Any) -> list[str]:
    """Values outside the enums the CRD declares (the API server would refuse them), field by field."""
    from .crd import openapi_schema  # only on this rare path

    problems: list[str] = []

    def walk(schema: dict, value: Any, path: str) -> None:
        if "enum" in schema and isinstance(value, (str, int, float, bool)) and value not in schema["enum"]:
            problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
        if isinstance(value, dict):
            for k, sub in (schema.get("properties") or {}).items():
                if k in value:
                    walk(sub, value[k], f"{path}.{k}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                walk(schema["items"], item, f"{path}[{i}]")

    if isinstance(raw, dict):
        walk(openapi_schema()["properties"]["spec"], raw, "spec")
    return problems


def _without_nulls(value: Any) -> Any:
    """A status as the server keeps it: a merge patch drops the fields it sets to null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _lenient_status(raw: Any) -> LlamaDeploymentStatus:
    """The status as last written; an unreadable one (edited by hand) counts as empty."""
    try:
        return LlamaDeploymentStatus.model_validate(raw or {})
    except Exception:  # noqa: BLE001
        return LlamaDeploymentStatus()


def _needs_pass(before: dict | None, body: dict) -> bool:
    """Whether a LlamaDeployment's watch event can change what a pass does. The operator's own status write
    and others' annotations cannot; a new object, a spec change and a deletion can."""
    if before is None:
        return True
    old, new = before["metadata"], body["metadata"]
    return before.get("spec") != body.get("spec") or any(
        old.get(k) != new.get(k) for k in ("uid", "generation", "deletionTimestamp"))


def _pod_use(body: kopf.Body, labels: kopf.Labels) -> tuple[PodUsage, str | None] | None:
    """What a pod takes from its node, and the LlamaDeployment owning it; None when it takes nothing."""
    usage = pod_usage(dict(body))
    if usage is None or (usage.gpus == 0 and usage.cpu_millis == 0 and usage.memory_bytes == 0):
        return None
    return usage, labels.get(LABEL_DEPLOYMENT)


async def reconcile(state: OperatorState, key: Key) -> Decision | None:
    """One pass for one LlamaDeployment: plan, decide, render and apply, write status and events.

    The work queue never runs two passes of one deployment at once. A pass racing the deletion of its
    LlamaDeployment may still create a Deployment for an owner that is gone: the garbage collector removes
    it, as it removes everything a deleted LlamaDeployment owns."""
    body = state.bodies.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    started = time.monotonic()
    namespace, name = key
    meta = body["metadata"]
    raw_status = state.written_status.get(key, body.get("status") or {})
    status = _lenient_status(raw_status)
    obs = Observed(name=name, namespace=namespace, generation=int(meta.get("generation") or 1), status=status,
                   deployment_status=None, now=datetime.now(timezone.utc),
                   upgrade_delay=state.settings.upgrade_delay)
    error = False
    uid = meta.get("uid")
    try:
        objects: list[dict] = []
        owned: dict[str, dict[str, Live]] = {}
        problems = name_problems(name)
        try:
            spec: api.LlamaDeploymentSpec | None = _parse_spec(body.get("spec"))
        except SpecError as e:
            problems = problems + e.problems
            spec = None
        if problems or spec is None:
            decision = decide_invalid(obs, problems)
            spec = None
        else:
            owned = state.indexes.owned(key)
            deployment = owned["Deployment"].get(name)
            if deployment is not None and not deployment.owned_by(uid):
                deployment = None  # someone else's Deployment of that name: its status is not ours
            if deployment is not None:
                obs = replace(obs, deployment_status=deployment.status)
            # From reading the inventory to recording the promise, nothing awaits: no other deployment's
            # pass can plan in between, so two never take the same free GPUs (nor flip between them).
            inventory = state.inventory_for(key)
            forbidden = state.settings.forbidden_tolerations
            plan = planner.plan(spec, inventory, forbidden_tolerations=forbidden)
            current = status.plan
            problems = planner.check_choice(spec, inventory, current, forbidden_tolerations=forbidden) \
                if current is not None else None
            decision = decide(obs, spec, plan, problems)
            if decision.apply is not None:
                _promise(state, key, spec, decision)
                owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
                pod_spec = placement.with_pod_tolerations(spec, inventory, decision.apply, forbidden)
                objects = render(owner, pod_spec, decision.apply, state.settings.images)
                runs = deployment is not None and _runs(deployment, objects, state.accepted.get(key, {}))
                if deployment is not None and runs != decision.apply.same_choice(current):
                    # decide assumed the Deployment runs the plan in force; it knows better now.
                    obs = replace(obs, deployment_runs_plan=runs)
                    decision = decide(obs, spec, plan, problems)
                for obj in objects:
                    if obj["kind"] in WATCHED_KINDS:
                        state.rendered[(obj["kind"], namespace, obj["metadata"]["name"])] = rendered_fingerprint(obj)
        restored: list[tuple[dict, Applied]] = []
        if objects:
            # Objects last found held by someone else are read again (a GET), not created again (a 409).
            unowned = state.unowned.get(key, set())
            known = {kind: {n: live for n, live in lives.items() if (kind, n) not in unowned}
                     for kind, lives in owned.items()}
            refused = state.refusals_for(key)
            applied = await state.writer.apply(objects, known, state.accepted.get(key, {}), refused,
                                               recheck=unowned)
            if key not in state.bodies:
                return None  # deleted during the pass
            for message in state.applied(key, objects, applied, refused):
                log.warning("%s; not sent again before the spec changes or the next resync", message)
            issues = [ObjectIssue(a.result, a.message) for a in applied if a.problem]
            decision = decide_objects(obs, decision, issues)
            restored = [(obj, a) for obj, a in zip(objects, applied) if a.result == RESTORED]
        involved = {"apiVersion": body.get("apiVersion") or api.API_VERSION, "kind": body.get("kind") or api.KIND,
                    "name": name, "namespace": namespace, "uid": uid}
        instance = os.environ.get("POD_ID") or os.environ.get("HOSTNAME", "")
        events = []
        if decision.events:
            seed = canonical([uid, status.model_dump(mode="json", exclude_none=True)])
            events = [event_body(involved, etype, reason, message, instance, seed=seed)
                      for etype, reason, message in decision.events]
            for etype, reason, message in decision.events:
                if reason == OWNERSHIP_CONFLICT:  # (a refusal is logged where it is new, above)
                    log.warning("%s/%s: %s", namespace, name, message)
        for obj, a in restored:  # one Event per hand edit undone (the version undone names it)
            log.warning("%s/%s: %s", namespace, name, a.message)
            events.append(event_body(involved, WARNING, "DriftCorrected", a.message, instance,
                                     seed=canonical([uid, obj["kind"], obj["metadata"]["name"], a.resource_version])))
        new_status = decision.status.model_dump(mode="json")
        status_changed = _without_nulls(new_status) != _without_nulls(raw_status)
        found = await state.writer.record(events, (namespace, name, new_status) if status_changed else None)
        if not found:
            return None  # deleted during the pass
        if status_changed:
            state.written_status[key] = new_status
        if key not in state.bodies:
            return None  # deleted during the pass: no metrics for it
        _publish(state, key, spec, decision)
        return decision
    except Exception:
        error = key in state.bodies  # a write that failed because the object went is no error
        raise
    finally:
        state.metrics.observe_reconcile(time.monotonic() - started, error=error, namespace=namespace, name=name)


def _promise(state: OperatorState, key: Key, spec: api.LlamaDeploymentSpec, decision: Decision) -> None:
    """Record the plan `key` now holds, and wake the deployments it may concern.

    A first plan takes only capacity that was free with every other plan in force reserved, so it breaks
    none of them; it can only take what a waiting upgrade counted on, so those re-check at once. A plan
    that moved or changed size may free capacity anyone could use: everyone re-plans."""
    if decision.apply is None:
        return
    promise = _Promise(spec=spec, plan=decision.apply)
    if state.promises.get(key) == promise:
        return
    if state.set_promise(key, promise) is None:
        state.wake(other for other, written in state.written_status.items()
                   if other != key and written.get("pendingChange"))
    else:
        state.wake_all()


def _runs(deployment: Live, objects: list[dict], accepted: Mapping[tuple[str, str], tuple[str, str]]) -> bool:
    """Whether the Deployment's status is about the rendered spec: it holds the render (kube.is_current:
    the content, not only the hash annotation), and its controller has observed that generation.
    Otherwise a rollout is starting (or the watch has not shown this operator's patch yet, or someone
    changed it by hand), and the replicas it counts are not the rendered ones."""
    rendered = next(o for o in objects if o["kind"] == "Deployment")
    return is_current(rendered, deployment, accepted.get(("Deployment", rendered["metadata"]["name"]))) \
        and deployment.observed


def _publish(state: OperatorState, key: Key, spec: api.LlamaDeploymentSpec | None, decision: Decision) -> None:
    status = decision.status
    if decision.events:
        state.metrics.record_plan_outcome(decision.outcome)
    plan = status.plan
    state.metrics.set_deployment(
        key[0], key[1],
        phase=status.phase or "Pending",
        requested_model=spec.model if spec else "",
        model=plan.model if plan else "",
        quantization=plan.quantization if plan else "",
        runtime=plan.runtime if plan else "",
        gpu_product=plan.gpuProduct if plan else None,
        fallback=bool(status.fallback and status.fallback.inForce),
        slo_ttft_s=spec.slo.ttft_seconds if spec else None,
        slo_tpot_s=spec.slo.tpot_seconds if spec else None,
        predicted_ttft_s=plan.predicted.ttftSeconds if plan else None,
        predicted_tpot_s=plan.predicted.tpotSeconds if plan else None,
        replicas_desired=spec.replicas if spec else 0,
        replicas_ready=status.readyReplicas or 0,
    )
