"""The catalogs, as data: Llama models, quantizations and accelerators.

The YAML files beside this module are the source; this module only loads them into frozen values the
estimator and planner read. Nothing here decides anything.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

CATALOG_DIR = Path(__file__).resolve().parent

Runtime = Literal["vllm", "llamacpp"]
Capability = Literal["text", "vision"]

#: Per GPU vendor, the extended resource its device plugin advertises (which pods request, and the key of
#: the NoSchedule taint GPU nodes commonly carry) and the node label its feature discovery writes the GPU
#: product under (NVIDIA GPU Feature Discovery, the AMD node labeller).
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
GPU_PRODUCT_LABEL = {"nvidia": "nvidia.com/gpu.product", "amd": "amd.com/gpu.product-name"}
#: Every vendor's, NVIDIA first: the order a node's labels are read in.
GPU_RESOURCES = tuple(GPU_RESOURCE.values())
GPU_PRODUCT_LABELS = tuple(GPU_PRODUCT_LABEL.values())


@dataclass(frozen=True)
class VisionArch:
    """The vision tower of a Llama 3.2 Vision model (HF vision_config)."""

    hidden_size: int
    intermediate_size: int
    layers: int
    patch_size: int
    image_size: int
    max_tiles: int
    output_dim: int
    image_tokens: int  # encoder tokens one image yields (per request), held in the cross-attention KV cache


@dataclass(frozen=True)
class ModelArch:
    layers: int  # all decoder layers, cross-attention ones included (HF text_config.num_hidden_layers)
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    max_context: int
    cross_attention_layers: int = 0
    vision: VisionArch | None = None

    @property
    def self_attention_layers(self) -> int:
        return self.layers - self.cross_attention_layers


@dataclass(frozen=True)
class GgufSource:
    repo: str
    file: str  # with {QUANT}
    split: dict[str, int] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # quant id -> file token, where not the GGUF name
    unpublished: tuple[str, ...] = ()

    def file_for(self, quant_gguf_name: str, quant_id: str) -> str:
        """The file llama.cpp loads: the first part of a split upload (llama.cpp finds the rest)."""
        name = self.file.replace("{QUANT}", self.names.get(quant_id, quant_gguf_name))
        parts = self.split.get(quant_id)
        if parts:
            stem = name[: -len(".gguf")]
            return f"{stem}/{stem}-00001-of-{parts:05d}.gguf"
        return name


@dataclass(frozen=True)
class Unconverted:
    """Linear modules a quantized vLLM checkpoint stores unconverted (16-bit), models.yaml `unconverted`:
    whole decoder layers by index, and/or every layer's self-attention projections."""

    layers: tuple[int, ...] = ()
    self_attention: bool = False


@dataclass(frozen=True, eq=False)  # one instance per catalog id: identity is equality (and hashable)
class Model:
    id: str
    name: str
    family: str
    capability: Capability
    architecture: str  # HF config.json `architectures`: what an engine release must serve
    published_parameters: float
    arch: ModelArch
    source: str
    vllm_repos: dict[str, str]  # quantization id -> HF repo
    gguf: GgufSource | None
    vllm_kernels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # quantization id -> its own kernels
    # quantization id -> the modules its checkpoint leaves in 16 bits beyond embeddings, lm_head and norms
    vllm_unconverted: dict[str, "Unconverted"] = field(default_factory=dict)
    #: The vocabulary it reads and writes (models.yaml `tokenizer`): models sharing one may draft for each other.
    tokenizer: str | None = None

    def variants(self) -> list[str]:
        """Quantization ids published for this model, vLLM ones first."""
        out = list(self.vllm_repos)
        if self.gguf is not None:
            out += [
                q.id
                for q in load_catalog().quantizations.values()
                if q.runtime == "llamacpp" and q.id not in self.gguf.unpublished
            ]
        return out


@dataclass(frozen=True)
class Quantization:
    id: str
    runtime: Runtime
    quality: int
    bits: int
    # vLLM checkpoints
    linear_bits: float | None = None
    vllm_kernels: tuple[str, ...] = ()  # engines.yaml kernel ids, preferred first
    # GGUF mixes
    gguf: str | None = None
    base: str | None = None
    attn_v: str | None = None
    ffn_down: str | None = None
    more_bits_share: float = 1.0
    attn_output: str | None = None
    output: str | None = None
    embedding: str | None = None


