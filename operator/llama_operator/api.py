"""The LlamaDeployment API: spec and status models, the one source of truth for the CRD.

`llama-operator crd` turns these models into crds/llamadeployments.yaml (structural schema with
descriptions, defaults, enums, CEL rules). The operator and the CLI parse user objects with the same
models, so what the API server admits and what the operator accepts cannot drift apart.
"""
from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .catalog import load_catalog, model_ids

GROUP = "llama-operator.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LlamaDeployment"
PLURAL = "llamadeployments"
SINGULAR = "llamadeployment"
SHORT_NAMES = ["llamad"]

VLLM_QUANTIZATIONS = ["bf16", "fp8", "awq-int4", "gptq-int4"]
GGUF_QUANTIZATIONS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]
QUANTIZATIONS = VLLM_QUANTIZATIONS + GGUF_QUANTIZATIONS
PHASES = ["Pending", "Deploying", "Ready", "Degraded", "Unschedulable", "Invalid"]

# --- Durations and quantities -------------------------------------------------------------------------

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}

QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_QUANTITY_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


@functools.lru_cache(maxsize=4096)  # the planner asks for a spec's SLO once per candidate
def parse_duration(text: str) -> float:
    """'500ms' -> 0.5, '1.5s' -> 1.5, '1m30s' -> 90.0 (Go-style, the units ms, s and m)."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration: write a number with a unit, e.g. 500ms, 1.5s or 2m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


@functools.lru_cache(maxsize=4096)  # the planner asks for a spec's memory budget once per candidate
def parse_quantity(value: str | int) -> int:
    """A Kubernetes quantity of bytes: '48Gi' -> 51539607552, '80G' -> 80e9, 1024 -> 1024."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a quantity: write bytes with a suffix, e.g. 48Gi or 80G")
    m = re.fullmatch(QUANTITY_PATTERN, value)
    if not m:
        raise ValueError(f"{value!r} is not a quantity: write bytes with a suffix, e.g. 48Gi or 80G")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as e:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{value!r} is not a quantity") from e
    return int(number * _QUANTITY_SUFFIX[m.group(3) or ""])


