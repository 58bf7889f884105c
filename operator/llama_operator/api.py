"""The LlamaDeployment API: its group, version and kind, the spec models, and parsing a user's object.

The models here (the spec) and in status.py are the one source of truth for the CRD: `llama-operator
crd` turns them into crds/llamadeployments.yaml (structural schema with descriptions, defaults, enums,
CEL rules). The operator and the CLI parse user objects with the same models, so what the API server
admits and what the operator accepts cannot drift apart.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
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
from .engines import lora_refusal, release_for
from .finetune import MAX_ADAPTERS, Adapter, CustomWeights, finetune_problems, name_clash_problems
from .speculation import Speculative, speculative_problems
from .fields import (LABEL_VALUE_PATTERN, MAX_GPU_PRODUCTS, MAX_LABEL_KEY_LENGTH, MAX_LABEL_VALUE_LENGTH,
                     MAX_TOLERATIONS, QUALIFIED_NAME_PATTERN, QUALIFIED_PREFIX_CEL, ApiModel, LabelMap, LabelValue,
                     SecretKey, checked_by, label_key_problem, label_value_problem, name_problems, object_name)
from .units import (DURATION_PATTERN, MAX_DURATION_LENGTH, MAX_QUANTITY_BYTES, MAX_QUANTITY_LENGTH,
                    QUANTITY_PATTERN, parse_duration, parse_quantity, shown)

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

# --- Durations and quantities -------------------------------------------------------------------------

Duration = Annotated[str, StringConstraints(max_length=MAX_DURATION_LENGTH, pattern=DURATION_PATTERN)]


# --- Spec ---------------------------------------------------------------------------------------------


class SLO(ApiModel):
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
        "concurrency, time per output token is predicted at this batch size, and time to first token for this "
        "many prompts arriving together (vLLM prefills them as one batch).",
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


class Fallback(ApiModel):
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


class Toleration(ApiModel):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || size(self.value) == 0",
         "message": "value must be empty when operator is Exists", "fieldPath": ".value",
         "reason": "FieldValueInvalid"},
        {"rule": "(has(self.key) && size(self.key) > 0) || (has(self.operator) && self.operator == 'Exists')",
         "message": "operator must be Exists when key is empty (a toleration of every taint)",
         "fieldPath": ".operator", "reason": "FieldValueInvalid"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "tolerationSeconds is only for effect NoExecute", "fieldPath": ".effect",
         "reason": "FieldValueInvalid"},
    ]})

    key: Annotated[str, StringConstraints(max_length=MAX_LABEL_KEY_LENGTH),
                   checked_by(lambda v: label_key_problem(v) if v else None),
                   Field(json_schema_extra={"pattern": f"^({QUALIFIED_NAME_PATTERN[1:-1]})?$",
                                            "x-kubernetes-validations": [{
                                                "rule": QUALIFIED_PREFIX_CEL,
                                                "message": "the prefix of a key (before '/') has at most 253 "
                                                           "characters",
                                                "reason": "FieldValueInvalid"}]})] | None = Field(
        default=None, description="Taint key the toleration applies to; empty matches all keys (with operator "
        "Exists).")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: LabelValue | None = Field(
        default=None, description="Taint value the toleration matches (operator Equal; empty with Exists).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects.")
    tolerationSeconds: int | None = Field(default=None, ge=0, le=MAX_QUANTITY_BYTES,
                                          description="For NoExecute: how long the pod stays bound.")

    @model_validator(mode="after")
    def _as_kubernetes_checks_it(self) -> "Toleration":
        # The Pod's own validation (ValidateTolerations), mirrored by the CEL rules above. Messages starting
        # with '.' name a field of the toleration (see _explain).
        problems = []
        if self.operator == "Exists" and self.value:
            problems.append(".value: must be empty when operator is Exists; remove value or use operator Equal")
        if not self.key and self.operator != "Exists":
            problems.append(".operator: must be Exists when key is empty (a toleration of every taint); "
                            "set key or operator Exists")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            problems.append(".effect: tolerationSeconds is only for effect NoExecute; set effect NoExecute or "
                            "remove tolerationSeconds")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class Placement(ApiModel):
    nodeSelector: LabelMap = Field(
        default_factory=dict, description="Labels a node must have to run a replica (as a pod's nodeSelector).")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=MAX_TOLERATIONS,
        description="Extra tolerations for the model server pods. The operator adds the nvidia.com/gpu and "
        "amd.com/gpu NoSchedule tolerations on GPU pods by itself.")
    gpuProducts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_VALUE_LENGTH),
                                checked_by(label_value_problem),
                                Field(json_schema_extra={"pattern": LABEL_VALUE_PATTERN})]] = Field(
        default_factory=list, max_length=MAX_GPU_PRODUCTS,
        description="GPU products allowed, as GPU Feature Discovery names them in "
        "nvidia.com/gpu.product (e.g. NVIDIA-L4, NVIDIA-H100-80GB-HBM3) or their catalog aliases (L4, H100). "
        "Empty allows all.")


class SecretKeyRef(ApiModel):
    name: object_name("Secret name", "hf-token") = Field(  # type: ignore[valid-type]
        description="Name of a Secret in the LlamaDeployment's namespace.")
    key: SecretKey = Field(default="HF_TOKEN", description="Key in the Secret holding the token.")


class ModelCache(ApiModel):
    size: StrictStr | StrictInt | None = Field(
        default=None, description="Size of a PersistentVolumeClaim the operator creates for the model cache "
        "(e.g. 200Gi). Without size and existingClaim the cache is an emptyDir.",
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
                           "maxLength": MAX_QUANTITY_LENGTH, "maximum": MAX_QUANTITY_BYTES})
    storageClassName: object_name("StorageClass name", "fast-ssd", optional=True) | None = Field(  # type: ignore
        default=None, description="Storage class of the created claim (empty: the cluster's default).")
    existingClaim: object_name("claim name", "shared-models", optional=True) | None = Field(  # type: ignore
        default=None, description="Use this existing claim (in the LlamaDeployment's namespace) instead of "
        "creating one.")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and parse_quantity(v) <= 0:
            raise ValueError("must be larger than zero, e.g. 200Gi")
        return v


class ModelSource(ApiModel):
    hfTokenSecretRef: SecretKeyRef | None = Field(
        default=None, description="Secret holding a Hugging Face token (gated Llama repositories need one). The "
        "operator only references it in the pod spec; it never reads it.")
    cache: ModelCache = Field(default_factory=ModelCache, description="Where downloaded weights are kept.")


class ApiKeySecretRef(SecretKeyRef):
    key: SecretKey = Field(default="API_KEY", description="Key in the Secret holding the API key.")


class AllowedClient(ApiModel):
    podLabels: LabelMap = Field(
        default_factory=dict, description="Labels a client pod must all carry; empty matches every pod of the "
        "namespaces below.")
    namespaceLabels: LabelMap | None = Field(
        default=None, description="Labels of the namespaces the client pods may run in ({} for every namespace; "
        "kubernetes.io/metadata.name: NAME for one by name). Unset: the LlamaDeployment's own namespace only.")


class Access(ApiModel):
    """Who may call the model server. Both are off by default: any pod that reaches the Service may call it."""

    apiKeySecretRef: ApiKeySecretRef | None = Field(
        default=None, description="Secret holding the API key the OpenAI endpoint requires (Authorization: Bearer "
        "KEY), given to the server as an environment variable (vLLM VLLM_API_KEY, llama.cpp LLAMA_API_KEY). With "
        "llama.cpp /metrics needs the key too. The operator only references the Secret; it never reads it.")
    allowedClients: list[AllowedClient] | None = Field(
        default=None, min_length=1, max_length=32,
        description="When set, a NetworkPolicy admits to the server port (the API, /health and /metrics) only pods "
        "matching one of these; include your Prometheus to keep the metrics scrape. Unset: no NetworkPolicy.")


class LlamaDeploymentSpec(ApiModel):
    model: Literal[tuple(model_ids())] = Field(  # type: ignore[valid-type]
        description="The Llama model to serve, by catalog id (e.g. llama-3.1-8b-instruct, "
        "llama-3.2-11b-vision-instruct).")
    slo: SLO = Field(description="The latency service-level objective.")
    memoryBudget: StrictStr | StrictInt = Field(
        description="Accelerator memory one replica may use in total, summed over its GPUs (RAM on CPU), as a "
        "Kubernetes quantity (e.g. 48Gi).",
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
                           "maxLength": MAX_QUANTITY_LENGTH, "maximum": MAX_QUANTITY_BYTES})
    contextLength: int = Field(
        default=8192, ge=256, le=131072,
        description="Longest sequence (prompt plus answer) in tokens; vLLM --max-model-len, llama.cpp --ctx-size per "
        "slot.")
    replicas: int = Field(default=1, ge=1, le=1000, description=(
        "Model server replicas; the floor the SLO loop scales in to."))
    maxReplicas: int | None = Field(default=None, ge=1, le=1000, description=(
        "Replicas the SLO loop may scale out to while the load stays above what one replica was planned for "
        "(slo.concurrency); unset: replicas, no scaling. docs/slo-loop.md."))
    sloPolicy: Literal["enforce", "observe"] = Field(default="enforce", description=(
        "enforce: on a sustained breach the operator scales out, or re-plans with the latency it observed; "
        "observe: it only reports (status.observed, the SLOMet condition, Events, metrics)."))
    runtime: Literal["auto", "vllm", "llamacpp"] = Field(
        default="auto", description="auto lets the planner choose; vllm or llamacpp pins the runtime.")
    fallback: Fallback = Field(default_factory=Fallback, description="What the operator may do when the hardware falls "
                               "short.")
    placement: Placement = Field(default_factory=Placement, description="Where replicas may run.")
    source: ModelSource = Field(default_factory=ModelSource, description="Where weights come from and are cached.")
    access: Access = Field(default_factory=Access, description="Who may call the model server: an API key and a "
                           "NetworkPolicy, both off by default.")
    adapters: list[Adapter] = Field(default_factory=list, max_length=MAX_ADAPTERS, description=(
        "LoRA adapters of the model, each served under its own name beside the base model. They pin the model: "
        "the fallback ladder keeps it (quantized where the runtime takes adapters on a quantized base) and never "
        "moves to a smaller one. docs/adapters.md."))
    weights: CustomWeights | None = Field(default=None, description=(
        "A full fine-tune of the model to serve instead of Meta's weights: same architecture, other weights. It "
        "pins the model, and its quantized rungs are vLLM's in-flight FP8 and the GGUF file given. docs/adapters.md."))
    speculative: Speculative = Field(default_factory=Speculative, description=(
        "Speculative decoding: a smaller model of the same tokenizer drafts tokens the model verifies, which lowers "
        "time per output token at low concurrency without changing the answers. docs/speculative.md."))

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

    @property
    def max_replicas(self) -> int:
        """The ceiling of the SLO loop's scaling (spec.replicas when maxReplicas is unset)."""
        return max(self.replicas, self.maxReplicas or self.replicas)


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
    if spec.maxReplicas is not None and spec.maxReplicas < spec.replicas:
        problems.append(f"spec.maxReplicas: {spec.maxReplicas} is below replicas {spec.replicas}; raise maxReplicas "
                        "or leave it out (replicas is the floor the SLO loop scales from)")
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
        if allowed and not set(allowed) & servable and spec.weights is None:
            problems.append(f"spec.fallback.quantizations: {spec.model} is not published in any of {', '.join(allowed)}")
    vllm = release_for(model, "vllm")
    ranks = vllm.lora.rank_choices if vllm is not None and vllm.lora is not None else ()
    problems += finetune_problems(spec, gguf_quantizations=GGUF_QUANTIZATIONS, vision=model.gguf is None,
                                  lora_refusal=lora_refusal(model), vllm_ranks=ranks,
                                  vllm_title=vllm.title if vllm is not None else "vLLM")
    problems += speculative_problems(spec)
    return problems


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
        elif len(item) <= MAX_LABEL_VALUE_LENGTH and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item) \
                and item not in _UNION_TAGS:  # (a map's key the user wrote may be anything: left out)
            path += f".{item}"
    return path


