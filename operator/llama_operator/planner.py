"""The planner: from a LlamaDeployment spec and the cluster's inventory, the variant to run and why.

Pure and deterministic. It walks the fallback ladder rung by rung (docs/fallback.md):

1. the requested model at its best quality tier (16-bit), then its lower tiers (8, 6, 5, 4 bits; 3 and
   2 bits only when listed in fallback.quantizations);
2. the same tiers again with an 8-bit KV cache (vLLM fp8, llama.cpp q8_0), when allowed;
3. the next smaller model of the same capability (a vision request stays vision), never below the floor,
   and so on down.

Within a rung every candidate (variant x runtime x hardware pool x GPUs per replica) is estimated and
checked against the hard limits: the support matrix, the memory budget, GPU memory, free GPUs, the SLO.
The first rung with a feasible candidate wins, and among its candidates the cheapest: CPU (when it
meets the SLO), then fewer GPUs, then smaller GPUs. Every rejected candidate keeps its reasons, and every
variant a rung considers is a candidate: one that no pool can run (vLLM where only CPU nodes match the
placement, anything where no node does) is listed on a stand-in pool ("no GPU node", "no matching node")
with why. A spec's tolerations never count for the taint keys the operator forbids (effective_tolerations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Collection, Iterable

from .api import LlamaDeploymentSpec
from .catalog import GPU, Model, Quantization, load_catalog
from .engines import kernel_for, release_for, support_problem
from .estimate import (
    VLLM_MAX_GPU_MEMORY_UTILIZATION,
    host_requests,
    Estimate,
    Hardware,
    Workload,
    estimate,
)
from .inventory import GPU_RESOURCES, PER_NODE_LABELS, Inventory, Node, Shape, ShapeGroup
from .units import format_bytes, format_seconds

#: Bits below which a quantization is used only when the spec lists it ("down to 4-bit by default").
DEFAULT_MIN_BITS = 4
#: llama.cpp on GPU loads everything it is given; leave the driver a little room.
LLAMACPP_MAX_GPU_MEMORY_FRACTION = 0.95
#: Tensor-parallel sizes vLLM supports for Llama (they must divide the KV heads).
VLLM_TP_SIZES = (1, 2, 4, 8)
#: GPUs one llama.cpp replica may split layers over.
LLAMACPP_MAX_GPUS = 8
#: llama.cpp's CPU decode is bandwidth-bound; past 16 threads it gains little, so a replica asks for at
#: most this many cores and leaves the rest of the node to others.
CPU_MAX_THREADS = 16
#: CPU replicas leave this share of a node's free memory to the page cache and the kubelet.
CPU_MEMORY_HEADROOM = 0.9
#: How many rejected candidates status carries (the CLI shows them all).
STATUS_REJECTED_LIMIT = 20
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

    def __post_init__(self) -> None:
        # slots() is asked dozens of times per plan, each time a cache lookup that hashes the pool, whose
        # `free` grows with the cluster: hash it once.
        object.__setattr__(self, "_hash", hash((self.key, self.gpu, self.max_gpus_per_node, self.free,
                                                self.cpu_cores, self.cpu_bandwidth_gbps, self.label)))

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


@dataclass
class Candidate:
    model: Model
    quant: Quantization
    kv_cache_dtype: str
    pool: Pool
    gpus_per_replica: int
    rung: int
    estimate: Estimate | None = None
    reasons: list[str] = field(default_factory=list)
    verdict: str = "rejected"  # chosen | feasible | rejected
    #: How far the candidate is from working: the largest of needed/available over every limit
    #: (<= 1 when feasible; infinite when the hardware cannot run the format at all).
    shortfall: float = float("inf")

    @property
    def runtime(self) -> str:
        return self.quant.runtime

    @property
    def cpu_threads(self) -> int:
        return min(self.pool.cpu_cores, CPU_MAX_THREADS)

    @property
    def engine(self) -> str | None:
        """The pinned engine release this candidate runs on (engines.yaml)."""
        rel = release_for(self.model, self.runtime)
        return rel.id if rel else None

    @property
    def kernel(self) -> str | None:
        """vLLM: the kernel the release runs this variant with on this GPU."""
        rel = release_for(self.model, self.runtime)
        if rel is None or self.runtime != "vllm" or self.pool.gpu is None:
            return None
        k = kernel_for(rel, self.model, self.quant, self.pool.gpu)
        return k.id if k else None

    @property
    def hardware(self) -> str:
        if self.pool.label:
            return self.pool.label
        if self.pool.gpu is None:
            return f"cpu ({self.cpu_threads} cores, {self.pool.cpu_bandwidth_gbps:g} GB/s)"
        return f"{self.gpus_per_replica}x {self.pool.gpu.product}"

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def cost_key(self) -> tuple:
        """Cheaper first: CPU, then fewer GPUs, then smaller GPUs, then vLLM, then faster; names break ties.
        A variant no node can run (a stand-in pool) comes last."""
        gpu = self.pool.gpu
        if self.pool.label:
            return (2, self.pool.key, self.quant.id)
        if gpu is None:
            return (0, 0, 0.0, self.estimate.tpot_seconds if self.estimate else 0, self.pool.key, self.quant.id)
        return (
            1,
            self.gpus_per_replica,
            gpu.memory_gib * self.gpus_per_replica,
            # vLLM before llama.cpp on GPUs: continuous batching, and latency histograms for the SLO alerts
            0 if self.runtime == "vllm" else 1,
            self.estimate.tpot_seconds if self.estimate else 0,
            gpu.product,
            self.quant.id,
        )

    def describe(self) -> str:
        kv = f", {self.kv_cache_dtype} KV cache" if self.kv_cache_dtype != "auto" else ""
        return f"{self.model.id} {self.quant.id} ({self.runtime}{kv}) on {self.hardware}"

    def weights_source(self) -> str:
        if self.runtime == "vllm":
            return self.model.vllm_repos[self.quant.id]
        assert self.model.gguf is not None and self.quant.gguf is not None
        return f"{self.model.gguf.repo}/{self.model.gguf.file_for(self.quant.gguf, self.quant.id)}"

    def to_chosen_plan(self):
        """This candidate as status records it, and as the renderer consumes it."""
        from .status import ChosenPlan, Predicted

        e = self.estimate
        assert e is not None
        return ChosenPlan(
            model=self.model.id,
            quantization=self.quant.id,
            runtime=self.runtime,
            engine=self.engine,
            kernel=self.kernel,
            gpuProduct=self.pool.gpu.product if self.pool.gpu else None,
            gpusPerReplica=self.gpus_per_replica,
            kvCacheDtype=self.kv_cache_dtype,
            weightsSource=self.weights_source(),
            gpuMemoryUtilization=round(e.gpu_memory_utilization, 3) if e.gpu_memory_utilization is not None else None,
            cpuThreads=self.cpu_threads if self.pool.gpu is None else None,
            cpuMemoryBandwidthGbps=self.pool.cpu_bandwidth_gbps if self.pool.gpu is None else None,
            predicted=Predicted(
                memoryBytes=e.total_bytes,
                perGpuBytes=e.per_gpu_bytes if self.pool.gpu else None,
                ttftSeconds=round(e.ttft_seconds, 6),
                tpotSeconds=round(e.tpot_seconds, 6),
            ),
        )

    def to_dict(self) -> dict:
        out = {
            "model": self.model.id,
            "quantization": self.quant.id,
            "runtime": self.runtime,
            "engine": self.engine,
            "kernel": self.kernel,
            "hardware": self.hardware,
            "gpuProduct": self.pool.gpu.product if self.pool.gpu else None,
            "gpusPerReplica": self.gpus_per_replica,
            "kvCacheDtype": self.kv_cache_dtype,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
        }
        out["predicted"] = None  # a format the hardware cannot run is not estimated
        if self.estimate is not None:
            out["predicted"] = {
                "memoryBytes": self.estimate.total_bytes,
                "perGpuBytes": self.estimate.per_gpu_bytes if self.pool.gpu else None,
                "ttftSeconds": round(self.estimate.ttft_seconds, 6),
                "tpotSeconds": round(self.estimate.tpot_seconds, 6),
            }
        return out


@dataclass
class Plan:
    requested_model: str
    feasible: bool
    chosen: Candidate | None
    candidates: list[Candidate]
    fallback: bool
    fallback_reason: str
    notes: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> list[Candidate]:
        return [c for c in self.candidates if c.verdict == "rejected"]

    def summary(self) -> str:
        if self.chosen is None:
            return "no feasible plan: " + (self.fallback_reason or "no candidate")
        return self.chosen.describe()

    def to_dict(self) -> dict:
        chosen = None
        if self.chosen is not None:
            c = self.chosen
            chosen = c.to_dict()
            chosen.pop("verdict")
            chosen.pop("reasons")
            chosen["weightsSource"] = c.weights_source()
            if c.estimate and c.estimate.gpu_memory_utilization is not None:
                chosen["gpuMemoryUtilization"] = round(c.estimate.gpu_memory_utilization, 3)
        return {
            "feasible": self.feasible,
            "requestedModel": self.requested_model,
            "fallback": self.fallback,
            "fallbackReason": self.fallback_reason,
            "chosen": chosen,
            "candidates": [c.to_dict() for c in self.candidates],
            "notes": list(self.notes),
        }


# --- The ladder ---------------------------------------------------------------------------------------


def ladder_models(spec: LlamaDeploymentSpec) -> list[Model]:
    """The requested model, then smaller ones of the same capability down to the floor (largest first).

    Models of one size share one rung (Llama 3.3 70B and 3.1 70B need the same memory), so only the
    newest of a size is offered as a fallback.
    """
    catalog = load_catalog()
    requested = catalog.model(spec.model)
    out = [requested]
    if not spec.fallback.allowSmallerModels:
        return out
    same = [m for m in catalog.models.values() if m.capability == requested.capability]
    floor_id = spec.fallback.minimumModel
    floor_size = catalog.model(floor_id).published_parameters if floor_id else 0.0
    smaller = [m for m in same if floor_size <= m.published_parameters < requested.published_parameters * 0.95]
    smaller.sort(key=lambda m: (-m.published_parameters, -float(m.family)))
    seen_sizes: set[int] = set()
    for m in smaller:
        size = round(m.published_parameters / 1e9)
        if size not in seen_sizes:
            seen_sizes.add(size)
            out.append(m)
    return out


def allowed_quantizations(spec: LlamaDeploymentSpec, model: Model) -> list[Quantization]:
    catalog = load_catalog()
    listed = spec.fallback.quantizations
    out = []
    for qid in model.variants():
        q = catalog.quantizations[qid]
        if spec.runtime != "auto" and q.runtime != spec.runtime:
            continue
        if listed is not None:
            if qid not in listed:
                continue
        elif q.bits < DEFAULT_MIN_BITS:
            continue
        if not spec.fallback.allowQuantization and q.bits < 16:
            continue
        out.append(q)
    return out


def quality_tiers(quants: Iterable[Quantization]) -> list[list[Quantization]]:
    """Quantizations grouped by quality, best first (bf16 and f16 share a tier, fp8 and q8_0 another)."""
    by_quality: dict[int, list[Quantization]] = {}
    for q in quants:
        by_quality.setdefault(q.quality, []).append(q)
    return [by_quality[k] for k in sorted(by_quality, reverse=True)]


# --- Pools --------------------------------------------------------------------------------------------


def _tolerates(taints, tolerations: list[dict]) -> bool:
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


GPU_TOLERATIONS = [{"key": r, "operator": "Exists", "effect": "NoSchedule"} for r in GPU_RESOURCES]


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
        elif not t.get("key") and t.get("operator") == "Exists":
            reached.update(forbidden_keys)
    return sorted(reached)


def _spec_tolerations(spec: LlamaDeploymentSpec) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in spec.placement.tolerations]


class _Tolerations:
    """A spec's tolerations under the forbidden keys, per shape (effective_tolerations): worked out once per
    plan, unless a toleration without a key must be spelt out over each shape's taint keys."""

    __slots__ = ("spec", "forbidden", "fixed")

    def __init__(self, spec: LlamaDeploymentSpec, forbidden: Collection[str]):
        self.spec = _spec_tolerations(spec)
        self.forbidden = forbidden
        keyless = bool(forbidden) and any(not t.get("key") and t.get("operator") == "Exists" for t in self.spec)
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


