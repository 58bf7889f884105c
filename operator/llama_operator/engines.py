"""Engine releases as data: which pinned vLLM or llama.cpp release runs a variant, how, and what it refuses.

Pure. The facts live in catalog/engines.yaml, each citing the file of the release's source it was read
from, and the options each release accepts in catalog/engine-options/ (generated from the same sources by
scripts/engine_options.py). The planner asks `support_problem` whether a variant can run on a GPU at all;
the renderer asks a release for its image and command, and `kernel_for` for the arguments that select the
kernels; the tests ask `rejected_arguments` whether a rendered command line is one the release would accept.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .catalog import CATALOG_DIR, GPU, Model, Quantization, capability_version, load_catalog, load_yaml

ENGINE_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp"}
#: Image flavour per accelerator vendor: how engines.yaml keys a release's `images` and `runAs`.
IMAGE_FLAVOURS = {"nvidia": "cuda", "amd": "rocm", "cpu": "cpu"}


@dataclass(frozen=True)
class Kernel:
    """One way a release runs a checkpoint format: what it needs of the GPU, and the arguments selecting it."""

    id: str
    min_compute_capability: str | None
    vendors: tuple[str, ...]
    args: tuple[str, ...]
    weight_only: bool = False  # weights stored low-precision, computed at 16 bits (Marlin W8A16)
    source: str = ""


@dataclass(frozen=True)
class SloSignals:
    """The series the SLO loop reads from one release (engines.yaml `sloSignals`).

    `kind` histograms (vLLM): ttft and tpot name histograms, whose buckets give a p95 and the share of
    requests over a target. `kind` counters (llama.cpp): no latency histogram; the means come from time
    and token totals (prompt_seconds / prompt_tokens per prompt token, predicted_seconds /
    predicted_tokens per output token). Both: the gauges of requests running and waiting."""

    kind: str  # histograms | counters
    running: str
    waiting: str
    ttft: str | None = None
    tpot: str | None = None
    generated_tokens: str | None = None
    prompt_seconds: str | None = None
    prompt_tokens: str | None = None
    predicted_seconds: str | None = None
    predicted_tokens: str | None = None
    #: Drafted and accepted tokens (engines.yaml `speculative.metrics`): read when present, for the acceptance of
    #: a plan's draft; a server without a draft may not export them (vLLM creates them only with one).
    draft_tokens: str | None = None
    draft_accepted: str | None = None

    def names(self) -> list[str]:
        """Every series named, as the release exports it."""
        return [v for k, v in vars(self).items() if k != "kind" and v]


@dataclass(frozen=True)
class LoraSupport:
    """What a release does with LoRA adapters (engines.yaml `lora`), each fact cited in `sources`.

    `rank_choices` empty: the source sets no list of ranks. `quantized_kernels` None: a base of any type
    takes adapters (llama.cpp); otherwise the kernel ids (engines.yaml `kernels`) read to accept them (empty:
    not read for this release)."""

    architectures: frozenset[str]
    refused: Mapping[str, str]  # architecture the release serves -> why it refuses LoRA for it, cited
    flags: Mapping[str, str]  # role (enable, adapters, maxLoras, maxRank, ...) -> option spelling
    max_loras_default: int | None = None
    rank_default: int | None = None
    rank_choices: tuple[int, ...] = ()
    dtype_choices: tuple[str, ...] = ()
    adapted_modules: tuple[str, ...] = ()
    packed_modules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    quantized_kernels: tuple[str, ...] | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # fact -> file:line citation

    def takes(self, architecture: str) -> bool:
        return architecture in self.architectures


@dataclass(frozen=True)
class MultiNodeSupport:
    """How a release runs one replica over several nodes (engines.yaml `multiNode`, issue 14), each fact cited
    in `sources`: the `flags` by role (pipelineParallel, executorBackend, nnodes, nodeRank, masterAddr,
    masterPort, headless), the executor backend and rendezvous port given, the variable a node's address is
    advertised from, and the LeaderWorkerSet variables (role: leaderAddress, workerIndex, groupSize -> name)."""

    flags: Mapping[str, str]
    executor_backend: str
    master_port: int
    host_ip_env: str
    lws_env: Mapping[str, str]
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InFlightQuantization:
    """A quantization the release makes of a 16-bit checkpoint as it loads it (engines.yaml
    `inFlightQuantization`): what a full fine-tune, which has no quantized checkpoints, can be served in."""

    quantization: str  # the catalog's quantization id whose memory and kernels it has (fp8)
    args: tuple[str, ...]
    min_compute_capability: str | None
    source: str


@dataclass(frozen=True)
class SpeculativeSupport:
    """Decoding with a draft model (engines.yaml `speculative`, docs/speculative.md): the flags by role, the
    method name vLLM takes, what the release refuses beside a draft (None: nothing), and its counters of drafted
    and accepted tokens (None: it exports none)."""

    flags: Mapping[str, str]
    method: str | None = None
    lora_refused: str | None = None
    accepted_metric: str | None = None
    drafted_metric: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)  # one instance per release id: identity is equality (and hashable)
class EngineRelease:
    id: str
    engine: str  # vllm | llamacpp
    version: str
    images: Mapping[str, str]  # accelerator flavour (cuda, rocm, cpu) -> image
    command: tuple[str, ...]
    model_argument: str  # positional (vllm serve MODEL) | flags
    architectures: frozenset[str]
    options_file: str
    kernels: Mapping[str, Kernel]
    kv_min_compute_capability: str | None
    kv_vendors: tuple[str, ...]
    metrics: frozenset[str]  # the series the alert rules and dashboard read, as this release exports them
    slo_signals: SloSignals
    #: The lowest CUDA compute capability the release's CUDA image is compiled for (None: no floor stated).
    image_min_compute_capability: str | None
    source: str
    lora: LoraSupport | None = None
    in_flight: Mapping[str, InFlightQuantization] = field(default_factory=dict)
    #: Quantizations the release does not make in flight, with why (engines.yaml, cited).
    in_flight_refused: Mapping[str, str] = field(default_factory=dict)
    #: The command in the release's image that fetches files from the Hugging Face Hub (engines.yaml `fetch`).
    fetch_command: tuple[str, ...] = ()
    #: One replica over several nodes (None: the release is not rendered over several).
    multi_node: MultiNodeSupport | None = None
    #: Decoding with a draft model (None: the release does not; `speculative_refused` says why in its words).
    speculative: SpeculativeSupport | None = None
    speculative_refused: str | None = None

    @property
    def title(self) -> str:
        """How messages name it: 'vLLM 0.34.0', 'llama.cpp b7000'."""
        return f"{ENGINE_NAMES[self.engine]} {self.version}"

    def serves(self, model: Model) -> bool:
        return model.architecture in self.architectures

    def image(self, vendor: str) -> str | None:
        """The pinned image for an accelerator vendor (nvidia, amd, or cpu); None when there is none."""
        return self.images.get(IMAGE_FLAVOURS.get(vendor, vendor))

    @property
    def options(self) -> Mapping[str, dict]:
        """Every option spelling the release accepts -> {takesValue, choices}: read from its source."""
        return _options(self.options_file)


@functools.cache
def _options(name: str) -> Mapping[str, dict]:
    with open(CATALOG_DIR / name, encoding="utf-8") as f:
        return json.load(f)["options"]


def _release(raw: dict) -> EngineRelease:
    kernels = {
        kid: Kernel(
            id=kid,
            min_compute_capability=str(k["minComputeCapability"]) if k.get("minComputeCapability") else None,
            vendors=tuple(k["vendors"]),
            args=tuple(k.get("args") or ()),
            weight_only=bool(k.get("weightOnly", False)),
            source=k.get("source", ""),
        )
        for kid, k in (raw.get("kernels") or {}).items()
    }
    kv = raw["quantizedKvCache"]
    return EngineRelease(
        id=raw["id"],
        engine=raw["engine"],
        version=str(raw["version"]),
        images=dict(raw["images"]),
        command=tuple(raw["command"]),
        model_argument=raw["modelArgument"],
        architectures=frozenset(raw["architectures"]),
        options_file=raw["options"],
        kernels=kernels,
        kv_min_compute_capability=str(kv["minComputeCapability"]) if kv.get("minComputeCapability") else None,
        kv_vendors=tuple(kv["vendors"]),
        metrics=frozenset(raw["metrics"]["names"]),
        slo_signals=_slo_signals(raw["sloSignals"], (raw.get("speculative") or {}).get("metrics") or {}),
        image_min_compute_capability=min(
            (raw.get("imageComputeCapabilities") or {}).get("cuda") or [None],  # type: ignore[type-var]
            key=lambda cc: capability_version(cc) if cc else (0, 0)),
        source=raw.get("source", ""),
        lora=_lora(raw["lora"]) if raw.get("lora") else None,
        in_flight={q: InFlightQuantization(q, tuple(f["args"]), f.get("minComputeCapability"), f["source"])
                   for q, f in (raw.get("inFlightQuantization") or {}).items() if q != "refused"},
        in_flight_refused=dict((raw.get("inFlightQuantization") or {}).get("refused") or {}),
        fetch_command=tuple((raw.get("fetch") or {}).get("command") or ()),
        multi_node=_multi_node(raw["multiNode"]) if raw.get("multiNode") else None,
        speculative=_speculative(raw["speculative"]) if "flags" in (raw.get("speculative") or {}) else None,
        speculative_refused=(raw.get("speculative") or {}).get("refused"),
    )


def _speculative(raw: dict) -> SpeculativeSupport:
    """engines.yaml `speculative` -> SpeculativeSupport; `sources` keeps every fact's citation by its name."""
    sources = {k: v["source"] for k, v in raw.items() if isinstance(v, dict) and "source" in v}
    sources["flags"] = raw["flagsSource"]
    metrics = raw.get("metrics") or {}
    return SpeculativeSupport(
        flags=dict(raw["flags"]),
        method=(raw.get("method") or raw.get("type") or {}).get("value"),
        lora_refused=(raw.get("lora") or {}).get("refused"),
        accepted_metric=metrics.get("accepted"),
        drafted_metric=metrics.get("drafted"),
        sources=sources,
    )


