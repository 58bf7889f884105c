"""Fine-tuned models in the API: LoRA adapters (`spec.adapters`) and custom weights (`spec.weights`), where
they come from (`hf://` or `pvc://` sources) and the rules a spec with them must follow (docs/adapters.md).

Both pin the base model: an adapter trained on Llama 3.1 8B does not apply to Llama 3.2 3B, and a full
fine-tune of one model is not the same fine-tune of another. The planner reads that from
`pins_base_model`; which runtime can load which adapter is `adapter_format`'s answer (vLLM: a PEFT
directory; llama.cpp: a GGUF file).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from .catalog import GPU, Model, Quantization, load_catalog
from .engines import in_flight_problem, kernel_for, release_for
from .fields import DNS1123_SUBDOMAIN_PATTERN, ApiModel
from .units import shown

#: The spec (api.LlamaDeploymentSpec, which is made of this module's models and so cannot be imported here).
LlamaDeploymentSpec = Any

#: Adapters one deployment may serve: each takes host memory (and llama.cpp loads every one at start).
MAX_ADAPTERS = 16
#: A source is a short URI; bounded like every string of the spec.
MAX_SOURCE_LENGTH = 512
#: An adapter's name is what clients send as `model`; vLLM reads `--lora-modules name=path` (an item with '='
#: and no ','), so the name holds neither: letters, digits, '-', '_', '.' as a label value.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
DEFAULT_RANK = 16
MAX_RANK = 512

_SEGMENT = r"[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}"  # no leading '.', so no '..' and no hidden files
_HF_NAME = r"[A-Za-z0-9][-A-Za-z0-9_.]{0,95}"  # the Hub's limit is 96 characters per part
#: hf://org/repo[@revision][/path/in/repo] or pvc://claim[/path/in/claim]. A revision holds no '/' (a branch
#: whose name has one is given by its commit). The CRD carries this pattern; _source_problem says why not.
SOURCE_PATTERN = (rf"^(hf://{_HF_NAME}/{_HF_NAME}(@[A-Za-z0-9][-A-Za-z0-9_.]{{0,127}})?"
                  rf"|pvc://{DNS1123_SUBDOMAIN_PATTERN[1:-1]})(/{_SEGMENT})*$")
_SOURCE_HELP = "hf://org/repo[@revision][/path] or pvc://claim[/path] (e.g. hf://acme/llama-support-lora@v2)"


@dataclass(frozen=True)
class Source:
    """A parsed source: a Hugging Face repository (at a revision, optionally one path in it) or a path in a
    PersistentVolumeClaim of the deployment's namespace."""

    scheme: Literal["hf", "pvc"]
    location: str  # hf: org/repo; pvc: the claim's name
    revision: str | None
    path: str  # in the repository or claim, '' for its root

    @property
    def is_gguf(self) -> bool:
        return self.path.lower().endswith(".gguf")


def parse_source(text: str) -> Source:
    """A source as written in the spec (already checked by the models below)."""
    scheme, _, rest = text.partition("://")
    if scheme == "hf":
        org, _, rest = rest.partition("/")
        repo, _, path = rest.partition("/")
        repo, _, revision = repo.partition("@")
        return Source("hf", f"{org}/{repo}", revision or None, path)
    claim, _, path = rest.partition("/")
    return Source("pvc", claim, None, path)


def _source_problem(text: str) -> str | None:
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in ("hf", "pvc"):
        return f"{shown(text)} has no source scheme the operator fetches from; write {_SOURCE_HELP}"
    if len(text) > MAX_SOURCE_LENGTH or not re.fullmatch(SOURCE_PATTERN, text):
        return (f"{shown(text)} is not a valid {scheme}:// source: {_SOURCE_HELP}; path segments are letters, "
                "digits, '-', '_' and '.', not starting with '.'")
    return None


SourceText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SOURCE_LENGTH),
                       Field(json_schema_extra={"pattern": SOURCE_PATTERN})]


