"""The kopf shell: watches feed an in-memory view of the cluster; one daemon per LlamaDeployment
reconciles it whenever something it depends on changes, and on a slow resync.

Thin by design: reading, calling the pure core (planner, reconcile.decide, render), writing.

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

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf

from . import api, planner
from .api import GROUP, PLURAL, VERSION, LlamaDeploymentStatus, SpecError
from .inventory import Inventory, PodUsage, node_from_manifest, pod_usage
from .kube import Writer, canonical, connection_info, event_body
from .metrics import OperatorMetrics
from .reconcile import Decision, Observed, decide, decide_invalid
from .render import LABEL_DEPLOYMENT, MANAGED_BY, Images, Owner, render

log = logging.getLogger("llama_operator")

LD = (GROUP, VERSION, PLURAL)
#: kopf's finalizer on LlamaDeployments (set in `configure`).
FINALIZER = "llama-operator.dev/finalizer"
Key = tuple[str, str]  # (namespace, name)


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
    #: How long a new LlamaDeployment waits for kopf's finalizer before it is served without one.
    finalizer_grace_seconds: float = 10.0


@dataclass
class _Promise:
    """The plan a LlamaDeployment holds, for the others' planning: its replicas take capacity even
    before their pods exist."""

    spec: api.LlamaDeploymentSpec
    plan: api.ChosenPlan

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Promise) and self.spec == other.spec and self.plan.same_choice(other.plan)


class OperatorState:
    """Everything the handlers share: the cluster view, plans in force, wake-up signals."""

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
        self.signals: dict[Key, asyncio.Event] = {}
        self.locks: dict[Key, asyncio.Lock] = {}
        self._inventory: Inventory | None = None

    # --- cluster view ---

    def invalidate(self) -> None:
        self._inventory = None
        for event in self.signals.values():
            event.set()

    def inventory_for(self, key: Key, node_index, pod_index) -> Inventory:
        """The cluster minus what others hold or are promised; this deployment's own pods count as free.

        `node_index` and `pod_index` are kopf's indexes ({name: store of Node} and
        {(namespace, pod): store of (PodUsage, owning deployment)}).
        """
        pods: list[tuple[Key, PodUsage, str | None]] = [
            (pod_key, usage, owner) for pod_key, store in pod_index.items() for usage, owner in store
        ]
        if self._inventory is None:
            nodes = [node for store in node_index.values() for node in store]
            self._inventory = Inventory(nodes, [usage for _, usage, _ in pods])
        inv = self._inventory
        own = [usage for (ns, _), usage, owner in pods if ns == key[0] and owner == key[1]]
        if own:
            inv = inv.release(own)
        bound: dict[Key, int] = {}
        for (ns, _), _, owner in pods:
            if owner:
                bound[(ns, owner)] = bound.get((ns, owner), 0) + 1
        for other, promise in sorted(self.promises.items()):
            missing = promise.spec.replicas - bound.get(other, 0)
            if other != key and missing > 0:
                inv = planner.reserve_plan(inv, promise.spec, promise.plan, missing)
        return inv

    def signal(self, key: Key) -> asyncio.Event:
        if key not in self.signals:
            self.signals[key] = asyncio.Event()
        return self.signals[key]


def _state(memo: kopf.Memo) -> OperatorState:
    return memo["state"]


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the operator's handlers to `registry`."""

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_):
        prefix = "llama-operator.dev"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
        settings.persistence.finalizer = FINALIZER
        # Replicas of one Deployment start with the same arguments; kopf freezes peers of equal priority,
        # so each takes its priority from its own pod identity.
        # Settings.peering_priority overrides that (several operators in one process, as in tests).
        pod_id = os.environ.get("POD_ID") or os.environ.get("HOSTNAME", "")
        priority = _state(memo).settings.peering_priority if "state" in memo else None
        settings.peering.priority = priority if priority is not None else \
            int(hashlib.sha256(pod_id.encode()).hexdigest()[:6], 16)
        settings.watching.server_timeout = memo.get("watch_timeout", 300)
        # A stopped daemon (its object deleted) finishes the pass it is in; wait for that in the same
        # handling cycle instead of re-checking after the whole cancellation backoff.
        settings.background.instant_exit_timeout = 5.0
        settings.posting.level = logging.WARNING

    @kopf.on.login(id="login", registry=registry)
    def login(memo: kopf.Memo, **_):
        return connection_info(_state(memo).client_config)

    # Indexes: kopf starts no other handler until these are filled from the initial listing, so the
    # first plan of every deployment sees the whole cluster.
    @kopf.index("", "v1", "nodes", id="node_index", registry=registry)
    def node_index(name: str, body: kopf.Body, **_):
        return {name: node_from_manifest(dict(body))}

    @kopf.index("", "v1", "pods", id="pod_index", registry=registry)
    def pod_index(namespace: str, name: str, body: kopf.Body, labels: kopf.Labels, **_):
        usage = pod_usage(dict(body))
        if usage is None or (usage.gpus == 0 and usage.cpu_millis == 0 and usage.memory_bytes == 0):
            return None
        return {(namespace, name): (usage, labels.get(LABEL_DEPLOYMENT))}

    @kopf.on.event("", "v1", "nodes", id="node_event", registry=registry)
    def node_event(memo: kopf.Memo, **_):
        _state(memo).invalidate()

    @kopf.on.event("", "v1", "pods", id="pod_event", registry=registry)
    def pod_event(body: kopf.Body, type: str, memo: kopf.Memo, **_):
        usage = pod_usage(dict(body))
        holds = usage is not None and (usage.gpus or usage.cpu_millis or usage.memory_bytes)
        if holds or type == "DELETED" or (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            _state(memo).invalidate()

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY, id="deployment_event", registry=registry)
    def deployment_event(body: kopf.Body, memo: kopf.Memo, **_):
        owner = (body["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT)
        if owner:
            _state(memo).signal((body["metadata"]["namespace"], owner)).set()

    @kopf.on.event(*LD, id="llamadeployment_event", registry=registry)
    def llamadeployment_event(type: str, body: kopf.Body, memo: kopf.Memo, **_):
        state = _state(memo)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if type == "DELETED":
            state.bodies.pop(key, None)
            state.written_status.pop(key, None)
            if state.promises.pop(key, None) is not None:
                state.invalidate()
            state.metrics.forget_deployment(*key)
            return
        state.bodies[key] = dict(body)
        state.signal(key).set()

    # On deletion (and at shutdown) kopf sets `stopped` and gives the daemon cancellation_backoff seconds to
    # finish its pass before cancelling it: a cancelled pass would leave its write running in a worker
    # thread, and kopf would drop the finalizer before that write lands (an object owned by a deleted
    # owner, left for the garbage collector).
    @kopf.daemon(*LD, id="keep_converged", registry=registry, cancellation_backoff=15.0, cancellation_timeout=5.0)
    async def keep_converged(stopped: kopf.DaemonStopped, namespace: str, name: str, memo: kopf.Memo,
                             node_index: kopf.Index, pod_index: kopf.Index, **_):
        state = _state(memo)
        key = (namespace, name)
        event = state.signal(key)
        event.set()  # first pass at once
        timeout = state.settings.resync_seconds
        backoff = state.settings.error_backoff_seconds
        grace_until = time.monotonic() + state.settings.finalizer_grace_seconds
        while not stopped:
            woken = asyncio.ensure_future(event.wait())
            stopping = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({woken, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            stopping.cancel()
            if stopped:
                break
            event.clear()
            timeout = state.settings.resync_seconds
            try:
                waiting = time.monotonic() < grace_until
                decision = await reconcile(state, key, node_index, pod_index, wait_for_finalizer=waiting)
                if decision is None and waiting and not _has_finalizer(state.bodies.get(key)):
                    timeout = max(0.1, grace_until - time.monotonic())  # then serve it without the finalizer
                pending = decision.status.pendingChange if decision is not None else None
                if pending is not None:  # wake when the better plan has waited long enough
                    due = datetime.strptime(pending.since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) \
                        + state.settings.upgrade_delay
                    timeout = min(timeout, max(0.5, (due - datetime.now(timezone.utc)).total_seconds() + 0.5))
                backoff = state.settings.error_backoff_seconds
            except Exception:  # noqa: BLE001 - one bad pass must not stop the loop
                log.exception("reconcile of %s/%s failed; retrying in %gs", namespace, name, backoff)
                await stopped.wait(backoff)
                backoff = min(backoff * 2, max(state.settings.max_error_backoff_seconds,
                                               state.settings.error_backoff_seconds))
                event.set()
        state.signals.pop(key, None)


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


def _has_finalizer(body: dict | None) -> bool:
    return body is not None and FINALIZER in (body["metadata"].get("finalizers") or [])


async def reconcile(state: OperatorState, key: Key, node_index, pod_index, *,
                    wait_for_finalizer: bool = False) -> Decision | None:
    """One pass for one LlamaDeployment: plan, decide, render and apply, write status and events.

    `wait_for_finalizer`: do nothing while kopf's finalizer is not on the object yet. kopf starts the daemon
    even when adding its finalizer failed, and without it a delete is immediate: a pass racing it would
    create a Deployment for an owner that is gone (left to the garbage collector). The finalizer's
    arrival is a watch event, which wakes the daemon; the daemon stops waiting after a grace period, so
    an object kopf cannot put a finalizer on is still served."""
    lock = state.locks.setdefault(key, asyncio.Lock())
    async with lock:
        body = state.bodies.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        if wait_for_finalizer and not _has_finalizer(body):
            log.debug("%s/%s has no finalizer yet; waiting for it", *key)
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
        try:
            try:
                spec = _parse_spec(body.get("spec"))
            except SpecError as e:
                decision = decide_invalid(obs, e.problems)
                spec = None
            else:
                deployment = await state.writer.get("apps/v1", "Deployment", namespace, name)
                if deployment is not None:
                    obs = Observed(**{**obs.__dict__, "deployment_status": deployment.get("status") or {}})
                # From reading the inventory to recording the promise, nothing awaits: no other deployment's
                # pass can plan in between, so two never take the same free GPUs (nor flip between them).
                inventory = state.inventory_for(key, node_index, pod_index)
                plan = planner.plan(spec, inventory)
                current = status.plan
                problems = planner.check_choice(spec, inventory, current) if current is not None else None
                decision = decide(obs, spec, plan, problems)
                if decision.apply is not None:
                    _promise(state, key, spec, decision)
                    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
                    await state.writer.apply(render(owner, spec, decision.apply, state.settings.images))
            if decision.events:
                involved = {"apiVersion": body.get("apiVersion") or api.API_VERSION, "kind": body.get("kind") or api.KIND,
                            "name": name, "namespace": namespace, "uid": meta.get("uid")}
                instance = os.environ.get("POD_ID") or os.environ.get("HOSTNAME", "")
                seed = canonical([meta.get("uid"), status.model_dump(mode="json", exclude_none=True)])
                for etype, reason, message in decision.events:
                    await state.writer.post_event(event_body(involved, etype, reason, message, instance, seed=seed))
            new_status = decision.status.model_dump(mode="json")
            if canonical(_without_nulls(new_status)) != canonical(_without_nulls(raw_status)):
                await state.writer.patch_status(namespace, name, new_status)
                state.written_status[key] = new_status
            _publish(state, key, spec, decision)
            return decision
        except Exception:
            error = True
            raise
        finally:
            state.metrics.observe_reconcile(time.monotonic() - started, error=error, namespace=namespace, name=name)


def _promise(state: OperatorState, key: Key, spec: api.LlamaDeploymentSpec, decision: Decision) -> None:
    if decision.apply is None:
        return
    promise = _Promise(spec=spec, plan=decision.apply)
    if state.promises.get(key) != promise:
        state.promises[key] = promise
        state.invalidate()


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