def _multi_node(raw: dict) -> MultiNodeSupport:
    """engines.yaml `multiNode` -> MultiNodeSupport; `sources` keeps every fact's citation by the fact's name."""
    sources = {k: v["source"] for k, v in raw.items() if isinstance(v, dict) and "source" in v}
    sources["flags"] = raw["flagsSource"]
    return MultiNodeSupport(
        flags=dict(raw["flags"]),
        executor_backend=raw["executorBackend"]["value"],
        master_port=int(raw["masterPort"]["value"]),
        host_ip_env=raw["hostIpEnv"]["name"],
        lws_env=dict(raw["leaderWorkerSet"]["env"]),
        sources=sources,
    )


def _lora(raw: dict) -> LoraSupport:
    """engines.yaml `lora` -> LoraSupport; `sources` keeps every fact's citation by the fact's name."""
    sources = {k: v["source"] for k, v in raw.items() if isinstance(v, dict) and "source" in v}
    sources.update({k.removesuffix("Source"): v for k, v in raw.items() if k.endswith("Source")})
    sources.update({f"refused.{a}": why for a, why in (raw.get("refused") or {}).items()})
    rank, modules, quant = raw.get("maxRank") or {}, raw.get("modules") or {}, raw.get("quantizedBase") or {}
    kernels = quant.get("kernels")
    return LoraSupport(
        architectures=frozenset(raw["architectures"]),
        refused=dict(raw.get("refused") or {}),
        flags=dict(raw["flags"]),
        max_loras_default=(raw.get("maxLoras") or {}).get("default"),
        rank_default=rank.get("default"),
        rank_choices=tuple(int(r) for r in rank.get("allowed") or ()),
        dtype_choices=tuple((raw.get("dtype") or {}).get("allowed") or ()),
        adapted_modules=tuple(modules.get("adapted") or ()),
        packed_modules={k: tuple(v) for k, v in (modules.get("packed") or {}).items()},
        quantized_kernels=None if kernels == "any" else tuple(kernels or ()),
        sources=sources,
    )