class Adapter(ApiModel):
    """A LoRA adapter of spec.model, served beside it under its own model name."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=63), Field(
        json_schema_extra={"pattern": ADAPTER_NAME_PATTERN})] = Field(
        description="The model name clients give in the OpenAI API (`model`) to use this adapter (vLLM); unique "
        "in the deployment and not the deployment's own name, which serves the base model.")
    source: SourceText = Field(description=(
        "Where the adapter is: hf://org/repo[@revision] (a PEFT directory: adapter_config.json and "
        "adapter_model.safetensors, for vLLM), hf://org/repo[@revision]/file.gguf (for llama.cpp), or "
        "pvc://claim/path in a PersistentVolumeClaim of this namespace. Fetched once into the model cache."))
    rank: int = Field(default=DEFAULT_RANK, ge=1, le=MAX_RANK, description=(
        "The adapter's LoRA rank (r in its adapter_config.json): sizes the memory vLLM reserves "
        "(--max-lora-rank). vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 and 512."))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(ADAPTER_NAME_PATTERN, v):
            raise ValueError(f"{shown(v)} is not a valid adapter name: at most 63 letters, digits, '-', '_' or '.', "
                             "starting and ending with a letter or digit (e.g. support-v2)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        problem = _source_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def parsed(self) -> Source:
        return parse_source(self.source)


def gguf_quantization_in_name(path: str, quantizations: list[str]) -> str | None:
    """The GGUF quantization a file's name carries (q4_k_m for 'acme-8b-Q4_K_M.gguf'), or None: llama.cpp's
    tools write the type into the names of the files they make (llama-quantize: ggml-model-Q4_K_M.gguf).
    Longest first, so that q4_k_m is not read as another type's prefix."""
    name = path.rsplit("/", 1)[-1]
    alternatives = "|".join(re.escape(q) for q in sorted(quantizations, key=len, reverse=True))
    match = re.search(rf"(?:^|[-._])({alternatives})(?=[-._])", name, re.IGNORECASE)
    return match.group(1).lower() if match else None


class CustomWeights(ApiModel):
    """A full fine-tune of spec.model: the same architecture and sizes (the catalog's), other weights."""

    source: SourceText | None = Field(default=None, description=(
        "The fine-tune's checkpoint for vLLM: hf://org/repo[@revision] or pvc://claim/path, a directory with "
        "config.json, the tokenizer and safetensors in 16 bits. Quantized only in flight (FP8)."))
    gguf: SourceText | None = Field(default=None, description=(
        "The fine-tune as one GGUF file for llama.cpp: hf://org/repo[@revision]/file.gguf or pvc://claim/file.gguf. "
        "Its quantization is read from the file name (…-Q4_K_M.gguf) unless ggufQuantization is set."))
    ggufQuantization: Literal["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"] | None = Field(
        default=None, description="The GGUF file's type, when its name does not carry it.")

    @field_validator("source", "gguf")
    @classmethod
    def _sources(cls, v: str | None) -> str | None:
        problem = _source_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _some_weights(self) -> "CustomWeights":
        problems = []
        if self.source is None and self.gguf is None:
            problems.append("give source (for vLLM), gguf (for llama.cpp) or both")
        if self.gguf is not None and not parse_source(self.gguf).is_gguf:
            problems.append(f".gguf: {shown(self.gguf)} is not a .gguf file; name the file in the source "
                            "(hf://org/repo/model-Q4_K_M.gguf)")
        if self.source is not None and parse_source(self.source).is_gguf:
            problems.append(f".source: {shown(self.source)} is a GGUF file, which vLLM does not load here; give it "
                            "as gguf, and a safetensors checkpoint as source")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --- Rules across the spec ---------------------------------------------------------------------------


def adapter_format(adapter: Adapter) -> Literal["gguf", "peft"]:
    return "gguf" if adapter.parsed.is_gguf else "peft"


def pins_base_model(spec: LlamaDeploymentSpec) -> str | None:
    """Why the planner must not fall back to a smaller model (None: nothing pins it)."""
    what = []
    if spec.adapters:
        what.append(f"spec.adapters ({', '.join(a.name for a in spec.adapters)}) are trained on it")
    if spec.weights is not None:
        what.append("spec.weights is a fine-tune of it")
    return "; ".join(what) or None


