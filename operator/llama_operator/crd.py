"""The CustomResourceDefinition, generated from the pydantic models in api.py (spec) and status.py.

pydantic's JSON Schema is close to what Kubernetes wants but not the same: Kubernetes needs a
*structural* schema (no $ref, no nullable unions, types everywhere), marks int-or-string fields with
`x-kubernetes-int-or-string`, and checks cross-field rules written in CEL. This module does that
translation and adds the CEL rules that mirror api.cross_field_problems.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from . import api
from .catalog import load_catalog
from .engines import releases
from .fields import DNS1035_LABEL_PATTERN, MAX_NAME_LENGTH
from .status import LlamaDeploymentStatus
from .speculation import speculative_rules

_DROP_KEYS = {"title"}
#: Marks, between _inline and _default_empty_objects, a field whose model default is None.
_UNSET_BY_DEFAULT = "x-llama-operator-unset-by-default"


def _inline(schema: dict, defs: dict) -> Any:
    """Resolve $ref, drop nullable unions and titles, recursively."""
    if isinstance(schema, list):
        return [_inline(s, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        target.update(extra)
        return _inline(target, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        out[key] = _inline(value, defs)
    if "anyOf" in out:
        members = [m for m in out["anyOf"] if m.get("type") != "null"]
        types = sorted(m.get("type") for m in members if "type" in m)
        if out.get("x-kubernetes-int-or-string") or types == ["integer", "string"]:
            # int-or-string: Kubernetes' own convention, as for resource quantities. The members' bounds move
            # up beside it: pattern and maxLength apply to a string, maximum to an integer.
            out.pop("anyOf")
            for key in ("pattern", "maxLength", "maximum"):
                value = out.pop(key, None)
                if value is None:
                    value = next((m[key] for m in members if key in m), None)
                if value is not None:
                    out[key] = value
            out["x-kubernetes-int-or-string"] = True
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        elif len(members) == 1:
            out.pop("anyOf")
            merged = dict(members[0])
            merged.update(out)
            out = merged
        else:
            out["anyOf"] = members
    if out.get("additionalProperties") is False:
        # Structural schemas forbid additionalProperties beside properties; the API server prunes
        # unknown fields instead (and `kubectl apply --validate=strict` reports them).
        out.pop("additionalProperties")
    if out.get("default", "unset") is None:
        out.pop("default")
        out[_UNSET_BY_DEFAULT] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _default_empty_objects(schema: dict, fill: bool = True) -> None:
    """A field holding an object with no required fields defaults to {}, so the API server fills in the
    defaults inside it and `kubectl get -o yaml` shows what the operator will assume; not one whose absence
    means something (default None in the model, like spec.weights: unset is Meta's weights)."""
    for prop in schema.get("properties", {}).values():
        unset_by_default = prop.pop(_UNSET_BY_DEFAULT, False)
        if prop.get("type") == "object" and "properties" in prop:
            if fill and not unset_by_default and not prop.get("required") and "default" not in prop:
                prop["default"] = {}
            _default_empty_objects(prop, fill)
        elif prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            _default_empty_objects(prop["items"], fill)


def _schema_of(model: type, *, fill_defaults: bool) -> dict:
    raw = model.model_json_schema(mode="validation")
    schema = _inline(raw, raw.get("$defs", {}))
    _default_empty_objects(schema, fill_defaults)  # (and drops the _UNSET_BY_DEFAULT marks)
    return schema


def _cel_list(items) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def cel_rules() -> list[dict[str, str]]:
    """Cross-field rules the API server evaluates (the same checks as api.cross_field_problems)."""
    catalog = load_catalog()
    no_gguf = [m.id for m in catalog.models.values() if m.gguf is None]
    vision_models = _cel_list(m.id for m in catalog.models.values() if m.capability == "vision")
    sizes = "{" + ", ".join(f"'{m.id}': {int(m.published_parameters / 1e6)}" for m in catalog.models.values()) + "}"
    floor = "has(self.fallback) && has(self.fallback.minimumModel)"
    quants = "has(self.fallback) && has(self.fallback.quantizations)"
    return [*_base_rules(no_gguf, vision_models, sizes, floor, quants), *finetune_rules(vision_models),
            *speculative_rules()]


def finetune_rules(vision_models: str) -> list[dict[str, str]]:
    """The rules on spec.adapters and spec.weights that CEL can state (finetune.finetune_problems has them all:
    the API server refuses these at apply time, the operator the rest with a message naming the field)."""
    gguf = "matches('(?i)[.]gguf$')"
    adapters = "has(self.adapters) && size(self.adapters) > 0"
    vllm = next(r for r in releases() if r.engine == "vllm" and r.lora is not None)
    ranks = "[" + ", ".join(map(str, vllm.lora.rank_choices)) + "]"
    return [
        {
            "rule": "!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "message": "every adapter needs a name of its own",
            "fieldPath": ".adapters",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({adapters}) || !(self.model in {vision_models})",
            "message": "the vision models take no LoRA adapters (vLLM 0.10.2 refuses LoRA for Mllama)",
            "fieldPath": ".adapters",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({adapters}) || !has(self.runtime) || self.runtime != 'llamacpp' || "
                    f"self.adapters.all(a, a.source.{gguf})",
            "message": "llama.cpp loads GGUF adapters only: every adapter source must be a .gguf file",
            "fieldPath": ".runtime",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({adapters}) || (has(self.runtime) && self.runtime == 'llamacpp') || "
                    f"self.adapters.all(a, a.source.{gguf}) || self.adapters.all(a, !a.source.{gguf})",
            "message": "adapters must all be GGUF files (llama.cpp) or all PEFT directories (vLLM)",
            "fieldPath": ".adapters",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({adapters}) || (has(self.runtime) && self.runtime == 'llamacpp') || "
                    f"self.adapters.all(a, a.source.{gguf} || !has(a.rank) || a.rank in {ranks})",
            "message": f"vLLM accepts adapter ranks {', '.join(map(str, vllm.lora.rank_choices))} only",
            "fieldPath": ".adapters",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.weights) || has(self.weights.source) || has(self.weights.gguf)",
            "message": "weights needs source (for vLLM), gguf (for llama.cpp) or both",
            "fieldPath": ".weights",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.weights) || !has(self.runtime) || self.runtime != 'llamacpp' || has(self.weights.gguf)",
            "message": "llama.cpp serves a fine-tune from weights.gguf; set it or use runtime vllm or auto",
            "fieldPath": ".runtime",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.weights) || !has(self.runtime) || self.runtime != 'vllm' || has(self.weights.source)",
            "message": "vLLM serves a fine-tune from weights.source; set it or use runtime llamacpp or auto",
            "fieldPath": ".runtime",
            "reason": "FieldValueInvalid",
        },
    ]