_SIGNAL_FIELDS = {"ttft": "ttft", "tpot": "tpot", "running": "running", "waiting": "waiting",
                  "generatedTokens": "generated_tokens", "promptSeconds": "prompt_seconds",
                  "promptTokens": "prompt_tokens", "predictedSeconds": "predicted_seconds",
                  "predictedTokens": "predicted_tokens"}


def _slo_signals(raw: dict, draft_metrics: dict) -> SloSignals:
    return SloSignals(kind=raw["kind"], **{field: raw[key] for key, field in _SIGNAL_FIELDS.items() if key in raw},
                      draft_tokens=draft_metrics.get("drafted"), draft_accepted=draft_metrics.get("accepted"))


@functools.cache
def releases() -> tuple[EngineRelease, ...]:
    """The pinned releases, in the order a model tries them."""
    return tuple(_release(r) for r in load_yaml("engines.yaml")["releases"])


def release(release_id: str) -> EngineRelease | None:
    return next((r for r in releases() if r.id == release_id), None)


def release_for(model: Model, runtime: str) -> EngineRelease | None:
    """The release a model runs on: the first of its runtime that serves its architecture."""
    return next((r for r in releases() if r.engine == runtime and r.serves(model)), None)


def lora_refusal(model: Model) -> str | None:
    """Why no pinned release that serves `model` takes LoRA adapters for it (None: one does), in the
    release's own words where the catalog has them (engines.yaml `lora.refused`)."""
    why = []
    for runtime in ENGINE_NAMES:
        rel = release_for(model, runtime)
        if rel is None:
            continue
        if rel.lora is not None and rel.lora.takes(model.architecture):
            return None
        refused = rel.lora.refused.get(model.architecture) if rel.lora is not None else None
        # the engine's message, without the citation that follows it in the catalog
        why.append(f"{rel.title} refuses LoRA for {model.architecture}: {refused.split(' (', 1)[0]}" if refused
                   else f"{rel.title} serves no LoRA adapters for {model.architecture}")
    return "; ".join(why) or f"no pinned release serves {model.architecture}"


