"""The LlamaDeployment's status: what the operator chose and why, and how the deployment is doing.

Written by the operator only; the CRD's status schema is generated from these models (crd.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .fields import ApiModel

#: The phases of status.phase (the metrics carry a count of each, and the alert rules select on two).
PHASES = ["Pending", "Deploying", "Ready", "Degraded", "Unschedulable", "Invalid"]


class Condition(ApiModel):
    type: str = Field(description="Ready, PlanFeasible, FallbackApplied or Progressing.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="What a person can act on.")
    lastTransitionTime: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = None


class Predicted(ApiModel):
    memoryBytes: int = Field(description="Memory one replica needs (weights, KV cache, runtime overhead).")
    perGpuBytes: int | None = Field(default=None, description="Memory needed on each GPU (null on CPU).")
    ttftSeconds: float = Field(description="Predicted p95 time to first token.")
    tpotSeconds: float = Field(description="Predicted time per output token.")


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
    gpusPerReplica: int
    kvCacheDtype: str = Field(default="auto", description="auto (the model's dtype), fp8 or q8_0.")
    weightsSource: str = Field(default="", description="Where the weights come from (Hugging Face repo[/file]).")
    gpuMemoryUtilization: float | None = Field(default=None, description="vLLM --gpu-memory-utilization.")
    cpuThreads: int | None = Field(default=None, description="llama.cpp threads on a CPU node.")
    cpuMemoryBandwidthGbps: float | None = Field(
        default=None, description="Memory bandwidth of the CPU nodes planned on (GB/s); pods are pinned to them.")
    predicted: Predicted

    @property
    def variant(self) -> str:
        return f"{self.model}/{self.quantization}"

    def same_choice(self, other: "ChosenPlan | None") -> bool:
        """Whether two plans run the same thing (predictions aside)."""
        if other is None:
            return False
        keys = ("model", "quantization", "runtime", "gpuProduct", "gpusPerReplica", "kvCacheDtype", "cpuThreads",
                "cpuMemoryBandwidthGbps")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


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
    pendingChange: PendingChange | None = Field(
        default=None, description="A better plan the operator will move to once the capacity behind it has been "
        "stable for the upgrade delay.")