def format_bytes(n: float) -> str:
    """Bytes for people: GiB with one decimal above 1 GiB, MiB below."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f}ms" if s >= 0.01 else f"{s * 1000:.1f}ms"
    return f"{s:.2f}s"


Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- Spec ---------------------------------------------------------------------------------------------


class SLO(_Model):
    """The latency the deployment must meet, at the load one replica is expected to carry."""

    ttftP95: Duration = Field(
        description="95th percentile time to first token the deployment must meet, as a duration (e.g. 500ms, 2s), "
        "for a prompt of promptTokens tokens at the given concurrency.",
    )
    tpotP95: Duration = Field(
        description="95th percentile time per output token (inter-token latency) the deployment must meet, as a "
        "duration (e.g. 50ms).",
    )
    promptTokens: int = Field(
        default=512, ge=1, le=131072,
        description="Prompt length, in tokens, the time-to-first-token target refers to.",
    )
    concurrency: int = Field(
        default=1, ge=1, le=1024,
        description="Requests one replica serves at the same time; the KV cache is sized for contextLength x "
        "concurrency and time per output token is predicted at this batch size.",
    )

    @field_validator("ttftP95", "tpotP95")
    @classmethod
    def _positive(cls, v: str) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than zero, e.g. 500ms")
        return v

    @property
    def ttft_seconds(self) -> float:
        return parse_duration(self.ttftP95)

    @property
    def tpot_seconds(self) -> float:
        return parse_duration(self.tpotP95)


class Fallback(_Model):
    """What the operator may do when the cluster cannot run the requested model as asked."""

    allowQuantization: bool = Field(
        default=True, description="Allow quantized variants (FP8, INT4, GGUF k-quants) of a model.")
    allowSmallerModels: bool = Field(
        default=True, description="Allow a smaller model of the same capability (a vision model falls back only to a "
        "vision model), never below minimumModel.")
    minimumModel: Literal[tuple(model_ids())] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="The smallest model the deployment may fall back to (a catalog id). Defaults to the smallest model "
        "of the requested model's capability.")
    quantizations: list[Literal[tuple(QUANTIZATIONS)]] | None = Field(  # type: ignore[valid-type]
        default=None, max_length=len(QUANTIZATIONS),
        description="Quantizations the operator may choose. Defaults to every quantization of 4 bits or more "
        "(q3_k_m and q2_k only when listed here).")
    allowCPU: bool = Field(
        default=True, description="Allow llama.cpp on CPU nodes when that meets the SLO.")
    allowKVCacheQuantization: bool = Field(
        default=True, description="Allow an 8-bit KV cache (vLLM --kv-cache-dtype fp8, llama.cpp q8_0) when the cache "
        "of a long context is what does not fit; tried before a smaller model.")


class Toleration(_Model):
    key: str | None = Field(default=None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value the toleration matches (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects.")
    tolerationSeconds: int | None = Field(default=None, description="For NoExecute: how long the pod stays bound.")


class Placement(_Model):
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="Labels a node must have to run a replica (as a pod's nodeSelector).")
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Extra tolerations for the model server pods. The operator adds the "
        "nvidia.com/gpu and amd.com/gpu NoSchedule tolerations on GPU pods by itself.")
    gpuProducts: list[str] = Field(
        default_factory=list, description="GPU products allowed, as GPU Feature Discovery names them in "
        "nvidia.com/gpu.product (e.g. NVIDIA-L4, NVIDIA-H100-80GB-HBM3) or their catalog aliases (L4, H100). "
        "Empty allows all.")


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, description="Name of a Secret in the LlamaDeployment's namespace.")
    key: str = Field(default="HF_TOKEN", min_length=1, description="Key in the Secret holding the token.")


class ModelCache(_Model):
    size: StrictStr | StrictInt | None = Field(
        default=None, description="Size of a PersistentVolumeClaim the operator creates for the model cache "
        "(e.g. 200Gi). Without size and existingClaim the cache is an emptyDir.",
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
    storageClassName: str | None = Field(default=None, description="Storage class of the created claim.")
    existingClaim: str | None = Field(default=None, description="Use this existing claim instead of creating one.")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and parse_quantity(v) <= 0:
            raise ValueError("must be larger than zero, e.g. 200Gi")
        return v


class ModelSource(_Model):
    hfTokenSecretRef: SecretKeyRef | None = Field(
        default=None, description="Secret holding a Hugging Face token (gated Llama repositories need one). The "
        "operator only references it in the pod spec; it never reads it.")
    cache: ModelCache = Field(default_factory=ModelCache, description="Where downloaded weights are kept.")


class LlamaDeploymentSpec(_Model):
    model: Literal[tuple(model_ids())] = Field(  # type: ignore[valid-type]
        description="The Llama model to serve, by catalog id (e.g. llama-3.1-8b-instruct, "
        "llama-3.2-11b-vision-instruct).")
    slo: SLO = Field(description="The latency service-level objective.")
    memoryBudget: StrictStr | StrictInt = Field(
        description="Accelerator memory one replica may use in total, summed over its GPUs (RAM on CPU), as a "
        "Kubernetes quantity (e.g. 48Gi).",
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
    contextLength: int = Field(
        default=8192, ge=256, le=131072,
        description="Longest sequence (prompt plus answer) in tokens; vLLM --max-model-len, llama.cpp --ctx-size per "
        "slot.")
    replicas: int = Field(default=1, ge=1, le=1000, description="Model server replicas.")
    runtime: Literal["auto", "vllm", "llamacpp"] = Field(
        default="auto", description="auto lets the planner choose; vllm or llamacpp pins the runtime.")
    fallback: Fallback = Field(default_factory=Fallback, description="What the operator may do when the hardware falls "
                               "short.")
    placement: Placement = Field(default_factory=Placement, description="Where replicas may run.")
    source: ModelSource = Field(default_factory=ModelSource, description="Where weights come from and are cached.")

    @field_validator("memoryBudget")
    @classmethod
    def _budget(cls, v):
        if parse_quantity(v) <= 0:
            raise ValueError("must be larger than zero, e.g. 48Gi")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "LlamaDeploymentSpec":
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def memory_budget_bytes(self) -> int:
        return parse_quantity(self.memoryBudget)


def _model_sizes() -> dict[str, float]:
    return {m.id: m.published_parameters for m in load_catalog().models.values()}


def _capabilities() -> dict[str, str]:
    return {m.id: m.capability for m in load_catalog().models.values()}


def cross_field_problems(spec: LlamaDeploymentSpec) -> list[str]:
    """Checks across fields, each message naming the field and the fix. Mirrored by the CRD's CEL rules."""
    catalog = load_catalog()
    model = catalog.model(spec.model)
    problems = []
    if spec.runtime == "llamacpp" and model.gguf is None:
        problems.append(f"spec.runtime: llama.cpp does not serve {spec.model} (no GGUF build of a vision model); "
                        "use runtime vllm or auto")
    floor = spec.fallback.minimumModel
    if floor is not None:
        if _capabilities()[floor] != model.capability:
            problems.append(f"spec.fallback.minimumModel: {floor} is a {_capabilities()[floor]} model but {spec.model} is a "
                            f"{model.capability} model; pick a {model.capability} model as the floor")
        elif _model_sizes()[floor] > _model_sizes()[spec.model]:
            problems.append(f"spec.fallback.minimumModel: {floor} is larger than the requested model {spec.model}; "
                            "the floor must be the same size or smaller")
    if spec.slo.promptTokens >= spec.contextLength:
        problems.append(f"spec.slo.promptTokens: {spec.slo.promptTokens} does not leave room to answer in contextLength "
                        f"{spec.contextLength}; lower promptTokens or raise contextLength")
    if spec.contextLength > model.arch.max_context:
        problems.append(f"spec.contextLength: {spec.contextLength} exceeds {spec.model}'s maximum of "
                        f"{model.arch.max_context} tokens")
    allowed = spec.fallback.quantizations
    if allowed is not None:
        if not allowed:
            problems.append("spec.fallback.quantizations: the list is empty, so nothing could run; list at least one "
                            "quantization or leave the field out")
        runtimes = {"vllm": VLLM_QUANTIZATIONS, "llamacpp": GGUF_QUANTIZATIONS}
        if spec.runtime in runtimes and allowed and not set(allowed) & set(runtimes[spec.runtime]):
            problems.append(f"spec.fallback.quantizations: none of {', '.join(allowed)} can be served by {spec.runtime} "
                            f"(it serves {', '.join(runtimes[spec.runtime])})")
        servable = set(model.variants())
        if allowed and not set(allowed) & servable:
            problems.append(f"spec.fallback.quantizations: {spec.model} is not published in any of {', '.join(allowed)}")
    return problems


