"""The kopf shell: watches feed an in-memory view of the cluster (state.py) and a work queue; a few
workers run a pass (passes.py) for each LlamaDeployment in the queue. A deployment is queued whenever
something it depends on changes (state.py says what does), and on a slow resync (workqueue.py says why
this is not a kopf daemon per object).

What a pass reads comes from kopf indexes (Nodes, Pods holding resources, and the Deployments and
Services the operator owns), which kopf fills from the initial listings before any pass runs.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import kopf

from .api import GROUP, PLURAL, VERSION
from .inventory import node_from_manifest
from .kubeclient import connection_info
from .live import Live
from .ownership import FINALIZER, LABEL_DEPLOYMENT, MANAGED_BY
from .passes import run_pass
from .slo_watch import model_pod, observe_forever
from .state import LWS_CRD, Indexes, OperatorState, pod_use
from .workqueue import Workers

LD = (GROUP, VERSION, PLURAL)
LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the operator's handlers to `registry`: kopf runs startup handlers in the order they were
    registered, so the runner's own come after `configure`."""
    _register_lifecycle(registry)
    _register_indexes(registry)
    _register_watches(registry)


def _register_lifecycle(registry: kopf.OperatorRegistry) -> None:
    """Startup (kopf's settings, the indexes handed to the state, the workers), cleanup and login."""

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, node_index: kopf.Index,
                        pod_index: kopf.Index, deployment_index: kopf.Index, service_index: kopf.Index,
                        model_pod_index: kopf.Index, leaderworkerset_index: kopf.Index,
                        networkpolicy_index: kopf.Index, **_):
        _configure_kopf(settings, memo.get("watch_timeout", 300))
        if "state" not in memo or _state(memo).workers is not None:  # kopf retries a startup handler that failed
            return
        state = _state(memo)
        # Replicas of one Deployment start with the same arguments, and kopf pauses all peers of equal
        # priority: hand kopf the priority the peering gate applies too.
        settings.peering.priority = state.peering_priority
        # kopf's index objects stay the same objects as they fill; kopf runs no handler before they are full.
        state.indexes = Indexes(nodes=node_index, pods=pod_index, deployments=deployment_index,
                                services=service_index, model_pods=model_pod_index,
                                leaderworkersets=leaderworkerset_index, networkpolicies=networkpolicy_index)
        _start_workers(state)
        if state.observer is not None:
            state.slo_task = asyncio.get_running_loop().create_task(observe_forever(state), name="slo-loop")

    @kopf.on.cleanup(id="stop_workers", registry=registry)
    async def stop_workers(memo: kopf.Memo, **_):
        if "state" not in memo:
            return
        state = _state(memo)
        if state.slo_task is not None:
            state.slo_task.cancel()
        if state.workers is not None:
            await state.workers.stop(state.settings.stop_timeout_seconds)
        if state.peering is not None:
            await state.peering.stop()

    @kopf.on.login(id="login", registry=registry)
    def login(memo: kopf.Memo, **_):
        return connection_info(_state(memo).client_config)


def _configure_kopf(settings: kopf.OperatorSettings, watch_timeout: int) -> None:
    settings.persistence.diffbase_storage = _NoDiffBase()
    # No handler needs a finalizer; naming this one lets kopf take it off the LlamaDeployments that still
    # carry it from operator versions that ran a kopf daemon per object.
    settings.persistence.finalizer = FINALIZER
    settings.watching.server_timeout = watch_timeout
    settings.posting.level = logging.WARNING


def _start_workers(state: OperatorState) -> None:
    """Start the workers; with peering on, they wait at the peering gate while kopf has this replica paused."""
    gate = None
    if state.peering is not None:
        state.peering.start()
        gate = state.peering.wait
    state.workers = Workers(state.queue, functools.partial(run_pass, state), state.settings.workers, gate)
    state.workers.start()


