"""Placement: the nodes a LlamaDeployment's model servers may run on, and the tolerations they carry there.

The spec's placement (nodeSelector, tolerations, gpuProducts) is matched against the inventory's shapes, not
node by node, and the matching nodes are pooled per GPU product or CPU shape with their free capacity
(build_pools): the planner sizes its candidates against those pools. A spec's tolerations never count for
the taint keys the operator forbids (effective_tolerations); the planner judges nodes and the renderer
writes pods with the same rule (pod_tolerations, model_server_tolerations). reserve_plan takes a plan's
replicas out of an inventory, on the nodes that plan can use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, Iterable

from .api import LlamaDeploymentSpec, Toleration
from .catalog import GPU, GPU_RESOURCES, load_catalog
from .inventory import PER_NODE_LABELS, Inventory, Node, Shape, ShapeGroup

#: CPU replicas leave this share of a node's free memory to the page cache and the kubelet.
CPU_MEMORY_HEADROOM = 0.9
#: Taint keys a LlamaDeployment's own tolerations never tolerate unless the operator is told otherwise
#: (`llama-operator run --forbid-toleration`, the chart's operator.forbiddenTolerations): model servers
#: stay off control-plane nodes even with `tolerations: [{operator: Exists}]`. See effective_tolerations.
DEFAULT_FORBIDDEN_TOLERATIONS: frozenset[str] = frozenset({"node-role.kubernetes.io/control-plane",
                                                         "node-role.kubernetes.io/master"})


@dataclass(frozen=True)
class Pool:
    """Where replicas of one candidate can go: all placement-compatible nodes of one GPU product, or the
    CPU nodes of one shape. `free` counts nodes by (free GPUs, free CPU millicores, free memory bytes)."""

    key: str
    gpu: GPU | None
    max_gpus_per_node: int
    free: tuple[tuple[tuple[int, int, int], int], ...] = ()
    cpu_cores: int = 0
    cpu_bandwidth_gbps: float = 0.0
    #: Set on the stand-in pools of variants no node can run (NO_GPU_NODE, NO_NODE): what the
    #: candidate's hardware column says instead of a GPU or CPU shape.
    label: str = ""
    #: Gbit/s between the pool's nodes, for a replica spanning nodes: the slowest node's (a replica may land
    #: on any of them; inventory.Shape.network_gbps).
    network_gbps: float = 0.0

    def __post_init__(self) -> None:
        # slots() is asked dozens of times per plan, each time a cache lookup that hashes the pool, whose
        # `free` grows with the cluster: hash it once.
        object.__setattr__(self, "_hash", hash((self.key, self.gpu, self.max_gpus_per_node, self.free,
                                                self.cpu_cores, self.cpu_bandwidth_gbps, self.label,
                                                self.network_gbps)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def slots(self, gpus: int, cpu_millis: int, memory_bytes: int) -> int:
        """Replicas that fit, one node each: a replica needs `gpus` GPUs (0 on CPU) and its host CPU and
        memory requests (CPU nodes keep a tenth of their memory for the page cache and the kubelet)."""
        return _slots(self, gpus, cpu_millis, memory_bytes)


#: Stand-ins for the hardware of a variant that no pool can run, so that it still appears among the
#: candidates with its reasons: a vLLM variant where no GPU node matches the placement, any variant
#: where no node matches at all.
NO_GPU_NODE = Pool(key="no-gpu-node", gpu=None, max_gpus_per_node=0, label="no GPU node")
NO_NODE = Pool(key="no-node", gpu=None, max_gpus_per_node=0, label="no matching node")


@lru_cache(maxsize=4096)
def _slots(pool: Pool, gpus: int, cpu_millis: int, memory_bytes: int) -> int:
    headroom = 1.0 if pool.gpu is not None else CPU_MEMORY_HEADROOM
    total = 0
    for (free_gpus, cpu, mem), count in pool.free:
        fits = [cpu // max(cpu_millis, 1), int(mem * headroom) // max(memory_bytes, 1)]
        if gpus:
            fits.append(free_gpus // gpus)
        total += count * min(fits)
    return total


# --- Tolerations and selectors ---------------------------------------------------------------------


def _tolerates(taints, tolerations: list[dict]) -> bool:
    """Whether a pod with `tolerations` may be scheduled on a node with `taints` (PreferNoSchedule ones only
    steer the scheduler)."""
    for taint in taints:
        if taint.effect not in ("NoSchedule", "NoExecute"):
            continue
        ok = False
        for t in tolerations:
            if t.get("effect") and t["effect"] != taint.effect:
                continue
            if t.get("operator") == "Exists":
                if not t.get("key") or t["key"] == taint.key:
                    ok = True
            elif t.get("key") == taint.key and (t.get("value") or None) == (taint.value or None):
                ok = True
            if ok:
                break
        if not ok:
            return False
    return True


def gpu_tolerations(resources: Iterable[str]) -> list[dict]:
    """Tolerations of the NoSchedule taint GPU nodes carry under their device plugin's resource name (GKE's
    `nvidia.com/gpu=present:NoSchedule`): a model server on GPUs tolerates its own resource's, whatever its
    spec says (model_server_tolerations)."""
    return [{"key": r, "operator": "Exists", "effect": "NoSchedule"} for r in resources]


#: What the planner adds to a spec's tolerations when it judges a GPU shape: the taints of every GPU
#: resource, as gpu_tolerations spells them.
GPU_TOLERATIONS = gpu_tolerations(GPU_RESOURCES)


def model_server_tolerations(spec: LlamaDeploymentSpec, gpu_resource: str | None) -> list[dict]:
    """The tolerations a model server pod of `spec` carries: on GPUs (`gpu_resource`) that resource's taint
    (gpu_tolerations), then the spec's own as they are. Hand it the spec with_pod_tolerations returns, so
    that the pods carry what the planner counted."""
    tolerations = spec_tolerations(spec)
    if gpu_resource is None:
        return tolerations
    return gpu_tolerations((gpu_resource,)) + tolerations


def effective_tolerations(tolerations: Iterable[dict], forbidden_keys: Collection[str],
                          taint_keys: Iterable[str] = ()) -> list[dict]:
    """A spec's tolerations (as pod spec dicts) less what they may not tolerate: none of them counts for a
    taint whose key is in `forbidden_keys`. Pure; the planner judges nodes with the result and the pods
    carry the result, so both agree.

    A toleration naming a forbidden key is dropped. A toleration without a key (`operator: Exists`)
    tolerates every taint, and Kubernetes has no "every taint but these": it is spelt out as one
    `Exists` toleration per key of `taint_keys` (the taints of the nodes in question) that is not
    forbidden, keeping its effect and tolerationSeconds. Without forbidden keys nothing changes."""
    tolerations = list(tolerations)
    if not forbidden_keys or not tolerations:
        return tolerations
    out: list[dict] = []
    for t in tolerations:
        key = t.get("key")
        if key:
            if key not in forbidden_keys:
                out.append(t)
        elif t.get("operator") == "Exists":
            rest = {k: v for k, v in t.items() if k not in ("key", "operator", "value")}
            for k in sorted(set(taint_keys) - set(forbidden_keys)):
                out.append({"key": k, "operator": "Exists", **rest})
        else:
            out.append(t)  # no key and not Exists: matches only taints without a key (none is forbidden)
    unique: list[dict] = []
    for t in out:
        if t not in unique:
            unique.append(t)
    return unique


def _reaches_forbidden(tolerations: Iterable[dict], forbidden_keys: Collection[str]) -> list[str]:
    """The forbidden taint keys the spec's tolerations would reach (sorted): the ones they name, all of
    them for a toleration without a key."""
    reached: set[str] = set()
    for t in tolerations:
        if t.get("key") in forbidden_keys:
            reached.add(t["key"])
        elif _tolerates_every_taint(t):
            reached.update(forbidden_keys)
    return sorted(reached)


def _tolerates_every_taint(toleration: dict) -> bool:
    """A toleration without a key, `operator: Exists` (of its effect, if it names one)."""
    return not toleration.get("key") and toleration.get("operator") == "Exists"


def spec_tolerations(spec: LlamaDeploymentSpec) -> list[dict]:
    """placement.tolerations as a pod spec writes them."""
    return [t.model_dump(exclude_none=True) for t in spec.placement.tolerations]


class _Tolerations:
    """A spec's tolerations under the forbidden keys, per shape (effective_tolerations): worked out once per
    plan, unless a toleration without a key must be spelt out over each shape's taint keys."""

    __slots__ = ("spec", "forbidden", "fixed")

    def __init__(self, spec: LlamaDeploymentSpec, forbidden: Collection[str]):
        self.spec = spec_tolerations(spec)
        self.forbidden = forbidden
        keyless = bool(forbidden) and any(_tolerates_every_taint(t) for t in self.spec)
        self.fixed = None if keyless else effective_tolerations(self.spec, forbidden)

    def for_shape(self, shape: Shape) -> list[dict]:
        if self.fixed is not None:
            return self.fixed
        return effective_tolerations(self.spec, self.forbidden, (t.key for t in shape.taints))