# --- Checking one candidate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    """What a candidate's verdict depends on besides the hardware and the free capacity."""

    budget_bytes: int
    ttft_seconds: float
    tpot_seconds: float
    ttft_text: str
    tpot_text: str

    @classmethod
    def of(cls, spec: LlamaDeploymentSpec) -> "_Limits":
        return cls(spec.memory_budget_bytes, spec.slo.ttft_seconds, spec.slo.tpot_seconds,
                   spec.slo.ttftP95, spec.slo.tpotP95)


@dataclass(frozen=True)
class _FixedVerdict:
    """A candidate's estimate and its verdict on everything but free capacity. The same variant on the same
    hardware under the same limits always gets the same one, so it is computed once (see _fixed_verdict):
    every pass re-plans, and deployments alike in spec plan alike."""

    estimate: Estimate | None
    before: tuple[str, ...]  # reasons listed before the capacity one (support, budget, GPU memory)
    after: tuple[str, ...]  # and after it (the SLO)
    shortfall: float  # the largest needed/available ratio, capacity aside
    cpu_millis: int = 0  # host requests of one replica, for the capacity check
    memory_bytes: int = 0


@lru_cache(maxsize=65536)
def _fixed_verdict(model: Model, quant: Quantization, hw: Hardware, workload: Workload,
                   limits: _Limits) -> _FixedVerdict:
    gpu, runtime = hw.gpu, quant.runtime
    problem = support_problem(model, quant, gpu, workload.kv_cache_dtype)
    if problem:
        return _FixedVerdict(None, (problem,), (), float("inf"))
    e = estimate(model, quant, hw, workload)
    before, after = [], []
    ratios = [e.total_bytes / limits.budget_bytes]
    if e.total_bytes > limits.budget_bytes:
        before.append(f"needs {format_bytes(e.total_bytes)} per replica > memory budget "
                      f"{format_bytes(limits.budget_bytes)} (weights {format_bytes(e.weights_bytes)}, "
                      f"KV cache {format_bytes(e.kv_cache_bytes)})")
    if gpu is not None:
        fraction = VLLM_MAX_GPU_MEMORY_UTILIZATION if runtime == "vllm" else LLAMACPP_MAX_GPU_MEMORY_FRACTION
        usable = gpu.memory_bytes * fraction
        ratios.append(e.per_gpu_bytes / usable)
        if e.per_gpu_bytes > usable:
            before.append(f"needs {format_bytes(e.per_gpu_bytes)} per GPU > {format_bytes(usable)} usable on "
                          f"{gpu.product}")
        cpu_millis, memory_bytes = host_requests(runtime, hw.gpu_count, 0, e.total_bytes)
    else:
        cpu_millis, memory_bytes = host_requests(runtime, 0, hw.cpu_cores, e.total_bytes)
    ratios.append(e.ttft_seconds / limits.ttft_seconds)
    ratios.append(e.tpot_seconds / limits.tpot_seconds)
    if e.ttft_seconds > limits.ttft_seconds:
        after.append(f"predicted TTFT {format_seconds(e.ttft_seconds)} > SLO {limits.ttft_text}")
    if e.tpot_seconds > limits.tpot_seconds:
        after.append(f"predicted TPOT {format_seconds(e.tpot_seconds)} > SLO {limits.tpot_text}")
    return _FixedVerdict(e, tuple(before), tuple(after), max(ratios), cpu_millis, memory_bytes)


