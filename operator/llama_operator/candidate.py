"""One candidate of the planner's ladder (and `Plan`, what the planner returns: the chosen one, every one tried and
why): a variant (model, quantization, KV cache) on a pool with a number of
GPUs per replica, with its estimate, its verdict and the reasons for it, and how status, the CLI and the
renderer read it (to_dict, to_chosen_plan).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .status import ChosenPlan, Predicted, SpeculativePlan, variant_name
from .catalog import Model, Quantization
from .drafting import DraftChoice, DraftEstimate
from .engines import kernel_for, release_for
from .estimate import Estimate
from .pipeline import PipelineEstimate
from .placement import Pool

#: llama.cpp's CPU decode is bandwidth-bound; past 16 threads it gains little, so a replica asks for at
#: most this many cores and leaves the rest of the node to others.
CPU_MAX_THREADS = 16


def hardware_label(gpu_product: str | None, gpus: int, cpu_threads: int | None, cpu_bandwidth_gbps: float | None,
                   nodes: int = 1) -> str:
    """How plans, status and corrections name one replica's hardware: '1x NVIDIA-L4', 'cpu (16 cores, 100 GB/s)',
    '2 nodes x 8x NVIDIA-H100-80GB-HBM3' (`gpus` GPUs on each of `nodes` nodes)."""
    if gpu_product is None:
        return f"cpu ({cpu_threads} cores, {cpu_bandwidth_gbps or 0:g} GB/s)"
    return f"{gpus}x {gpu_product}" if nodes == 1 else f"{nodes} nodes x {gpus}x {gpu_product}"


def plan_hardware(plan: ChosenPlan) -> str:
    """The hardware label of a plan in force (as its candidate named it)."""
    return hardware_label(plan.gpuProduct, plan.gpusPerReplica, plan.cpuThreads, plan.cpuMemoryBandwidthGbps,
                          plan.nodesPerReplica)


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
    #: The SLO loop's (TTFT, TPOT) correction the estimate was multiplied by (planner.Corrections); None: none.
    correction: tuple[float, float] | None = None
    #: A fine-tune's source (spec.weights) served instead of the catalog's checkpoint; None: the catalog's.
    custom_weights: str | None = None
    #: Nodes one replica spans (vLLM: pipeline parallel across them, `gpus_per_replica` GPUs tensor parallel on
    #: each); 1: one node.
    nodes_per_replica: int = 1
    #: The draft it decodes with (speculative decoding, drafting.py); None: none.
    draft: DraftChoice | None = None
    #: The chosen draft's limits (planner.drafts.draft_limits): the acceptance rate and the requests per replica
    #: beyond which it no longer pays, for the SLO loop.
    draft_limits: tuple[float | None, int | None] = (None, None)

    @property
    def variant(self) -> str:
        """As status names it (status.variant_name): corrections are kept per variant and hardware."""
        return variant_name(self.model.id, self.quant.id, self.draft.model.id if self.draft else None)

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
        return hardware_label(self.pool.gpu.product if self.pool.gpu else None, self.gpus_per_replica,
                              self.cpu_threads, self.pool.cpu_bandwidth_gbps, self.nodes_per_replica)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def cost_key(self) -> tuple:
        """Cheaper first: CPU, then one node before several, then fewer GPUs, then smaller GPUs, then vLLM, then
        faster; names break ties. A variant no node can run (a stand-in pool) comes last."""
        gpu = self.pool.gpu
        if self.pool.label:
            return (2, self.pool.key, self.quant.id)
        if gpu is None:
            return (0, 0, 0.0, self.estimate.tpot_seconds if self.estimate else 0, self.pool.key, self.quant.id)
        return (
            1,
            self.nodes_per_replica,
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
        return f"{self.model.id} {self.quant.id} ({self.runtime}{kv}){self.draft_text()} on {self.hardware}"

    def draft_text(self) -> str:
        """' with a llama-3.2-1b-instruct bf16 draft of 4 tokens', or '' without a draft."""
        if self.draft is None:
            return ""
        k = self.estimate.draft_tokens if isinstance(self.estimate, DraftEstimate) else self.draft.tokens
        return f" with a {self.draft.model.id} {self.draft.quant.id} draft" + (f" of {k} tokens" if k else "")

    def weights_source(self) -> str:
        if self.custom_weights is not None:
            return self.custom_weights
        if self.runtime == "vllm":
            return self.model.vllm_repos[self.quant.id]
        assert self.model.gguf is not None and self.quant.gguf is not None
        return f"{self.model.gguf.repo}/{self.model.gguf.file_for(self.quant.gguf, self.quant.id)}"

    def draft_weights_source(self) -> str:
        assert self.draft is not None
        d, q = self.draft.model, self.draft.quant
        if q.runtime == "vllm":
            return d.vllm_repos[q.id]
        assert d.gguf is not None and q.gguf is not None
        return f"{d.gguf.repo}/{d.gguf.file_for(q.gguf, q.id)}"

    def speculative(self) -> dict | None:
        """The draft as status (SpeculativePlan) and `plan -o json` show it; None without one."""
        e = self.estimate
        if self.draft is None or not isinstance(e, DraftEstimate):
            return None
        min_rate, pays_up_to = self.draft_limits
        return {
            "draftModel": self.draft.model.id,
            "draftQuantization": self.draft.quant.id,
            "draftWeightsSource": self.draft_weights_source(),
            "numSpeculativeTokens": e.draft_tokens,
            "acceptance": round(e.acceptance, 3),
            "acceptanceSource": "measured" if self.draft.measured else "published",
            "predictedSpeedup": round(e.speedup, 2),
            "minAcceptanceRate": None if min_rate is None else round(min_rate, 3),
            "paysUpToConcurrency": pays_up_to,
        }

    def to_chosen_plan(self) -> ChosenPlan:
        """This candidate as status records it, and as the renderer consumes it."""
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
            nodesPerReplica=self.nodes_per_replica,
            kvCacheDtype=self.kv_cache_dtype,
            weightsSource=self.weights_source(),
            gpuMemoryUtilization=round(e.gpu_memory_utilization, 3) if e.gpu_memory_utilization is not None else None,
            cpuThreads=self.cpu_threads if self.pool.gpu is None else None,
            cpuMemoryBandwidthGbps=self.pool.cpu_bandwidth_gbps if self.pool.gpu is None else None,
            speculative=SpeculativePlan(**spec) if (spec := self.speculative()) else None,
            predicted=Predicted(**self._predicted()),
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model.id,
            "quantization": self.quant.id,
            "runtime": self.runtime,
            "engine": self.engine,
            "kernel": self.kernel,
            "hardware": self.hardware,
            "gpuProduct": self.pool.gpu.product if self.pool.gpu else None,
            "gpusPerReplica": self.gpus_per_replica,
            "nodesPerReplica": self.nodes_per_replica,
            "kvCacheDtype": self.kv_cache_dtype,
            "speculative": self.speculative() if self.draft is not None else None,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            # a format the hardware cannot run is not estimated
            "predicted": self._predicted() if self.estimate is not None else None,
        }

    def _predicted(self) -> dict:
        """The estimate as status and the CLI show it."""
        e = self.estimate
        assert e is not None
        return {
            "memoryBytes": e.total_bytes,
            "perGpuBytes": e.per_gpu_bytes if self.pool.gpu else None,
            "ttftSeconds": round(e.ttft_seconds, 6),
            "tpotSeconds": round(e.tpot_seconds, 6),
            **({"adapterBytes": e.adapter_bytes} if e.adapter_bytes else {}),
            **({"draftBytes": e.draft_bytes} if isinstance(e, DraftEstimate) else {}),
            # a replica spanning nodes (pipeline.PipelineEstimate): how long it takes to start
            **({"startupSeconds": round(e.startup_seconds, 1)} if isinstance(e, PipelineEstimate) else {}),
            **({"correctedBy": {"ttftFactor": self.correction[0], "tpotFactor": self.correction[1]}}
               if self.correction else {}),
        }


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