@dataclass(frozen=True)
class GPU:
    product: str
    aliases: tuple[str, ...]
    name: str
    vendor: str
    memory_gib: float
    memory_bandwidth_gbps: float
    bf16_tflops: float | None
    fp16_tflops: float | None
    fp8_tflops: float | None
    int8_tops: float | None
    compute_capability: str | None
    interconnect: str
    label_key: str = GPU_PRODUCT_LABEL["nvidia"]  # hardware.yaml `labelKey`, on AMD entries
    fp16_acc_tflops: float | None = None  # FP16 tensor with FP16 accumulate, where it differs (GeForce)
    arch: str | None = None
    known: bool = True  # False for a product missing from the catalog, built from its node labels

    @property
    def resource_name(self) -> str:
        return GPU_RESOURCE[self.vendor]

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def tensor_tflops_16bit(self) -> float:
        """Dense 16-bit tensor throughput: BF16 where the GPU has it, else FP16."""
        return self.bf16_tflops or self.fp16_tflops or 0.0


@dataclass(frozen=True)
class CpuDefaults:
    """What the estimator assumes of a CPU node without better information."""

    memory_bandwidth_gbps: float  # node default; the node label `bandwidth_label` overrides it
    bandwidth_label: str
    source: str


@dataclass(frozen=True)
class NetworkDefaults:
    """What the estimator assumes of the network between the nodes of a replica that spans nodes."""

    bandwidth_gbps: float  # Gbit/s; the node label `bandwidth_label` overrides it
    bandwidth_label: str
    hop_latency_seconds: float
    source: str


@dataclass(frozen=True)
class DraftPair:
    """What the planner assumes of one draft model drafting for one target (speculation.yaml `pairs`)."""

    target: str
    draft: str
    alpha: float  # per-token acceptance: the chance the target accepts a drafted token, given the ones before
    source: str


@dataclass(frozen=True)
class SpeculationFacts:
    """speculation.yaml: acceptance per draft/target pair, and the planner's rules for drafts."""

    pairs: dict[tuple[str, str], DraftPair]  # (target id, draft id) -> pair
    default_alpha: float  # for a pair the file does not list
    default_source: str
    min_speedup: float  # Auto drafts only when predicted this much faster at the planned concurrency
    max_draft_tokens: int  # the longest draft the planner tries when spec.speculative leaves the length to it

    def pair(self, target: str, draft: str) -> DraftPair:
        return self.pairs.get((target, draft)) or DraftPair(target, draft, self.default_alpha, self.default_source)


@dataclass(frozen=True)
class Catalog:
    models: dict[str, Model]
    quantizations: dict[str, Quantization]
    ggml_type_bits: dict[str, float]
    gguf_metadata_bytes: float
    gpus: dict[str, GPU]  # canonical product -> GPU
    gpu_index: dict[str, GPU]  # lower-cased product or alias -> GPU
    cpu: CpuDefaults
    network: NetworkDefaults
    speculation: SpeculationFacts

    def model(self, model_id: str) -> Model:
        return self.models[model_id]

    def find_gpu(self, product: str) -> GPU | None:
        return self.gpu_index.get(product.strip().lower())


_ACRONYMS = {"GiB": "Gib", "GBps": "Gbps", "TFLOPS": "Tflops", "TOPS": "Tops"}


def _camel_to_snake(name: str) -> str:
    """YAML keys are camelCase like Kubernetes manifests; Python fields are snake_case."""
    for acronym, word in _ACRONYMS.items():
        name = name.replace(acronym, word)
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _snake_keys(d: dict) -> dict:
    return {_camel_to_snake(k): v for k, v in d.items()}