def _check(c: Candidate, spec: LlamaDeploymentSpec, workload: Workload, limits: _Limits | None = None) -> None:
    gpu = c.pool.gpu
    if gpu is None:
        hw = Hardware(gpu=None, cpu_cores=c.cpu_threads, cpu_bandwidth_gbps=c.pool.cpu_bandwidth_gbps)
    else:
        hw = Hardware(gpu=gpu, gpu_count=c.gpus_per_replica)
    fixed = _fixed_verdict(c.model, c.quant, hw, workload, limits or _Limits.of(spec))
    c.reasons.extend(fixed.before)
    if fixed.estimate is None:  # the hardware cannot run the format: nothing else to say
        return
    c.estimate = fixed.estimate
    slots = c.pool.slots(c.gpus_per_replica, fixed.cpu_millis, fixed.memory_bytes)
    if slots < spec.replicas:
        if gpu is not None:
            c.reasons.append(f"{spec.replicas} replica(s) need {c.gpus_per_replica} free {gpu.product} GPU(s), "
                             f"{fixed.cpu_millis / 1000:g} cores and {format_bytes(fixed.memory_bytes)} RAM on one "
                             f"node each; only {slots} such placement(s) are free")
        else:
            c.reasons.append(f"{spec.replicas} replica(s) need {c.cpu_threads} free cores and "
                             f"{format_bytes(fixed.estimate.total_bytes)} RAM on one node each; only {slots} "
                             f"such node slot(s)")
    c.reasons.extend(fixed.after)
    c.shortfall = max(fixed.shortfall, spec.replicas / slots if slots else float("inf"))