# --- Status -------------------------------------------------------------------------------------------


class Condition(_Model):
    type: str = Field(description="Ready, PlanFeasible, FallbackApplied or Progressing.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="What a person can act on.")
    lastTransitionTime: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = None


class Predicted(_Model):
    memoryBytes: int = Field(description="Memory one replica needs (weights, KV cache, runtime overhead).")
    perGpuBytes: int | None = Field(default=None, description="Memory needed on each GPU (null on CPU).")
    ttftSeconds: float = Field(description="Predicted p95 time to first token.")
    tpotSeconds: float = Field(description="Predicted time per output token.")


class ChosenPlan(_Model):
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


class RejectedCandidate(_Model):
    model: str
    quantization: str
    runtime: str
    hardware: str
    reasons: list[str]


class FallbackStatus(_Model):
    inForce: bool = False
    requestedModel: str | None = None
    reason: str = ""


class PendingChange(_Model):
    plan: ChosenPlan = Field(description="The better plan waiting for the cluster to stay stable.")
    since: str = Field(description="When this plan was first proposed (RFC 3339).")
    reason: str = ""


class LlamaDeploymentStatus(_Model):
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


# --- Parsing user objects --------------------------------------------------------------------------------


class SpecError(ValueError):
    """A LlamaDeployment that cannot be served as written; `problems` name each field and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _error_path(loc: tuple) -> str:
    """pydantic's error location as the manifest path a person edits: spec.slo.ttftP95, spec.x[0].y.

    pydantic inserts the member tried in a union ('str', 'int', 'literal[...]', 'function-after[...]')
    into locations; those are not fields and are dropped.
    """
    path = "spec"
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item) and item not in _UNION_TAGS:
            path += f".{item}"
    return path


def _explain(error: dict) -> str:
    path = _error_path(error["loc"])
    kind = error["type"]
    given = error.get("input")
    if kind == "missing":
        return f"{path}: required; add it"
    if kind == "extra_forbidden":
        return f"{path}: unknown field; remove it or check its spelling"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: {given!r} is not one of {expected}"
    if kind == "string_pattern_mismatch" and path.endswith(("ttftP95", "tpotP95")):
        return f"{path}: {given!r} is not a duration; write a number with a unit, e.g. 500ms, 1.5s or 2m"
    if kind == "string_pattern_mismatch":
        return f"{path}: {given!r} is not a quantity; write bytes with a suffix, e.g. 48Gi or 80G"
    if kind == "value_error":
        msg = error["msg"].removeprefix("Value error, ")
        return msg if path == "spec" else f"{path}: {msg}"  # cross-field messages name their fields
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]} (got {given!r})"


def parse_spec(spec: Any) -> LlamaDeploymentSpec:
    """Parse a LlamaDeployment's spec, or raise SpecError with one message per problem."""
    if not isinstance(spec, dict) or not spec:
        raise SpecError(["spec: empty; a LlamaDeployment needs at least model, slo and memoryBudget"])
    try:
        return LlamaDeploymentSpec.model_validate(spec)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            for msg in _explain(err).split("\n"):
                if msg not in problems:
                    problems.append(msg)
        raise SpecError(problems) from None


def parse_object(obj: Any) -> LlamaDeploymentSpec:
    """Parse a whole LlamaDeployment manifest (apiVersion/kind checked)."""
    if not isinstance(obj, dict):
        raise SpecError(["the document is not a mapping; expected a LlamaDeployment manifest"])
    if obj.get("kind") != KIND or obj.get("apiVersion") != API_VERSION:
        raise SpecError([f"kind/apiVersion: expected kind {KIND} and apiVersion {API_VERSION}, got "
                         f"{obj.get('kind')!r} and {obj.get('apiVersion')!r}"])
    return parse_spec(obj.get("spec"))