def runtime_adapter_problem(spec: LlamaDeploymentSpec, runtime: str) -> str | None:
    """Why `runtime` cannot load the spec's adapters or weights (None: it can)."""
    if runtime == "llamacpp":
        for i, a in enumerate(spec.adapters):
            if adapter_format(a) != "gguf":
                return (f"llama.cpp loads GGUF adapters only: spec.adapters[{i}].source {a.source} is not a .gguf "
                        "file (convert it with convert_lora_to_gguf.py)")
        if spec.weights is not None and spec.weights.gguf is None:
            return "llama.cpp needs the fine-tune as a GGUF file: spec.weights.gguf is not set"
        return None
    for i, a in enumerate(spec.adapters):
        if adapter_format(a) != "peft":
            return (f"vLLM loads PEFT adapter directories: spec.adapters[{i}].source {a.source} is a GGUF file "
                    "(llama.cpp's format)")
    if spec.weights is not None and spec.weights.source is None:
        return "vLLM needs the fine-tune's safetensors checkpoint: spec.weights.source is not set"
    return None


def gguf_weights_quantization(spec: LlamaDeploymentSpec, quantizations: list[str]) -> str | None:
    """The quantization of spec.weights.gguf: as set, else as its file name says (None: no GGUF weights, or
    a name that says nothing; finetune_problems refuses the latter)."""
    weights = spec.weights
    if weights is None or weights.gguf is None:
        return None
    return weights.ggufQuantization or gguf_quantization_in_name(parse_source(weights.gguf).path, quantizations)


def custom_weights_quantizations(spec: LlamaDeploymentSpec, gguf_quantizations: list[str]) -> list[str]:
    """The variants a full fine-tune has: its 16-bit checkpoint and vLLM's in-flight FP8 of it, and the one
    GGUF file given. No AWQ, GPTQ or other GGUF types: those are checkpoints of the base model."""
    weights = spec.weights
    assert weights is not None
    out = ["bf16", "fp8"] if weights.source is not None else []
    gguf = gguf_weights_quantization(spec, gguf_quantizations)
    return out + ([gguf] if gguf else [])


def finetune_problems(spec: LlamaDeploymentSpec, *, gguf_quantizations: list[str], vision: bool,
                      lora_refusal: str | None, vllm_ranks: tuple[int, ...], vllm_title: str) -> list[str]:
    """What is wrong with the spec's adapters and weights, each naming its field and the fix (api's
    cross-field checks; the CRD's CEL rules mirror them). `lora_refusal`: why no release serving spec.model
    takes LoRA (None: one does)."""
    problems = []
    seen: set[str] = set()
    for i, a in enumerate(spec.adapters):
        if a.name in seen:
            problems.append(f"spec.adapters[{i}].name: {a.name} names two adapters; give each its own name")
        seen.add(a.name)
    if spec.adapters and lora_refusal:
        problems.append(f"spec.adapters: {spec.model} cannot take LoRA adapters: {lora_refusal}; remove the "
                        "adapters or serve a text model")
    runtimes = ["vllm", "llamacpp"] if spec.runtime == "auto" else [spec.runtime]
    if vision:
        runtimes = [r for r in runtimes if r == "vllm"]
    refusals = {r: runtime_adapter_problem(spec, r) for r in runtimes}
    if runtimes and all(refusals.values()) and (spec.adapters or spec.weights is not None):
        fix = " or set runtime auto" if spec.runtime != "auto" else ""
        field = "spec.runtime" if spec.runtime != "auto" else ("spec.adapters" if spec.adapters else "spec.weights")
        problems.append(f"{field}: no runtime can serve these: " + "; ".join(refusals.values())
                        + f"; give every adapter in one format{fix}")
    if "vllm" in runtimes and not refusals.get("vllm"):
        for i, a in enumerate(spec.adapters):
            if a.rank not in vllm_ranks:
                higher = [r for r in vllm_ranks if r >= a.rank]
                hint = f"give {higher[0]} (the memory is sized by it)" if higher else "lower it"
                problems.append(f"spec.adapters[{i}].rank: {vllm_title} accepts ranks {', '.join(map(str, vllm_ranks))}, "
                                f"not {a.rank}; {hint}")
    weights = spec.weights
    if weights is not None and weights.gguf is not None and gguf_weights_quantization(spec, gguf_quantizations) is None:
        problems.append(f"spec.weights.gguf: cannot tell the GGUF type from the file name {parse_source(weights.gguf).path}; "
                        f"set spec.weights.ggufQuantization (one of {', '.join(gguf_quantizations)})")
    if weights is not None and not problems:
        problems += _nothing_of_the_fine_tune_allowed(spec, gguf_quantizations)
    return problems


