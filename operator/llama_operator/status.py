"""The LlamaDeployment's status: what the operator chose and why, and how the deployment is doing.

Written by the operator only; the CRD's status schema is generated from these models (crd.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .fields import ApiModel
from .finetune import MAX_ADAPTERS

#: The phases of status.phase (the metrics carry a count of each, and the alert rules select on two).
PHASES = ["Pending", "Deploying", "Ready", "Degraded", "Unschedulable", "Invalid"]


class Condition(ApiModel):
    type: str = Field(description="Ready, PlanFeasible, FallbackApplied or Progressing.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="What a person can act on.")
    lastTransitionTime: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = None


class Factors(ApiModel):
    ttftFactor: float = Field(description="Observed over estimated time to first token.")
    tpotFactor: float = Field(description="Observed over estimated time per output token.")


class Predicted(ApiModel):
    memoryBytes: int = Field(description="Memory one replica needs (weights, LoRA adapters, KV cache, runtime "
                             "overhead).")
    adapterBytes: int | None = Field(default=None, description=(
        "Of memoryBytes, what the LoRA adapters take (vLLM's reservation of --max-loras slots at --max-lora-rank "
        "on every GPU; llama.cpp's adapter files). docs/adapters.md."))
    draftBytes: int | None = Field(default=None, description=(
        "Of memoryBytes, what the draft model takes (its weights, its KV cache, llama.cpp's compute buffer for it)."))
    perGpuBytes: int | None = Field(default=None, description="Memory needed on each GPU (null on CPU).")
    ttftSeconds: float = Field(description="Predicted p95 time to first token (the estimate times correctedBy).")
    tpotSeconds: float = Field(description="Predicted time per output token (the estimate times correctedBy).")
    startupSeconds: float | None = Field(default=None, description=(
        "Replicas spanning nodes: predicted time for a replica to start serving (every node downloads the "
        "checkpoint, at the rate the startup probe allows for). Null on one node. docs/estimator.md."))
    correctedBy: Factors | None = Field(default=None, description=(
        "The correction (status.corrections) the prediction includes: the estimator's figures times these. "
        "Null: the estimate as it is."))


class SpeculativePlan(ApiModel):
    """The draft a plan decodes with (docs/speculative.md)."""

    draftModel: str = Field(description="The draft, by catalog id.")
    draftQuantization: str = Field(description="The draft's variant (its checkpoint or GGUF file).")
    draftWeightsSource: str = Field(default="", description="Where the draft's weights come from.")
    numSpeculativeTokens: int = Field(description="Tokens drafted per step.")
    acceptance: float = Field(description=(
        "Per-token acceptance the prediction assumes: the chance the model accepts a drafted token, given it "
        "accepted the ones before (the catalog's published figure for the pair, or what the SLO loop measured)."))
    acceptanceSource: str = Field(default="", description="published (catalog speculation.yaml) or measured.")
    predictedSpeedup: float = Field(description=(
        "Time per output token without the draft over with it, at slo.concurrency (predicted)."))
    minAcceptanceRate: float | None = Field(default=None, description=(
        "Accepted over drafted tokens (what the engines count) below which the draft is predicted to gain less than "
        "the catalog's minimum at slo.concurrency: the SLO loop turns the draft off below it (mode Auto)."))
    paysUpToConcurrency: int | None = Field(default=None, description=(
        "The most requests per replica at which the draft is still predicted to gain the minimum: the SLO loop turns "
        "it off when more run (mode Auto)."))


class ChosenPlan(ApiModel):
    model: str
    quantization: str
    runtime: Literal["vllm", "llamacpp"]
    engine: str | None = Field(default=None, description=(
        "The pinned engine release the plan runs on (e.g. vllm-0.34.0): its image, and the options it accepts. "
        "Follows the operator's catalog: a newer operator may roll a plan onto a newer release."))
    kernel: str | None = Field(default=None, description=(
        "vLLM: how the release runs the checkpoint on this GPU (e.g. awq_marlin, fp8-marlin-w8a16, fp16-cast); "
        "docs/engines.md lists them."))
    gpuProduct: str | None = Field(default=None, description="GPU product; null on CPU.")
    gpusPerReplica: int = Field(description=(
        "GPUs of one replica on each of its nodes (vLLM's tensor-parallel size); a replica spanning "
        "nodesPerReplica nodes holds gpusPerReplica x nodesPerReplica GPUs."))
    nodesPerReplica: int = Field(default=1, ge=1, description=(
        "Nodes one replica spans: 1 (a Deployment), or more (a LeaderWorkerSet group, pipeline parallel across "
        "the nodes, tensor parallel within each). docs/multinode.md."))
    kvCacheDtype: str = Field(default="auto", description="auto (the model's dtype), fp8 or q8_0.")
    weightsSource: str = Field(default="", description=(
        "Where the weights come from: a Hugging Face repo[/file] of the catalog, or the fine-tune's hf:// or pvc:// "
        "source (spec.weights)."))
    gpuMemoryUtilization: float | None = Field(default=None, description="vLLM --gpu-memory-utilization.")
    cpuThreads: int | None = Field(default=None, description="llama.cpp threads on a CPU node.")
    cpuMemoryBandwidthGbps: float | None = Field(
        default=None, description="Memory bandwidth of the CPU nodes planned on (GB/s); pods are pinned to them.")
    speculative: SpeculativePlan | None = Field(default=None, description=(
        "The draft model the plan decodes with (speculative decoding); null: none. docs/speculative.md."))
    predicted: Predicted

    @property
    def variant(self) -> str:
        """model/quantization, and '+draft' when it decodes with one (corrections are kept per variant)."""
        return variant_name(self.model, self.quantization, self.speculative.draftModel if self.speculative else None)

    def same_choice(self, other: "ChosenPlan | None") -> bool:
        """Whether two plans run the same thing (predictions aside)."""
        if other is None:
            return False
        keys = ("model", "quantization", "runtime", "gpuProduct", "gpusPerReplica", "nodesPerReplica", "kvCacheDtype",
                "cpuThreads", "cpuMemoryBandwidthGbps")
        return all(getattr(self, k) == getattr(other, k) for k in keys) and _draft(self) == _draft(other)


def variant_name(model: str, quantization: str, draft: str | None = None) -> str:
    """How status, corrections and metrics name a variant: 'llama-3.1-8b-instruct/bf16', with
    '+llama-3.2-1b-instruct' when it decodes with that draft."""
    return f"{model}/{quantization}" + (f"+{draft}" if draft else "")


def _draft(plan: ChosenPlan) -> tuple | None:
    s = plan.speculative
    return (s.draftModel, s.draftQuantization, s.numSpeculativeTokens) if s else None


class RejectedCandidate(ApiModel):
    model: str
    quantization: str
    runtime: str
    hardware: str
    reasons: list[str]


class FallbackStatus(ApiModel):
    inForce: bool = False
    requestedModel: str | None = None
    reason: str = ""


class PendingChange(ApiModel):
    plan: ChosenPlan = Field(description="The better plan waiting for the cluster to stay stable.")
    since: str = Field(description="When this plan was first proposed (RFC 3339).")
    reason: str = ""


class Observed(ApiModel):
    """What the SLO loop last saw of the model servers (docs/slo-loop.md)."""

    ttftP95Seconds: float | None = Field(default=None, description=(
        "Observed time to first token: vLLM's p95 from its histogram buckets (coarse: interpolated within a "
        "bucket); llama.cpp's mean (statistic says which)."))
    tpotP95Seconds: float | None = Field(default=None, description="Observed time per output token (as above).")
    statistic: str | None = Field(default=None, description=(
        "How the latency was computed: 'p95 from histogram buckets' (vLLM) or 'mean from counters' (llama.cpp)."))
    ttftOverTarget: float | None = Field(default=None, description=(
        "Share of requests slower than spec.slo.ttftP95 (vLLM); above 0.05 the p95 target is missed."))
    tpotOverTarget: float | None = Field(default=None, description="Share of requests slower than tpotP95 (vLLM).")
    requestsRunning: float | None = Field(default=None, description="Requests being served, all replicas.")
    requestsWaiting: float | None = Field(default=None, description="Requests queued, all replicas.")
    requestsPerSecond: float | None = None
    tokensPerSecond: float | None = Field(default=None, description="Output tokens per second, all replicas.")
    draftAcceptanceRate: float | None = Field(default=None, description=(
        "A plan with a draft: accepted over drafted tokens in the window, all replicas (the engines' counters); "
        "compare plan.speculative.minAcceptanceRate."))
    draftedTokensPerSecond: float | None = Field(default=None, description="Drafted tokens per second, all replicas.")
    window: str | None = Field(default=None, description="The window the figures cover (e.g. 5m).")
    source: str | None = Field(default=None, description="prometheus or pods (a direct scrape of /metrics).")
    sampledAt: str | None = Field(default=None, description="When (RFC 3339).")


class Correction(ApiModel):
    """Observed over estimated latency of one variant on one hardware shape, which the planner applies."""

    variant: str = Field(description="model/quantization.")
    hardware: str = Field(description="As the plan names it, e.g. 1x NVIDIA-L4.")
    ttftFactor: float
    tpotFactor: float
    samples: int = Field(description="What the factors were measured over: requests (vLLM) or output tokens "
                         "(llama.cpp, which counts no requests).")
    updatedAt: str = Field(description="When last measured (RFC 3339); forgotten after the correction TTL.")


class SLOState(ApiModel):
    """The SLO loop's memory across passes and restarts: when a breach or calm began, what it last did."""

    replicas: int | None = Field(default=None, description=(
        "Replicas the loop scaled to (between spec.replicas and spec.maxReplicas); null: spec.replicas."))
    breachedSince: str | None = Field(default=None, description="When the current breach began (RFC 3339).")
    overloadedSince: str | None = Field(default=None, description="When load above the plan began.")
    calmSince: str | None = Field(default=None, description="When the current calm (SLO met, load low) began.")
    lastAction: str | None = Field(default=None, description="ScaledOut, ScaledIn, Replanned or DraftOff.")
    lastActionAt: str | None = Field(default=None, description="When (RFC 3339); the cooldown counts from it.")
    draftUnpaidSince: str | None = Field(default=None, description=(
        "When the draft in force stopped paying (acceptance below plan.speculative.minAcceptanceRate, or more "
        "requests per replica than plan.speculative.paysUpToConcurrency with none to add)."))
    draftsOff: str | None = Field(default=None, description=(
        "Why the loop turned drafts off (spec.speculative.mode Auto): the planner tries no draft until it expires."))
    draftsOffAt: str | None = Field(default=None, description=(
        "When (RFC 3339); drafts may be planned again after the correction TTL (run --correction-ttl)."))