def _base_rules(no_gguf: list[str], vision_models: str, sizes: str, floor: str, quants: str) -> list[dict[str, str]]:
    return [
        {
            "rule": f"!has(self.runtime) || self.runtime != 'llamacpp' || !(self.model in {_cel_list(no_gguf)})",
            "message": "llama.cpp does not serve the vision models; use runtime vllm or auto",
            "fieldPath": ".runtime",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({floor}) || (self.fallback.minimumModel in {vision_models}) == (self.model in {vision_models})",
            "message": "fallback.minimumModel must have the same capability (text or vision) as model",
            "fieldPath": ".fallback.minimumModel",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({floor}) || {sizes}[self.fallback.minimumModel] <= {sizes}[self.model]",
            "message": "fallback.minimumModel must not be larger than model",
            "fieldPath": ".fallback.minimumModel",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.slo.promptTokens) || self.slo.promptTokens < (has(self.contextLength) ? self.contextLength : 8192)",
            "message": "slo.promptTokens must be smaller than contextLength, to leave room for the answer",
            "fieldPath": ".slo.promptTokens",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.maxReplicas) || self.maxReplicas >= (has(self.replicas) ? self.replicas : 1)",
            "message": "maxReplicas must be at least replicas (replicas is the floor the SLO loop scales from)",
            "fieldPath": ".maxReplicas",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!has(self.runtime) || self.runtime != 'vllm' || !({quants}) || "
                    f"self.fallback.quantizations.exists(q, q in {_cel_list(api.VLLM_QUANTIZATIONS)})",
            "message": "fallback.quantizations has nothing vLLM serves (bf16, fp8, awq-int4, gptq-int4)",
            "fieldPath": ".fallback.quantizations",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!has(self.runtime) || self.runtime != 'llamacpp' || !({quants}) || "
                    f"self.fallback.quantizations.exists(q, q in {_cel_list(api.GGUF_QUANTIZATIONS)})",
            "message": "fallback.quantizations has nothing llama.cpp serves (the GGUF types f16 ... q2_k)",
            "fieldPath": ".fallback.quantizations",
            "reason": "FieldValueInvalid",
        },
    ]


