"""The cluster as the planner sees it: nodes grouped into shapes, with free capacity.

Built from Node and Pod manifests (what `kubectl get nodes -o yaml` prints, or what the operator's
watches deliver). Nodes that look alike (same GPU product and count, same labels apart from the
hostname, same taints, same allocatable CPU and memory) form one shape, so planning costs the same
on 10 nodes as on 10,000. Pure: no API calls.
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Iterable, Mapping

from .catalog import GPU, GPU_PRODUCT_LABELS, GPU_RESOURCES, load_catalog
from .units import quantity_bytes, quantity_millis

#: Labels that differ node by node and say nothing about what a node can run.
PER_NODE_LABELS = ("kubernetes.io/hostname",)


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass(frozen=True)
class Shape:
    """What a group of alike nodes offers one pod."""

    gpu: GPU | None
    gpus_per_node: int
    cpu_millis: int
    memory_bytes: int
    cpu_bandwidth_gbps: float
    labels: tuple[tuple[str, str], ...]
    taints: tuple[Taint, ...]
    #: Gbit/s to other nodes (catalog `network`; the node label overrides it): a replica spanning nodes
    #: sends its pipeline stages' activations over it.
    network_gbps: float = 0.0

    @property
    def key(self) -> str:
        return self.gpu.product if self.gpu else "cpu"

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass
class ShapeGroup:
    shape: Shape
    nodes: list[str] = field(default_factory=list)
    #: (free GPUs, free CPU millicores, free memory bytes) -> how many nodes have exactly that
    free: Counter = field(default_factory=Counter)

    @property
    def free_gpus(self) -> Counter:
        """Free GPUs per node -> how many nodes have exactly that many."""
        out: Counter = Counter()
        for (gpus, _, _), count in self.free.items():
            out[gpus] += count
        return out


#: GFD's label for the device memory of a node's GPUs: the NVML total in MiB, as an integer string.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_COMPUTE_LABELS = ("nvidia.com/gpu.compute.major", "nvidia.com/gpu.compute.minor")
#: The catalog keeps memoryGiB to two decimals: a label within this of it says the same thing.
_MEMORY_TOLERANCE_GIB = 0.01
#: Sanity bound on a memory label, not a hardware figure: no GPU has 1 TiB (2**20 MiB) of its own.
_MAX_LABEL_MIB = 2**20


def _label_memory_gib(labels: Mapping[str, str]) -> float | None:
    """GFD's nvidia.com/gpu.memory (MiB) in GiB; None when absent or not a positive whole number of MiB.

    GFD writes a plain integer. Anything else ("abc", "-5", "1e400", "12.5", "nan", "0", a number of
    MiB no GPU has) is a hand-made or broken label and is ignored rather than trusted.
    """
    raw = labels.get(GPU_MEMORY_LABEL)
    if raw is None:
        return None
    text = str(raw).strip()
    if not text.isascii() or not text.isdigit() or len(text) > 7:  # 7 digits: anything <= _MAX_LABEL_MIB
        return None
    mib = int(text)
    return mib / 1024 if 0 < mib <= _MAX_LABEL_MIB else None


def _label_compute_capability(labels: Mapping[str, str]) -> str | None:
    """'major.minor' from GFD's gpu.compute.major/minor; None when the major is absent or malformed
    (a minor that is absent or malformed counts as 0)."""
    major, minor = (str(labels.get(k, "")).strip() for k in GPU_COMPUTE_LABELS)
    if not (major.isascii() and major.isdigit()):
        return None
    if not (minor.isascii() and minor.isdigit()):
        minor = "0"
    return f"{int(major)}.{int(minor)}"


def _unknown_gpu(product: str, labels: Mapping[str, str]) -> GPU:
    """A GPU missing from the catalog: its memory from GFD's label, the slowest catalog speeds.

    Memory is 0 when the label is absent or malformed: nothing can be sized for it (see _node_gpu).
    Compute capability comes from GFD's gpu.compute.major/minor labels (None without them). The planner
    can still place on it, conservatively, and says the product was unknown.
    """
    catalog = load_catalog()
    gpus = list(catalog.gpus.values())
    return GPU(
        product=product,
        aliases=(),
        name=product,
        vendor="amd" if product.lower().startswith("amd") else "nvidia",
        memory_gib=_label_memory_gib(labels) or 0.0,
        memory_bandwidth_gbps=min(g.memory_bandwidth_gbps for g in gpus),
        bf16_tflops=None,
        fp16_tflops=min(g.tensor_tflops_16bit for g in gpus if g.tensor_tflops_16bit),
        fp8_tflops=None,
        int8_tops=None,
        compute_capability=_label_compute_capability(labels),
        interconnect="pcie",
        known=False,
    )


def _with_label_memory(gpu: GPU, labels: Mapping[str, str]) -> GPU:
    """The catalog GPU, with the memory GFD reports for this node when that is less than the catalog's
    (a MIG slice, ECC, a smaller variant sold under the same name).

    A larger label is not trusted: drivers from R530 on count memory they reserve for themselves into the
    total (a 16 GB V100 reports 16384 MiB where older drivers said 16160), which no model can use.
    Only GFD's label is read, so only NVIDIA GPUs: the AMD labeller's amd.com/gpu.vram is rounded to
    whole GiB ("192G" for an MI300X's 191.69 GiB) and would overstate the catalog's figure.
    """
    if gpu.vendor != "nvidia":
        return gpu
    memory_gib = _label_memory_gib(labels)
    if memory_gib is None or memory_gib > gpu.memory_gib - _MEMORY_TOLERANCE_GIB:
        return gpu  # the catalog's own value: nodes that agree with it share one GPU value
    return replace(gpu, memory_gib=memory_gib)  # frozen: compares and hashes by value, as a dict key must


def _node_gpu(labels: Mapping[str, str]) -> GPU | None:
    """The GPU a node's labels describe, or None.

    A product missing from the catalog whose memory is unknown (no usable GFD memory label) gives None:
    with nothing to size a replica against, the node offers no GPUs to the planner, as a node whose
    device plugin is not running (a zero-memory GPU would divide by zero in the estimator).
    """
    catalog = load_catalog()
    for key in GPU_PRODUCT_LABELS:
        product = labels.get(key)
        if product:
            gpu = catalog.find_gpu(product)
            if gpu is not None:
                return _with_label_memory(gpu, labels)
            unknown = _unknown_gpu(product, labels)
            return unknown if unknown.memory_bytes > 0 else None
    return None


def _is_ready(node: dict) -> bool:
    """Schedulable and reporting Ready. A node whose kubelet has not posted a Ready condition yet is not:
    the scheduler keeps pods off it (the node controller taints it not-ready)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = [c for c in conditions if c.get("type") == "Ready"]
    return bool(ready) and ready[0].get("status") == "True"


@dataclass(frozen=True)
class Node:
    name: str
    shape: Shape
    ready: bool
    hostname: str = ""  # kubernetes.io/hostname: per node, so not part of the shape


def node_from_manifest(node: dict) -> Node:
    meta = node.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    gpu = _node_gpu(labels)
    gpus = sum(quantity_bytes(allocatable.get(r, 0)) for r in GPU_RESOURCES)
    if gpu is None or gpus == 0:
        gpu, gpus = None, 0
    cpu_defaults = load_catalog().cpu
    try:
        bandwidth = float(labels.get(cpu_defaults.bandwidth_label, cpu_defaults.memory_bandwidth_gbps))
    except ValueError:
        bandwidth = cpu_defaults.memory_bandwidth_gbps
    network = load_catalog().network
    try:
        network_gbps = float(labels.get(network.bandwidth_label, network.bandwidth_gbps))
    except ValueError:
        network_gbps = network.bandwidth_gbps
    if not 0 < network_gbps < float("inf"):  # "0", "-5", "nan", "inf": a broken label, not a network
        network_gbps = network.bandwidth_gbps
    taints = tuple(
        Taint(t.get("key", ""), t.get("value"), t.get("effect", ""))
        for t in (node.get("spec") or {}).get("taints") or []
    )
    shape = Shape(
        gpu=gpu,
        gpus_per_node=gpus,
        cpu_millis=quantity_millis(allocatable.get("cpu", 0)),
        memory_bytes=quantity_bytes(allocatable.get("memory", 0)),
        cpu_bandwidth_gbps=bandwidth,
        labels=tuple(sorted((k, v) for k, v in labels.items() if k not in PER_NODE_LABELS)),
        taints=taints,
        network_gbps=network_gbps,
    )
    return Node(name=meta.get("name", ""), shape=shape, ready=_is_ready(node),
                hostname=labels.get("kubernetes.io/hostname", meta.get("name", "")))


@dataclass(frozen=True)
class PodUsage:
    node: str
    gpus: int
    cpu_millis: int
    memory_bytes: int


def pod_usage(pod: dict) -> PodUsage | None:
    """What a bound, unfinished pod takes from its node (requests; limits where requests are absent)."""
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    if not node or phase in ("Succeeded", "Failed"):
        return None
    gpus = cpu = mem = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        requests = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        gpus += sum(quantity_bytes(requests.get(r, 0)) for r in GPU_RESOURCES)
        if "cpu" in requests:
            cpu += quantity_millis(requests["cpu"])
        if "memory" in requests:
            mem += quantity_bytes(requests["memory"])
    return PodUsage(node=node, gpus=gpus, cpu_millis=cpu, memory_bytes=mem)


#: The CustomResourceDefinition LeaderWorkerSet installs (https://lws.sigs.k8s.io): a replica spanning nodes
#: is one LeaderWorkerSet group, so multi-node plans need it.
LEADERWORKERSET_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


def has_leaderworkerset_crd(manifests: Iterable[object]) -> bool:
    """Whether the manifests hold LeaderWorkerSet's CustomResourceDefinition (by its name)."""
    for m in manifests:
        if isinstance(m, dict) and m.get("kind") == "CustomResourceDefinition":
            meta = m.get("metadata")
            if isinstance(meta, dict) and meta.get("name") == LEADERWORKERSET_CRD:
                return True
    return False


class Inventory:
    """Nodes with what is free on them, grouped by shape; `leaderworkerset`: whether the cluster has
    LeaderWorkerSet (LEADERWORKERSET_CRD), which a replica spanning nodes needs."""

    def __init__(self, nodes: Iterable[Node], usage: Iterable[PodUsage] = (), *, leaderworkerset: bool = False):
        self.leaderworkerset = leaderworkerset
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        used_gpus: Counter = Counter()
        used_cpu: Counter = Counter()
        used_mem: Counter = Counter()
        for u in usage:
            used_gpus[u.node] += u.gpus
            used_cpu[u.node] += u.cpu_millis
            used_mem[u.node] += u.memory_bytes
        self.free: dict[str, tuple[int, int, int]] = {}
        for node in self.nodes.values():
            s = node.shape
            self.free[node.name] = (
                max(0, s.gpus_per_node - used_gpus[node.name]),
                max(0, s.cpu_millis - used_cpu[node.name]),
                max(0, s.memory_bytes - used_mem[node.name]),
            )
        self._groups: list[ShapeGroup] | None = None
        # Copies (release, reserve) share `nodes` with the inventory they came from, and derive their
        # groups from their origin's instead of regrouping every node: `_origin` is that inventory (one
        # built from nodes, whose groups are computed once) and `_changed` the names whose free capacity
        # may differ from it. So the operator, which plans on a copy each pass, pays per shape, not per
        # node. `_index` (node name -> group position; each group's names sorted) belongs to the origin.
        self._origin: Inventory | None = None
        self._changed: set[str] = set()
        self._index: dict[str, int] | None = None
        self._sorted_group_names: dict[int, list[str]] = {}
        self._sorted_names: list[str] | None = None
        self._fit_orders: dict[Hashable, list[str]] = {}

    @classmethod
    def from_manifests(cls, nodes: Iterable[dict], pods: Iterable[dict] = (), *,
                       leaderworkerset: bool = False) -> "Inventory":
        usage = [u for u in (pod_usage(p) for p in pods) if u is not None]
        return cls([node_from_manifest(n) for n in nodes], usage, leaderworkerset=leaderworkerset)

    def groups(self) -> list[ShapeGroup]:
        """Ready nodes grouped by shape (computed once per inventory)."""
        if self._groups is None:
            if self._origin is not None:
                self._groups = self._derived_groups()
            else:
                self._groups = self._grouped()
        return self._groups

    def _grouped(self) -> list[ShapeGroup]:
        by_shape: dict[Shape, ShapeGroup] = {}
        for node in self.nodes.values():
            if not node.ready:
                continue
            group = by_shape.get(node.shape)
            if group is None:
                group = by_shape[node.shape] = ShapeGroup(node.shape)
            gpus, cpu, mem = self.free[node.name]
            group.nodes.append(node.name)
            group.free[(gpus, cpu, mem)] += 1
        groups = sorted(by_shape.values(), key=lambda g: (g.shape.key, g.shape.gpus_per_node, g.nodes[0]))
        self._index = {name: i for i, g in enumerate(groups) for name in g.nodes}
        return groups

    def _derived_groups(self) -> list[ShapeGroup]:
        """The origin's groups, with the free capacity of the nodes changed since moved between counts."""
        origin = self._origin
        assert origin is not None
        base = origin.groups()
        index = origin._index
        assert index is not None
        out = [ShapeGroup(g.shape, g.nodes, Counter(g.free)) for g in base]
        before_free = origin.free
        for name in self._changed:
            i = index.get(name)
            if i is None:  # not ready: in no group
                continue
            before, now = before_free[name], self.free[name]
            if before == now:
                continue
            _move(out[i].free, before, now)
        return out

    def _root(self) -> "Inventory":
        return self._origin if self._origin is not None else self

    def _copy(self) -> "Inventory":
        out = Inventory([], leaderworkerset=self.leaderworkerset)
        out.nodes = self.nodes  # shared: nodes are immutable values
        out.free = dict(self.free)
        out._origin = self._root()
        out._changed = set(self._changed)
        return out

    def _names_in_order(self) -> list[str]:
        """All node names, sorted (computed once, on the origin)."""
        root = self._root()
        if root._sorted_names is None:
            root._sorted_names = sorted(root.nodes)
        return root._sorted_names

    def _group_names_in_order(self, i: int) -> list[str]:
        """The names of the origin's i-th group, sorted (computed once)."""
        root = self._root()
        names = root._sorted_group_names.get(i)
        if names is None:
            names = root._sorted_group_names[i] = sorted(root.groups()[i].nodes)
        return names

    def release(self, usage: Iterable[PodUsage]) -> "Inventory":
        """A copy in which these pods' requests are free again (a deployment re-planning counts its own
        pods' GPUs as available to itself)."""
        out = self._copy()
        for u in usage:
            if u.node not in out.free:
                continue
            s = out.nodes[u.node].shape
            gpus, cpu, mem = out.free[u.node]
            out.free[u.node] = (min(s.gpus_per_node, gpus + u.gpus), min(s.cpu_millis, cpu + u.cpu_millis),
                                min(s.memory_bytes, mem + u.memory_bytes))
            out._changed.add(u.node)
        return out

    def reserve(self, fits: Callable[[Node], bool], replicas: int, gpus: int, cpu_millis: int = 0,
                memory_bytes: int = 0, *, shape_fits: Callable[[Shape], bool] | None = None,
                shape_key: Hashable | None = None) -> "Inventory":
        """A copy with capacity taken for `replicas` pods not yet bound, on ready nodes where `fits` (first
        fit, in name order). The operator counts GPUs promised to other LlamaDeployments this way.

        With `shape_fits`, a node must also satisfy `shape_fits(node.shape)`; that is asked once per shape
        rather than once per node, and only nodes of fitting shapes are visited (a must at 10,000 nodes).
        `shape_key`, when given, names what `shape_fits` decides (equal keys, equal answers): the
        inventory the copies come from then remembers the fitting nodes' order under it.
        """
        out = self._copy()
        left = replicas
        if left == 0:
            return out
        names: Iterable[str]
        if shape_fits is None:
            names = (n for n in self._names_in_order() if out.nodes[n].ready)
        else:
            root = self._root()
            cached = root._fit_orders.get(shape_key) if shape_key is not None else None
            if cached is not None:
                names = cached
            else:
                groups = root.groups()
                names = heapq.merge(*(self._group_names_in_order(i) for i, g in enumerate(groups)
                                      if shape_fits(g.shape)))
                if shape_key is not None:
                    names = root._fit_orders[shape_key] = list(names)
        for name in names:
            node = out.nodes[name]
            if not fits(node):
                continue
            free_gpus, cpu, mem = out.free[name]
            taken = 0
            while left and free_gpus >= gpus and cpu >= cpu_millis and mem >= memory_bytes:
                free_gpus, cpu, mem = free_gpus - gpus, cpu - cpu_millis, mem - memory_bytes
                left -= 1
                taken += 1
            if taken:
                out.free[name] = (free_gpus, cpu, mem)
                out._changed.add(name)
            if left == 0:
                break
        return out


def _move(counter: Counter, before, now) -> None:
    """One node's count moves from key `before` to key `now` (keys at zero are dropped, as if counted anew)."""
    left = counter[before] - 1
    if left > 0:
        counter[before] = left
    else:
        del counter[before]
    counter[now] += 1