class AdapterStatus(ApiModel):
    """One of spec.adapters as served: whether requests can use it yet, and how they pick it."""

    name: str = Field(description="As in spec.adapters.")
    source: str = Field(description="As in spec.adapters.")
    state: Literal["Pending", "Loading", "Ready"] = Field(description=(
        "Pending: no plan runs it (none yet, or no feasible plan); Loading: the Deployment running the plan in "
        "force is not yet available (rolling out, fetching, loading the adapter); Ready: the plan in force serves "
        "it and every pod serving is of that plan, with at least one ready."))
    call: str | None = Field(default=None, description=(
        "How a request uses it. vLLM: the adapter's name as the OpenAI `model`. llama.cpp routes no model names: "
        "one adapter applies to every request (`model` is the deployment's name); several are loaded without "
        "being applied and a request picks one by its index in spec.adapters, `\"lora\": [{\"id\": i, "
        "\"scale\": 1.0}]`. Null while Pending."))


class LlamaDeploymentStatus(ApiModel):
    phase: Literal[tuple(PHASES)] | None = None  # type: ignore[valid-type]
    message: str | None = Field(default=None, description="One line on the current state.")
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    plan: ChosenPlan | None = Field(default=None, description="What runs, with its predictions.")
    variant: str | None = Field(default=None, description="model/quantization in force (printer column).")
    runtime: str | None = None
    fallback: FallbackStatus | None = None
    rejected: list[RejectedCandidate] = Field(default_factory=list, description="Candidates better than the chosen "
                                              "one that were rejected, with why (the first 20).")
    notes: list[str] = Field(default_factory=list, description=(
        "What the planner noticed about the cluster: nodes the placement excluded, GPU products the catalog "
        "lacks (planned from their GFD labels with the slowest catalog speeds)."))
    replicas: int | None = None
    readyReplicas: int | None = None
    ready: str | None = Field(default=None, description="Ready replicas out of desired, e.g. 1/2 (printer column).")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible API.")
    adapters: list[AdapterStatus] | None = Field(default=None, max_length=MAX_ADAPTERS, description=(
        "The LoRA adapters of spec.adapters, in its order: their state and how a request uses each. Null without "
        "adapters."))
    adapterCount: int | None = Field(default=None, description=(
        "How many LoRA adapters are served beside the base model, as status.adapters lists them (printer column); "
        "null without adapters."))
    pendingChange: PendingChange | None = Field(
        default=None, description="A better plan the operator will move to once the capacity behind it has been "
        "stable for the upgrade delay.")
    observed: Observed | None = Field(default=None, description="What the SLO loop last saw (docs/slo-loop.md).")
    corrections: list[Correction] = Field(default_factory=list, max_length=64, description=(
        "Observed over estimated latency per variant and hardware, from sustained breaches; the planner multiplies "
        "its estimates by them."))
    slo: SLOState | None = Field(default=None, description="The SLO loop's timers and last action.")