def load_yaml(name: str) -> dict:
    """One of the YAML files beside this module, as written (load_catalog turns them into values)."""
    with open(CATALOG_DIR / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _load_models() -> dict[str, Model]:
    models: dict[str, Model] = {}
    for raw in load_yaml("models.yaml")["models"]:
        arch = dict(raw["arch"])
        vision = arch.pop("vision", None)
        arch_kwargs = _snake_keys(arch)
        if vision:
            arch_kwargs["vision"] = VisionArch(**_snake_keys(vision))
        gguf = raw.get("gguf")
        models[raw["id"]] = Model(
            id=raw["id"],
            name=raw["name"],
            family=str(raw["family"]),
            capability=raw["capability"],
            architecture=raw["architecture"],
            tokenizer=raw.get("tokenizer"),
            published_parameters=float(raw["publishedParameters"]),
            arch=ModelArch(**arch_kwargs),
            source=raw["source"],
            vllm_repos={q: v["repo"] for q, v in (raw.get("vllm") or {}).items()},
            vllm_kernels={q: tuple(v["kernels"]) for q, v in (raw.get("vllm") or {}).items() if "kernels" in v},
            vllm_unconverted={
                q: Unconverted(layers=tuple(v["unconverted"].get("layers") or ()),
                               self_attention=bool(v["unconverted"].get("selfAttention", False)))
                for q, v in (raw.get("vllm") or {}).items() if "unconverted" in v
            },
            gguf=GgufSource(
                repo=gguf["repo"],
                file=gguf["file"],
                split=dict(gguf.get("split") or {}),
                names=dict(gguf.get("names") or {}),
                unpublished=tuple(gguf.get("unpublished") or ()),
            )
            if gguf
            else None,
        )
    return models


def _load_hardware() -> tuple[dict[str, GPU], dict[str, GPU], CpuDefaults, NetworkDefaults]:
    raw = load_yaml("hardware.yaml")
    gpus: dict[str, GPU] = {}
    index: dict[str, GPU] = {}
    for entry in raw["gpus"]:
        kw = _snake_keys(entry)
        kw.pop("source", None)
        kw["aliases"] = tuple(kw.get("aliases") or ())
        if kw.get("compute_capability") is not None:
            kw["compute_capability"] = str(kw["compute_capability"])
        allowed = GPU.__dataclass_fields__.keys()
        gpu = GPU(**{k: v for k, v in kw.items() if k in allowed})
        gpus[gpu.product] = gpu
        for name in (gpu.product, *gpu.aliases):
            index[name.lower()] = gpu
    cpu_raw = raw["cpu"]
    cpu = CpuDefaults(
        memory_bandwidth_gbps=float(cpu_raw["defaultMemoryBandwidthGBps"]),
        bandwidth_label=cpu_raw["memoryBandwidthLabelKey"],
        source=cpu_raw.get("source", ""),
    )
    net_raw = raw["network"]
    network = NetworkDefaults(
        bandwidth_gbps=float(net_raw["defaultBandwidthGbps"]),
        bandwidth_label=net_raw["bandwidthLabelKey"],
        hop_latency_seconds=float(net_raw["hopLatencySeconds"]),
        source=net_raw.get("source", ""),
    )
    return gpus, index, cpu, network


def _load_speculation() -> SpeculationFacts:
    raw = load_yaml("speculation.yaml")
    pairs = {}
    for entry in raw["pairs"]:
        for target in entry["targets"]:
            pairs[(target, entry["draft"])] = DraftPair(target, entry["draft"], float(entry["alpha"]), entry["source"])
    return SpeculationFacts(pairs=pairs, default_alpha=float(raw["default"]["alpha"]),
                            default_source=raw["default"]["source"], min_speedup=float(raw["minSpeedup"]),
                            max_draft_tokens=int(raw["maxDraftTokens"]))


@functools.cache
def load_catalog() -> Catalog:
    """The catalogs shipped with the package (read once; they are immutable)."""
    q_raw = load_yaml("quantizations.yaml")
    quants = {}
    for qid, q in q_raw["quantizations"].items():
        kw = _snake_keys(q)
        kw["vllm_kernels"] = tuple(kw.get("vllm_kernels") or ())
        quants[qid] = Quantization(id=qid, **kw)
    gpus, index, cpu, network = _load_hardware()
    return Catalog(
        models=_load_models(),
        quantizations=quants,
        ggml_type_bits={k: float(v) for k, v in q_raw["ggmlTypeBits"].items()},
        gguf_metadata_bytes=float(q_raw["ggufMetadataBytes"]),
        gpus=gpus,
        gpu_index=index,
        cpu=cpu,
        network=network,
        speculation=_load_speculation(),
    )


def model_ids() -> list[str]:
    """Model ids in catalog order (used for the CRD enum and CEL rules, so they must not need hardware)."""
    return [m["id"] for m in load_yaml("models.yaml")["models"]]


def capability_version(cc: str | None) -> tuple[int, int]:
    """'8.9' -> (8, 9); None (no CUDA capability, e.g. AMD) -> (0, 0)."""
    if not cc:
        return (0, 0)
    major, _, minor = cc.partition(".")
    return (int(major), int(minor or 0))