# --- What runs where ---------------------------------------------------------------------------------------


def _vendor(gpu: GPU | None) -> str:
    return "cpu" if gpu is None else gpu.vendor


def _meets(need: str | None, gpu: GPU | None) -> bool:
    """A compute-capability floor applies to NVIDIA GPUs; other vendors are judged by `vendors` alone."""
    if need is None or gpu is None or gpu.vendor != "nvidia":
        return True
    return capability_version(gpu.compute_capability) >= capability_version(need)


def in_flight_problem(rel: EngineRelease, quant: Quantization, gpu: GPU | None) -> str | None:
    """Why the release cannot quantize a 16-bit checkpoint to `quant` while loading it on `gpu` (None: it can,
    or `quant` is 16-bit and needs no quantizing)."""
    if quant.bits >= 16:
        return None
    entry = rel.in_flight.get(quant.id)
    if entry is None:
        return f"{rel.title} does not quantize a checkpoint to {quant.id} as it loads it"
    if not _meets(entry.min_compute_capability, gpu):
        assert gpu is not None
        return (f"{rel.title}: in-flight {quant.id} needs compute capability {entry.min_compute_capability}; "
                f"{gpu.product} has {gpu.compute_capability}")
    return None


def kernel_ids(model: Model, quant: Quantization) -> tuple[str, ...]:
    return model.vllm_kernels.get(quant.id) or quant.vllm_kernels


def kernel_for(rel: EngineRelease, model: Model, quant: Quantization, gpu: GPU | None) -> Kernel | None:
    """The first of the variant's kernels this GPU can run on this release (None: none can)."""
    for kid in kernel_ids(model, quant):
        k = rel.kernels[kid]
        if _vendor(gpu) in k.vendors and _meets(k.min_compute_capability, gpu):
            return k
    return None


def _kernel_refusal(rel: EngineRelease, model: Model, quant: Quantization, gpu: GPU) -> str:
    """Why none of the variant's kernels runs on `gpu`, naming the release and the fact."""
    parts = []
    for kid in kernel_ids(model, quant):
        k = rel.kernels[kid]
        if gpu.vendor not in k.vendors:
            parts.append(f"{kid} runs on {'/'.join(k.vendors)} GPUs only")
        else:
            parts.append(f"{kid} needs compute capability >= {k.min_compute_capability}")
    have = f"{gpu.product} has {gpu.compute_capability or 'no CUDA capability'}" if gpu.vendor == "nvidia" \
        else f"{gpu.product} is {gpu.vendor}"
    return f"{rel.title}: {quant.id} cannot run: {'; '.join(parts)}; {have}"