def _allowed_products(spec: LlamaDeploymentSpec) -> set[str] | None:
    if not spec.placement.gpuProducts:
        return None
    catalog = load_catalog()
    out = set()
    for name in spec.placement.gpuProducts:
        gpu = catalog.find_gpu(name)
        out.add(gpu.product if gpu else name)
    return out


def _shape_matches(shape: Shape, spec: LlamaDeploymentSpec, allowed_products: set[str] | None,
                   tolerations_of: _Tolerations) -> bool:
    selector = spec.placement.nodeSelector
    if selector:  # (the label dict only when there is something to look up in it)
        labels = shape.label_dict()
        if any(labels.get(k) != v for k, v in selector.items() if k not in PER_NODE_LABELS):
            return False
    tolerations = tolerations_of.for_shape(shape)
    if shape.gpu is not None:
        tolerations = tolerations + GPU_TOLERATIONS
        if allowed_products is not None and shape.gpu.product not in allowed_products:
            return False
    return _tolerates(shape.taints, tolerations)


def _per_node_selector(spec: LlamaDeploymentSpec) -> dict[str, str]:
    return {k: v for k, v in spec.placement.nodeSelector.items() if k in PER_NODE_LABELS}


def _narrowed(group: ShapeGroup, inventory: Inventory, hostname: str) -> ShapeGroup | None:
    """The part of a group on the named host (a nodeSelector on kubernetes.io/hostname)."""
    names = [n for n in group.nodes if inventory.nodes[n].hostname == hostname]
    if not names:
        return None
    out = ShapeGroup(group.shape, names)
    for n in names:
        out.free[inventory.free[n]] += 1
    return out