def _explain(error: dict) -> str:
    path = _error_path(error["loc"])
    kind = error["type"]
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return f"{path}: required; add it"
    if kind == "extra_forbidden":
        return f"{path}: unknown field; remove it or check its spelling"
    if kind == "literal_error":
        return f"{path}: {shown(given)} is not one of {ctx.get('expected', '')}"
    if kind == "string_too_short" and given == "":
        return f"{path}: empty; it needs at least 1 character"
    if kind == "string_too_long":
        return f"{path}: {len(given)} characters, more than the {ctx.get('max_length')} allowed"
    if kind == "too_long":
        return f"{path}: {ctx.get('actual_length')} items, more than the {ctx.get('max_length')} allowed"
    if kind == "string_pattern_mismatch" and path.endswith(("ttftP95", "tpotP95")):
        return f"{path}: {shown(given)} is not a duration; write a number with a unit, e.g. 500ms, 1.5s or 2m"
    if kind == "string_pattern_mismatch":
        return f"{path}: {shown(given)} does not match {ctx.get('pattern')}"
    if kind == "value_error":
        msg = error["msg"].removeprefix("Value error, ")
        if path == "spec":
            return msg  # cross-field messages name their fields
        # A model's own check names its fields relative to it: ".value: must be empty ..."
        return "\n".join(f"{path}{line}" if line.startswith(".") else f"{path}: {line}" for line in msg.split("\n"))
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]} (got {shown(given)})"