def _gpu_counts(quant: Quantization, model: Model, pool: Pool) -> list[int]:
    if pool.gpu is None:
        return [0]
    top = pool.max_gpus_per_node
    if quant.runtime == "vllm":
        return [n for n in VLLM_TP_SIZES if n <= top and model.arch.kv_heads % n == 0 and model.arch.heads % n == 0]
    return list(range(1, min(top, LLAMACPP_MAX_GPUS) + 1))


def _best_of(attempts: list[Candidate]) -> Candidate:
    """One line per (variant, pool): the cheapest feasible GPU count, else the attempt closest to working."""
    feasible = [a for a in attempts if a.feasible]
    if feasible:
        return min(feasible, key=lambda a: a.gpus_per_replica)
    return min(attempts, key=lambda a: (a.shortfall, a.gpus_per_replica))


def _kv_dtype(quant: Quantization) -> str:
    return "fp8" if quant.runtime == "vllm" else "q8_0"


def plan(spec: LlamaDeploymentSpec, inventory: Inventory, *,
         forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> Plan:
    """Choose what to run for `spec` on `inventory`, with the verdict and reasons for every candidate tried.
    `forbidden_tolerations`: taint keys the spec's tolerations do not count for (effective_tolerations)."""
    pools, notes = build_pools(spec, inventory, forbidden_tolerations)
    base = Workload(context_length=spec.contextLength, concurrency=spec.slo.concurrency,
                    prompt_tokens=spec.slo.promptTokens)
    kv_options = ["auto"] + (["8bit"] if spec.fallback.allowKVCacheQuantization else [])
    limits = _Limits.of(spec)
    candidates: list[Candidate] = []
    chosen: Candidate | None = None
    rung = 0
    rung_labels: list[str] = []
    if not pools:
        notes.append("no ready node matches the placement (nodeSelector, tolerations, gpuProducts)")
    for model in ladder_models(spec):
        tiers = quality_tiers(allowed_quantizations(spec, model))
        for kv in kv_options:
            for tier in tiers:
                rung_candidates = []
                for quant in tier:
                    kv_dtype = "auto" if kv == "auto" else _kv_dtype(quant)
                    workload = base if kv_dtype == "auto" else Workload(
                        base.context_length, base.concurrency, base.prompt_tokens, kv_dtype)  # type: ignore[arg-type]
                    placed = False
                    for pool in pools:
                        if pool.gpu is None and quant.runtime == "vllm":
                            continue  # vLLM serves on GPUs only: no attempt on a CPU pool
                        attempts = []
                        for n in _gpu_counts(quant, model, pool):
                            c = Candidate(model, quant, kv_dtype, pool, n, rung)
                            _check(c, spec, workload, limits)
                            attempts.append(c)
                            if c.feasible:
                                break  # _best_of takes the fewest GPUs that work: larger counts never win
                        if attempts:
                            rung_candidates.append(_best_of(attempts))
                            placed = True
                    if not placed:  # still a candidate, on a stand-in pool, saying why nothing could run it
                        rung_candidates.append(_unplaceable(spec, model, quant, kv_dtype, rung, bool(pools)))
                rung_labels.append(f"{model.id} {'/'.join(q.id for q in tier)}"
                                   + (" with 8-bit KV cache" if kv != "auto" else ""))
                rung_candidates.sort(key=lambda c: c.cost_key())
                candidates.extend(rung_candidates)
                feasible = [c for c in rung_candidates if c.feasible]
                if feasible:
                    chosen = feasible[0]
                    chosen.verdict = "chosen"
                    for other in feasible[1:]:
                        other.verdict = "feasible"
                    break
                rung += 1
            if chosen:
                break
            if not _kv_is_the_problem(candidates, rung_labels):
                # An 8-bit KV cache only helps when the cache is what does not fit.
                break
        if chosen:
            break
    fallback = chosen is not None and chosen.rung > 0
    reason = _fallback_reason(candidates, chosen, rung_labels, notes)
    return Plan(
        requested_model=spec.model,
        feasible=chosen is not None,
        chosen=chosen,
        candidates=candidates,
        fallback=fallback,
        fallback_reason=reason,
        notes=notes,
    )


def _unplaceable(spec: LlamaDeploymentSpec, model: Model, quant: Quantization, kv_dtype: str, rung: int,
                 any_pool: bool) -> Candidate:
    """The candidate of a variant that no pool can run: vLLM where only CPU nodes match the placement, or
    anything where no node matches at all. It is rejected, on a stand-in pool (hardware "no GPU node" or
    "no matching node"), with the reasons. Only such variants pay for this: no per-node work."""
    reasons = []
    needs_gpu = quant.runtime == "vllm" or not spec.fallback.allowCPU
    if quant.runtime == "vllm":
        reasons.append(support_problem(model, quant, None, kv_dtype) or f"{quant.runtime} needs a GPU")
    if needs_gpu:
        gpu_reason = "no ready GPU node matches the placement"
        if not spec.fallback.allowCPU and quant.runtime != "vllm":
            gpu_reason += " (fallback.allowCPU is false: CPU nodes do not count)"
        reasons.append(gpu_reason)
    else:
        assert not any_pool  # with a CPU or GPU pool, llama.cpp always has an attempt
        reasons.append("no ready node matches the placement")
    return Candidate(model, quant, kv_dtype, NO_GPU_NODE if needs_gpu else NO_NODE, 0, rung, reasons=reasons)


def _kv_is_the_problem(candidates: list[Candidate], rung_labels: list[str]) -> bool:
    """True when some candidate failed on memory alone and its KV cache is a large share of its memory."""
    for c in candidates:
        if c.estimate is None or c.kv_cache_dtype != "auto":
            continue
        memory_only = all(r.startswith("needs ") or "per GPU" in r for r in c.reasons)
        if memory_only and c.estimate.kv_cache_bytes >= 0.25 * c.estimate.total_bytes:
            return True
    return False


def _fallback_reason(candidates: list[Candidate], chosen: Candidate | None, rung_labels: list[str],
                     notes: list[str]) -> str:
    """Why the rungs above the chosen one did not work: the closest candidate's reasons, per rung."""
    if chosen is not None and chosen.rung == 0:
        return ""
    parts = []
    last = chosen.rung if chosen else len(rung_labels)
    for rung in range(last):
        rejected = [c for c in candidates if c.rung == rung]
        if not rejected:  # not reached: every variant of a rung is a candidate, if only on a stand-in pool
            parts.append(f"{rung_labels[rung]}: no hardware to try")
            continue
        # The candidate closest to working explains the rung best; a support-matrix refusal (no
        # estimate, infinite shortfall) says less than a limit missed on hardware that can run the format.
        closest = min(rejected, key=lambda c: (c.shortfall, c.cost_key()))
        parts.append(f"{rung_labels[rung]}: {closest.hardware}: {'; '.join(closest.reasons)}")
    if not parts and notes:
        parts = list(notes)
    head = "" if chosen is None else f"chose {chosen.describe()} because "
    shown = parts[:4] + ([f"and {len(parts) - 4} more rung(s)"] if len(parts) > 4 else [])
    return head + " | ".join(shown)


# --- Judging a plan already in force ---------------------------------------------------------------------


def rank(spec: LlamaDeploymentSpec, chosen) -> tuple:
    """Where a plan (api.ChosenPlan) stands on this spec's ladder: smaller is better.

    (model position, 8-bit KV cache, quality tier, GPUs, GPU memory); a plan off the ladder (the spec
    changed since) ranks last.
    """
    catalog = load_catalog()
    models = [m.id for m in ladder_models(spec)]
    if chosen.model not in models or chosen.quantization not in catalog.quantizations:
        return (len(models), 1, 0, 0, 0.0)
    gpu = catalog.find_gpu(chosen.gpuProduct) if chosen.gpuProduct else None
    return (
        models.index(chosen.model),
        0 if chosen.kvCacheDtype == "auto" else 1,
        -catalog.quantizations[chosen.quantization].quality,
        chosen.gpusPerReplica if chosen.gpuProduct else 0,
        gpu.memory_gib if gpu else 0.0,
    )


def check_choice(spec: LlamaDeploymentSpec, inventory: Inventory, chosen, *,
                 forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> list[str]:
    """Reasons the plan in force (api.ChosenPlan) no longer works on `inventory`; empty while it does.

    The operator keeps a working plan until a better one has been stable for a while, but moves at once
    when the one in force has lost its hardware.
    """
    catalog = load_catalog()
    if chosen.model not in catalog.models or chosen.quantization not in catalog.quantizations:
        return [f"{chosen.model} {chosen.quantization} is no longer in the catalog"]
    model = catalog.model(chosen.model)
    quant = catalog.quantizations[chosen.quantization]
    pools, _ = build_pools(spec, inventory, forbidden_tolerations)
    if chosen.gpuProduct:
        pool = next((p for p in pools if p.gpu is not None and p.gpu.product == chosen.gpuProduct), None)
    else:
        pool = next((p for p in pools if p.gpu is None and p.cpu_bandwidth_gbps == chosen.cpuMemoryBandwidthGbps),
                    None)
    if pool is None:
        return [f"no ready node of {chosen.gpuProduct or 'the planned CPU shape'} matches the placement any more"]
    workload = Workload(spec.contextLength, spec.slo.concurrency, spec.slo.promptTokens,
                        chosen.kvCacheDtype)  # type: ignore[arg-type]
    c = Candidate(model, quant, chosen.kvCacheDtype, pool, chosen.gpusPerReplica, rung=0)
    _check(c, spec, workload)
    return c.reasons


def _plan_shape_fits(spec: LlamaDeploymentSpec, chosen, forbidden_tolerations: Collection[str]):
    """Whether a shape is one the plan `chosen` (api.ChosenPlan) can use: its GPU product or CPU shape,
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
    """The spec's tolerations as the model server pods of the plan `chosen` (api.ChosenPlan) must carry
    them: effective_tolerations, a toleration without a key spelt out over the taint keys of the nodes
    the plan can use (what the planner counted). Per shape, not per node; the inventory is read only when
    such a toleration meets forbidden keys."""
    spec_tolerations = _spec_tolerations(spec)
    if not forbidden_tolerations or all(t.get("key") or t.get("operator") != "Exists" for t in spec_tolerations):
        return effective_tolerations(spec_tolerations, forbidden_tolerations)
    shape_fits = _plan_shape_fits(spec, chosen, forbidden_tolerations)
    keys = {t.key for g in inventory.groups() if shape_fits(g.shape) for t in g.shape.taints}
    return effective_tolerations(spec_tolerations, forbidden_tolerations, keys)


def with_pod_tolerations(spec: LlamaDeploymentSpec, inventory: Inventory, chosen,
                         forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> LlamaDeploymentSpec:
    """`spec` with its placement.tolerations replaced by pod_tolerations: what to hand the renderer, which
    passes a spec's tolerations through. The same object when nothing changes."""
    tolerations = pod_tolerations(spec, inventory, chosen, forbidden_tolerations)
    if tolerations == _spec_tolerations(spec):
        return spec
    from .api import Toleration

    placement = spec.placement.model_copy(update={"tolerations": [Toleration(**t) for t in tolerations]})
    return spec.model_copy(update={"placement": placement})


def reserve_plan(inventory: Inventory, spec: LlamaDeploymentSpec, chosen, replicas: int, *,
                 forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS) -> Inventory:
    """`inventory` with `replicas` replicas of the plan `chosen` (api.ChosenPlan) taken, on the nodes that
    plan can use: its GPU product or CPU shape, within the spec's placement."""
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
    if chosen.gpuProduct is not None:
        return inventory.reserve(fits, replicas, chosen.gpusPerReplica, shape_fits=shape_fits, shape_key=key)
    return inventory.reserve(fits, replicas, 0, (chosen.cpuThreads or 1) * 1000, chosen.predicted.memoryBytes,
                             shape_fits=shape_fits, shape_key=key)