def _merged(groups: list[ShapeGroup]) -> tuple[tuple[tuple[int, int, int], int], ...]:
    total: dict[tuple[int, int, int], int] = {}
    for g in groups:
        for k, count in g.free.items():
            total[k] = total.get(k, 0) + count
    return tuple(sorted(total.items()))


def build_pools(spec: LlamaDeploymentSpec, inventory: Inventory,
                forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> tuple[list[Pool], list[str]]:
    """Placement-compatible pools, and notes on what placement excluded. `forbidden_tolerations`: taint keys
    the spec's tolerations do not count for (effective_tolerations)."""
    allowed = _allowed_products(spec)
    by_product: dict[str, list[ShapeGroup]] = {}
    cpu_groups: list[ShapeGroup] = []
    excluded = 0
    hostname = _per_node_selector(spec).get("kubernetes.io/hostname")
    tolerations_of = _Tolerations(spec, forbidden_tolerations)
    reached = _reaches_forbidden(tolerations_of.spec, forbidden_tolerations) if tolerations_of.spec else []
    withheld: dict[str, int] = {}  # forbidden taint key the tolerations reach -> nodes carrying it
    for group in inventory.groups():
        if reached:
            for key in {t.key for t in group.shape.taints if t.key in reached}:
                withheld[key] = withheld.get(key, 0) + len(group.nodes)
        if not _shape_matches(group.shape, spec, allowed, tolerations_of):
            excluded += len(group.nodes)
            continue
        if hostname is not None:
            narrowed = _narrowed(group, inventory, hostname)
            excluded += len(group.nodes) - (len(narrowed.nodes) if narrowed else 0)
            if narrowed is None:
                continue
            group = narrowed
        if group.shape.gpu is None:
            cpu_groups.append(group)
        else:
            by_product.setdefault(group.shape.gpu.product, []).append(group)
    pools = []
    for product, gs in sorted(by_product.items()):
        pools.append(Pool(
            key=product,
            # Nodes of one product may report less memory than the catalog (MIG, ECC): a replica may land
            # on any of them, so the pool is sized by the smallest.
            gpu=min((g.shape.gpu for g in gs), key=lambda gpu: gpu.memory_gib),
            max_gpus_per_node=max(g.shape.gpus_per_node for g in gs),
            free=_merged(gs),
            network_gbps=min(g.shape.network_gbps for g in gs),
        ))
    if spec.fallback.allowCPU:
        by_cpu_shape: dict[tuple[int, float], list[ShapeGroup]] = {}
        for g in cpu_groups:
            by_cpu_shape.setdefault((g.shape.cpu_millis // 1000, g.shape.cpu_bandwidth_gbps), []).append(g)
        for (cores, bandwidth), gs in sorted(by_cpu_shape.items()):
            pools.append(Pool(
                key=f"cpu-{cores}c-{bandwidth:g}gbps",
                gpu=None,
                max_gpus_per_node=0,
                cpu_cores=cores,
                cpu_bandwidth_gbps=bandwidth,
                free=_merged(gs),
            ))
    notes = []
    if withheld:
        taints = ", ".join(f"{key} ({count} node(s))" for key, count in sorted(withheld.items()))
        notes.append(f"placement.tolerations do not count for the taint(s) {taints}: the operator does not let "
                     "LlamaDeployments tolerate them (llama-operator run --forbid-toleration)")
    if excluded:
        notes.append(f"placement excluded {excluded} node(s)")
    unknown = sorted({p.gpu.product for p in pools if p.gpu is not None and not p.gpu.known})
    for product in unknown:
        notes.append(f"GPU product {product} is not in the catalog: planned from its GFD memory and compute "
                     "capability labels with the slowest catalog GPU's bandwidth and throughput")
    return pools, notes


# --- The nodes of a plan -------------------------------------------------------------------------------


def _plan_shape_fits(spec: LlamaDeploymentSpec, chosen, forbidden_tolerations: Collection[str]):
    """Whether a shape is one the plan `chosen` (status.ChosenPlan) can use: its GPU product or CPU shape,
    within the spec's placement (the hostname aside: that is per node)."""
    allowed = _allowed_products(spec)
    tolerations_of = _Tolerations(spec, forbidden_tolerations)

    def shape_fits(shape: Shape) -> bool:
        if chosen.gpuProduct is not None:
            if shape.gpu is None or shape.gpu.product != chosen.gpuProduct:
                return False
        elif shape.gpu is not None or shape.cpu_bandwidth_gbps != chosen.cpuMemoryBandwidthGbps:
            return False
        return _shape_matches(shape, spec, allowed, tolerations_of)

    return shape_fits


def pod_tolerations(spec: LlamaDeploymentSpec, inventory: Inventory, chosen,
                    forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> list[dict]:
    """The spec's tolerations as the model server pods of the plan `chosen` (status.ChosenPlan) must carry
    them: effective_tolerations, a toleration without a key spelt out over the taint keys of the nodes
    the plan can use (what the planner counted). Per shape, not per node; the inventory is read only when
    such a toleration meets forbidden keys."""
    given = spec_tolerations(spec)
    if not forbidden_tolerations or not any(_tolerates_every_taint(t) for t in given):
        return effective_tolerations(given, forbidden_tolerations)
    shape_fits = _plan_shape_fits(spec, chosen, forbidden_tolerations)
    keys = {t.key for g in inventory.groups() if shape_fits(g.shape) for t in g.shape.taints}
    return effective_tolerations(given, forbidden_tolerations, keys)


def with_pod_tolerations(spec: LlamaDeploymentSpec, inventory: Inventory, chosen,
                         forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> LlamaDeploymentSpec:
    """`spec` with its placement.tolerations replaced by pod_tolerations: what to hand the renderer, which
    passes a spec's tolerations through. The same object when nothing changes."""
    tolerations = pod_tolerations(spec, inventory, chosen, forbidden_tolerations)
    if tolerations == spec_tolerations(spec):
        return spec
    placement = spec.placement.model_copy(update={"tolerations": [Toleration(**t) for t in tolerations]})
    return spec.model_copy(update={"placement": placement})


def reserve_plan(inventory: Inventory, spec: LlamaDeploymentSpec, chosen, replicas: int, *,
                 forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> Inventory:
    """`inventory` with `replicas` replicas of the plan `chosen` (status.ChosenPlan) taken, on the nodes that
    plan can use: its GPU product or CPU shape, within the spec's placement (a replica spanning nodes takes
    nodesPerReplica pods' GPUs)."""
    hostname = _per_node_selector(spec).get("kubernetes.io/hostname")
    shape_fits = _plan_shape_fits(spec, chosen, forbidden_tolerations)

    def fits(node: Node) -> bool:  # what shape_fits cannot say: the node itself
        return hostname is None or node.hostname == hostname

    # The inventory asks shape_fits once per shape, and fits only of nodes of fitting shapes; what
    # shape_fits answers depends on the placement (less the hostname) and the plan's pool alone.
    placement = spec.placement
    key = ("reserve_plan", tuple(sorted(placement.nodeSelector.items())),
           tuple((t.key, t.operator, t.value, t.effect) for t in placement.tolerations),
           tuple(placement.gpuProducts), chosen.gpuProduct,
           None if chosen.gpuProduct is not None else chosen.cpuMemoryBandwidthGbps,
           tuple(sorted(forbidden_tolerations)) if placement.tolerations else ())
    if chosen.gpuProduct is not None:  # a replica spanning nodes is one pod of gpusPerReplica GPUs on each
        return inventory.reserve(fits, replicas * chosen.nodesPerReplica, chosen.gpusPerReplica,
                                 shape_fits=shape_fits, shape_key=key)
    return inventory.reserve(fits, replicas, 0, (chosen.cpuThreads or 1) * 1000, chosen.predicted.memoryBytes,
                             shape_fits=shape_fits, shape_key=key)