#: A refusal lists at most this many problems (a spec with a thousand bad entries is one mistake repeated).
MAX_PROBLEMS = 20

_NO_NAME = object()


def parse_spec(spec: Any, name: Any = _NO_NAME) -> LlamaDeploymentSpec:
    """Parse a LlamaDeployment's spec, or raise SpecError with one message per problem. With `name`, its
    metadata.name is checked too (name_problems), and that no adapter takes it (the base model's name)."""
    problems = name_problems(name) if name is not _NO_NAME else []
    if not isinstance(spec, dict) or not spec:
        raise SpecError(problems + ["spec: empty; a LlamaDeployment needs at least model, slo and memoryBudget"])
    try:
        parsed = LlamaDeploymentSpec.model_validate(spec)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            for msg in _explain(err).split("\n"):
                if msg not in problems:
                    problems.append(msg)
        parsed = None
    if parsed is not None and isinstance(name, str):
        problems += name_clash_problems(parsed, name)
    if problems:
        if len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise SpecError(problems)
    return parsed


def parse_object(obj: Any) -> LlamaDeploymentSpec:
    """Parse a whole LlamaDeployment manifest (apiVersion/kind checked, and metadata.name when it has one)."""
    if not isinstance(obj, dict):
        raise SpecError(["the document is not a mapping; expected a LlamaDeployment manifest"])
    if obj.get("kind") != KIND or obj.get("apiVersion") != API_VERSION:
        raise SpecError([f"kind/apiVersion: expected kind {KIND} and apiVersion {API_VERSION}, got "
                         f"{shown(obj.get('kind'))} and {shown(obj.get('apiVersion'))}"])
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "name" in meta:
        return parse_spec(obj.get("spec"), meta["name"])
    return parse_spec(obj.get("spec"))