def support_problem(model: Model, quant: Quantization, gpu: GPU | None, kv_cache_dtype: str = "auto") -> str | None:
    """Why this variant (with this KV cache) cannot run on `gpu` (None: a CPU node) at all; None when it can."""
    runtime = quant.runtime
    rel = release_for(model, runtime)
    if rel is None:
        pinned = ", ".join(r.title for r in releases() if r.engine == runtime)
        return f"no pinned {ENGINE_NAMES[runtime]} release serves {model.architecture} ({pinned})"
    if runtime == "vllm" and gpu is None:
        return f"{rel.title} needs a GPU"
    if rel.image(_vendor(gpu)) is None:
        return f"{rel.title}: no pinned image for {_vendor(gpu)} ({', '.join(sorted(rel.images))} only)"
    if not _meets(rel.image_min_compute_capability, gpu):
        assert gpu is not None
        return (f"{rel.title}: its image has no kernels below compute capability {rel.image_min_compute_capability}; "
                f"{gpu.product} has {gpu.compute_capability}")
    if runtime == "vllm":
        if kernel_for(rel, model, quant, gpu) is None:
            return _kernel_refusal(rel, model, quant, gpu)
    if kv_cache_dtype != "auto":
        if _vendor(gpu) not in rel.kv_vendors:
            return f"{rel.title}: no quantized KV cache on {_vendor(gpu)}"
        if not _meets(rel.kv_min_compute_capability, gpu):
            assert gpu is not None
            return (f"{rel.title}: no quantized KV cache below compute capability {rel.kv_min_compute_capability}; "
                    f"{gpu.product} has {gpu.compute_capability}")
    return None


# --- Checking a command line against the release ---------------------------------------------------------


def rejected_arguments(rel: EngineRelease, args: Iterable[str]) -> list[str]:
    """What in `args` the release's CLI would refuse: unknown options, missing values, values outside the
    choices, stray positionals. Empty when the release would accept the command line. An option of `nargs`
    "+" (vLLM's list fields, --lora-modules) takes every value that follows it up to the next option."""
    options = rel.options
    problems: list[str] = []
    args = list(args)
    i = 0
    if rel.model_argument == "positional":
        if not args or args[0].startswith("-"):
            problems.append(f"{rel.title} takes the model as its first argument")
        else:
            i = 1
    while i < len(args):
        token = args[i]
        name, eq, inline = token.partition("=")
        spec = options.get(name) if name.startswith("-") else None
        if spec is None or spec.get("server") is False:  # (llama.cpp's arg.cpp serves several tools)
            problems.append(f"{rel.title} has no option {name!r}" if name.startswith("-")
                            else f"{rel.title}: unexpected argument {token!r}")
            i += 1
            continue
        if not spec["takesValue"]:
            if eq:
                problems.append(f"{rel.title}: {name} takes no value")
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            problems.append(f"{rel.title}: {name} needs a value")
            break
        values = [value]
        if spec.get("nargs") == "+" and not eq:  # argparse takes every value up to the next option
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
        choices = spec.get("choices")
        for value in values:
            if choices is not None and value not in choices:
                problems.append(f"{rel.title}: {name} {value!r} is not one of {', '.join(map(str, choices))}")
    return problems


def catalog_problems() -> list[str]:
    """Inconsistencies between the catalogs (a kernel a quantization names that a release lacks, a model no
    release serves): what a test asserts empty."""
    problems = []
    catalog = load_catalog()
    for m in catalog.models.values():
        for qid in m.variants():
            q = catalog.quantizations[qid]
            rel = release_for(m, q.runtime)
            if rel is None:
                if q.runtime == "vllm" or m.gguf is not None:
                    problems.append(f"{m.id} {qid}: no {q.runtime} release serves {m.architecture}")
                continue
            for kid in kernel_ids(m, q) if q.runtime == "vllm" else ():
                if kid not in rel.kernels:
                    problems.append(f"{m.id} {qid}: {rel.id} has no kernel {kid}")
    return problems