def _register_indexes(registry: kopf.OperatorRegistry) -> None:
    """What a pass reads. kopf starts no other handler until these are filled from the initial listing, so
    the first plan of every deployment sees the whole cluster.

    These handlers and the watch handlers are coroutines: kopf runs a plain function in a worker thread,
    and they touch the shared state and the work queue, which belong to the loop."""

    @kopf.index("", "v1", "nodes", id="node_index", registry=registry)
    async def node_index(name: str, body: kopf.Body, **_):
        return {name: node_from_manifest(dict(body))}

    @kopf.index("", "v1", "pods", id="pod_index", registry=registry)
    async def pod_index(namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, **_):
        use = pod_use(body, labels)
        return None if use is None else {(namespace, name): use}

    @kopf.index("", "v1", "pods", labels=MANAGED_BY, id="model_pod_index", registry=registry)
    async def model_pod_index(namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, **_):
        endpoint = model_pod(namespace, name, body, labels)
        return None if endpoint is None else {(namespace, name): endpoint}

    @kopf.index("apps", "v1", "deployments", labels=MANAGED_BY, id="deployment_index", registry=registry)
    async def deployment_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("Deployment", body)} if owner else None

    @kopf.index("", "v1", "services", labels=MANAGED_BY, id="service_index", registry=registry)
    async def service_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("Service", body)} if owner else None

    # Watched so that the one a LlamaDeployment no longer asks for (access.allowedClients removed) is deleted.
    @kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED_BY, id="networkpolicy_index",
                registry=registry)
    async def networkpolicy_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("NetworkPolicy", body)} if owner else None

    # Served only where LeaderWorkerSet is installed; kopf watches it once its CRD appears.
    @kopf.index(*LWS, labels=MANAGED_BY, id="leaderworkerset_index", registry=registry)
    async def leaderworkerset_index(namespace: str, body: kopf.Body, labels: kopf.Labels, **_):
        owner = labels.get(LABEL_DEPLOYMENT)
        return {(namespace, owner): Live.from_body("LeaderWorkerSet", body)} if owner else None


def _register_watches(registry: kopf.OperatorRegistry) -> None:
    """What wakes a pass. kopf updates the indexes before it calls these, so a pass they wake reads the new
    state."""

    @kopf.on.event("", "v1", "nodes", id="node_event", registry=registry)
    async def node_event(type: str, name: str, body: kopf.Body, memo: kopf.Memo, **_):
        _state(memo).node_seen(name, None if type == "DELETED" else node_from_manifest(dict(body)))

    @kopf.on.event("", "v1", "pods", id="pod_event", registry=registry)
    async def pod_event(type: str, namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, memo: kopf.Memo, **_):
        _state(memo).pod_seen((namespace, name), None if type == "DELETED" else pod_use(body, labels))

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

    @kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED_BY, id="networkpolicy_event",
                   registry=registry)
    async def networkpolicy_event(type: str, namespace: str, body: kopf.Body, labels: kopf.Labels,
                                  memo: kopf.Memo, **_):
        if labels.get(LABEL_DEPLOYMENT):
            _state(memo).owned_seen(namespace, labels[LABEL_DEPLOYMENT], Live.from_body("NetworkPolicy", body),
                                    deleted=type == "DELETED")

    @kopf.on.event(*LWS, labels=MANAGED_BY, id="leaderworkerset_event", registry=registry)
    async def leaderworkerset_event(type: str, namespace: str, body: kopf.Body, labels: kopf.Labels,
                                    memo: kopf.Memo, **_):
        if labels.get(LABEL_DEPLOYMENT):
            _state(memo).owned_seen(namespace, labels[LABEL_DEPLOYMENT], Live.from_body("LeaderWorkerSet", body),
                                    deleted=type == "DELETED")

    @kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions", id="leaderworkerset_crd_event",
                   when=lambda name, **_: name == LWS_CRD, registry=registry)
    async def leaderworkerset_crd_event(type: str, body: kopf.Body, memo: kopf.Memo, **_):
        _state(memo).leaderworkerset_seen(type != "DELETED" and _established(body))

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


def _needs_pass(before: dict | None, body: dict) -> bool:
    """Whether a LlamaDeployment's watch event can change what a pass does. The operator's own status write
    and others' annotations cannot; a new object, a spec change and a deletion can."""
    if before is None:
        return True
    old, new = before["metadata"], body["metadata"]
    return before.get("spec") != body.get("spec") or any(
        old.get(k) != new.get(k) for k in ("uid", "generation", "deletionTimestamp"))


def _established(crd: kopf.Body) -> bool:
    """Whether the API server serves a CustomResourceDefinition's kind (its Established condition); an
    emulator that reports no conditions is taken at its word."""
    conditions = (crd.get("status") or {}).get("conditions")
    if not conditions:
        return True
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _state(memo: kopf.Memo) -> OperatorState:
    return memo["state"]


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