def name_rules() -> list[dict[str, str]]:
    """CEL on metadata.name, at the root of the schema (the only place a rule may read it): the Service the
    operator renders is named like the LlamaDeployment, so the name must be a DNS-1035 label, which the API
    server does not ask of a custom resource's name (a DNS-1123 subdomain of up to 253 characters). The
    same holds the label value llama-operator.dev/llamadeployment and the claim NAME-model-cache to their
    limits. Mirrored by fields.name_problems."""
    return [{
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH} && "
                f"self.metadata.name.matches('{DNS1035_LABEL_PATTERN}')",
        "message": f"metadata.name names the Service the operator creates: at most {MAX_NAME_LENGTH} lowercase "
                   "letters, digits and '-', starting with a letter and ending with a letter or digit",
        "fieldPath": ".metadata.name",
        "reason": "FieldValueInvalid",
    }, {
        "rule": "!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != self.metadata.name)",
        "message": "an adapter may not take the LlamaDeployment's own name, which serves the base model",
        "fieldPath": ".spec.adapters",
        "reason": "FieldValueInvalid",
    }]


def openapi_schema() -> dict:
    spec = _schema_of(api.LlamaDeploymentSpec, fill_defaults=True)
    spec["description"] = ("A Llama model to serve, the latency it must meet and the memory one replica may use. "
                           "The operator picks the variant, runtime and GPUs, falling back when it must.")
    spec["x-kubernetes-validations"] = cel_rules()
    fallback = spec["properties"]["fallback"]["properties"]
    fallback["quantizations"]["minItems"] = 1
    status = _schema_of(LlamaDeploymentStatus, fill_defaults=False)
    status["description"] = "What the operator chose and why, and how the deployment is doing."
    return {
        "type": "object",
        "description": "LlamaDeployment serves a Llama model on the hardware the cluster has.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # A structural schema may say no more of metadata than name and generateName; name is declared
            # so that the root rule's fieldPath .metadata.name refers to a field of the schema.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
        "x-kubernetes-validations": name_rules(),
    }


def enum_problems(raw_spec: Any) -> list[str]:
    """Values of a LlamaDeployment's spec outside the enums the CRD declares (the API server would refuse
    them), field by field."""
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

    if isinstance(raw_spec, dict):
        walk(openapi_schema()["properties"]["spec"], raw_spec, "spec")
    return problems


def crd_manifest() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["llama"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
                        {"name": "Variant", "type": "string", "jsonPath": ".status.variant"},
                        {"name": "Runtime", "type": "string", "jsonPath": ".status.runtime"},
                        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                        {"name": "Adapters", "type": "integer", "jsonPath": ".status.adapterCount"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `llama-operator crd` from operator/llama_operator/api.py and status.py. Do not edit by hand.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
