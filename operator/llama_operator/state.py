"""What the kopf handlers and the passes share: the cluster view, the plans in force, the work queue.

What wakes a pass is a change that can alter its outcome: a spec, generation or deletion change of its
LlamaDeployment (not the operator's own status write); an owned object that differs from what the
operator last wrote or saw; a Node or a Pod's use of a node that changed; capacity freed by another
deployment. A new plan only takes capacity that was free after every other plan in force, so it wakes
only the deployments waiting to upgrade.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from . import api, placement
from .inventory import Inventory, Node, PodUsage, pod_usage
from .kube import BLOCKED, REFUSED, Applied, Writer
from .live import Live
from .metrics import OperatorMetrics
from .ownership import HASH_ANNOTATION, LABEL_DEPLOYMENT, workload_names
from .peering import PeeringGate
from .observe import Observation
from .render import Images
from .slo import SloSettings
from .status import ChosenPlan
from .workqueue import WorkQueue, Workers

Key = tuple[str, str]  # (namespace, name)
#: What a Pod takes from its node, and the LlamaDeployment owning it (None: not one of the operator's).
PodUse = tuple[PodUsage, str | None]
#: The kinds of owned objects the operator watches (and so never reads before writing).
WATCHED_KINDS = ("Deployment", "Service", "LeaderWorkerSet", "NetworkPolicy")
#: The CustomResourceDefinition whose presence (Established) says LeaderWorkerSet is installed: replicas may
#: span nodes (docs/multinode.md).
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


@dataclass
class Settings:
    """What `llama-operator run` configures (cli.py maps its options here)."""

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
    #: The SLO loop's window, cooldown, calm window and correction TTL (docs/slo-loop.md), and how often it
    #: observes (`run --slo-*`).
    slo: SloSettings = field(default_factory=SloSettings)
    slo_interval_seconds: float = 30.0


@dataclass
class Promise:
    """The plan a LlamaDeployment holds, for the others' planning: its replicas take capacity even
    before their pods exist."""

    spec: api.LlamaDeploymentSpec
    plan: ChosenPlan

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Promise) and self.spec == other.spec and self.plan.same_choice(other.plan)


@dataclass(frozen=True)
class Indexes:
    """kopf's indexes, as a pass reads them.

    nodes: {name: store of Node}; pods: {(namespace, pod): store of (PodUsage, owning deployment)};
    deployments and services: {(namespace, owning deployment): store of Live}."""

    nodes: Any
    pods: Any
    deployments: Any
    services: Any
    #: The operator's model server pods ({(namespace, pod): store of observer.PodEndpoint}), for the SLO loop.
    model_pods: Any = None
    #: LeaderWorkerSets the operator owns, like deployments (empty while LeaderWorkerSet is not installed).
    leaderworkersets: Any = None
    #: NetworkPolicies the operator owns (spec.access.allowedClients), like services.
    networkpolicies: Any = None

    def owned(self, key: Key) -> dict[str, dict[str, Live]]:
        """The watched objects `key` owns, per kind and name, as `Writer.apply` takes them (`known`)."""
        indexes = (("Deployment", self.deployments), ("Service", self.services),
                   ("LeaderWorkerSet", self.leaderworkersets or {}), ("NetworkPolicy", self.networkpolicies or {}))
        return {kind: {live.name: live for live in index.get(key, ())} for kind, index in indexes}


class OperatorState:
    """Everything the handlers and the passes share: the cluster view, plans in force, the work queue."""

    def __init__(self, writer: Writer, settings: Settings, metrics: OperatorMetrics, *, client_config,
                 peering_priority: int):
        self.writer = writer
        self.settings = settings
        self.metrics = metrics
        self.client_config = client_config
        #: This replica's kopf peering priority (peering.own_priority, resolved once by the runner): the
        #: startup handler hands it to kopf, and the peering gate applies the same one.
        self.peering_priority = peering_priority
        self.bodies: dict[Key, dict] = {}
        #: The status this operator last wrote, per deployment. The operator is the only writer of
        #: status, and watch events may still carry an older one, so decisions start from this.
        self.written_status: dict[Key, dict] = {}
        self.promises: dict[Key, Promise] = {}
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
        self.seen_pods: dict[Key, PodUse] = {}
        self.seen_status: dict[tuple[str, str, str], dict] = {}
        #: The content fingerprint (live.content_fingerprint) the operator last rendered for each owned
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
        #: The SLO loop's source (observer.Observer; None: the loop is off) and its newest observation of
        #: each deployment, which the passes judge (slo.judge).
        self.observer: Any = None
        self.observations: dict[Key, Observation] = {}
        self.slo_task: Any = None
        #: Whether LeaderWorkerSet is installed (its CRD Established), as the CRD's watch last showed it.
        self.leaderworkerset = False

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
        if _replace_seen(self.seen_nodes, name, node):
            self.invalidate()

    def leaderworkerset_seen(self, installed: bool) -> None:
        """LeaderWorkerSet's CRD came, went or became Established: multi-node plans became possible or not."""
        if installed != self.leaderworkerset:
            self.leaderworkerset = installed
            self.invalidate()

    def pod_seen(self, key: Key, use: PodUse | None) -> None:
        """What a Pod takes from its node now and its owning deployment (None: nothing, or deleted)."""
        if _replace_seen(self.seen_pods, key, use):
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

    def set_promise(self, key: Key, promise: Promise) -> Promise | None:
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
            self._inventory = Inventory(nodes, [usage for _, usage, _ in pods], leaderworkerset=self.leaderworkerset)
            self._all_reserved = None
        own = [usage for (ns, _), usage, owner in pods if ns == key[0] and owner == key[1]]
        bound: dict[Key, int] = {}
        for (ns, _), _, owner in pods:
            if owner:
                bound[(ns, owner)] = bound.get((ns, owner), 0) + 1

        def reserve(inv: Inventory, other: Key, promise: Promise) -> Inventory:
            # replicas without bound pods yet (a replica spanning nodes has a pod on each)
            missing = promise.spec.replicas - bound.get(other, 0) // promise.plan.nodesPerReplica
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
        for ident in [i for i in self.rendered if i[1] == key[0] and i[2] in workload_names(key[1])]:
            self.rendered.pop(ident, None)
        for kept in (self.accepted, self.refused, self.unowned, self.observations):
            kept.pop(key, None)
        if self.drop_promise(key):
            self.wake_all()  # its capacity is free again
        self.metrics.forget_deployment(*key)


def _replace_seen(seen: dict, key: Any, value: Any) -> bool:
    """Record `value` as the last seen under `key` (None: gone); whether it differs from the one before."""
    before = seen.pop(key, None)
    if value is not None:
        seen[key] = value
    return before != value


def pod_use(body: Mapping[str, Any], labels: Mapping[str, str]) -> PodUse | None:
    """What a pod takes from its node, and the LlamaDeployment owning it; None when it takes nothing."""
    usage = pod_usage(dict(body))
    if usage is None or (usage.gpus == 0 and usage.cpu_millis == 0 and usage.memory_bytes == 0):
        return None
    return usage, labels.get(LABEL_DEPLOYMENT)