def _nothing_of_the_fine_tune_allowed(spec: LlamaDeploymentSpec, gguf_quantizations: list[str]) -> list[str]:
    """A fine-tune comes in a few variants only (custom_weights_quantizations): the fallback settings and the
    runtime must leave one of them, or nothing could run."""
    catalog = load_catalog()
    have = custom_weights_quantizations(spec, gguf_quantizations)
    listed = spec.fallback.quantizations
    if listed and not set(have) & set(listed):
        return [f"spec.fallback.quantizations: the fine-tune in spec.weights comes as {', '.join(have)} only (no "
                f"{', '.join(listed)}); list one of them"]
    runtime = [q for q in have if spec.runtime == "auto" or catalog.quantizations[q].runtime == spec.runtime]
    if runtime and not spec.fallback.allowQuantization and all(catalog.quantizations[q].bits < 16 for q in runtime):
        return [f"spec.fallback.allowQuantization: false, but the fine-tune in spec.weights comes as "
                f"{', '.join(runtime)} only for {spec.runtime}; allow quantization or give a 16-bit checkpoint "
                "(spec.weights.source)"]
    return []


def name_clash_problems(spec: LlamaDeploymentSpec, name: str) -> list[str]:
    """An adapter named like the deployment would hide the base model, which is served under that name."""
    return [f"spec.adapters[{i}].name: {a.name} is the LlamaDeployment's own name, under which the base model is "
            "served; give the adapter another name" for i, a in enumerate(spec.adapters) if a.name == name]


# --- What each runtime's release can do with them ---------------------------------------------------------


def finetune_support_problem(model: Model, quant: Quantization, gpu: GPU | None, adapters: bool,
                             in_flight: bool) -> str | None:
    """Why the variant's release cannot serve adapters on this kernel, or quantize a fine-tune in flight."""
    rel = release_for(model, quant.runtime)
    if rel is None:
        return None  # engines.support_problem says why
    if in_flight and quant.runtime == "vllm":
        problem = in_flight_problem(rel, quant, gpu)
        if problem:
            return problem
    if adapters and rel.lora is not None and rel.lora.quantized_kernels is not None and quant.runtime == "vllm":
        kernel = kernel_for(rel, model, quant, gpu)
        if kernel is not None and kernel.id not in rel.lora.quantized_kernels:
            return f"{rel.title}: LoRA on the {kernel.id} kernel was not read to work; pick another quantization"
    return None


def source_problem(spec: LlamaDeploymentSpec, model: Model, runtime: str) -> str | None:
    """Why the candidate's runtime cannot load the spec's adapters or fine-tune: their format, or an hf://
    source its image has no command to fetch with."""
    problem = runtime_adapter_problem(spec, runtime)
    if problem:
        return problem
    rel = release_for(model, runtime)
    sources = [a.source for a in spec.adapters]
    if spec.weights is not None:
        sources.append((spec.weights.source if runtime == "vllm" else spec.weights.gguf) or "")
    if rel is not None and not rel.fetch_command and any(parse_source(s).scheme == "hf" for s in sources if s):
        return (f"{rel.title}: no command to fetch hf:// sources was read from its image; give them as pvc:// "
                "(a claim holding the files)")
    return None
