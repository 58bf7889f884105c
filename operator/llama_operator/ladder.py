"""The fallback ladder (docs/fallback.md): the rungs the planner walks, best first.

1. the requested model at its best quality tier (16-bit), then its lower tiers (8, 6, 5, 4 bits; 3 and
   2 bits only when listed in fallback.quantizations); right after a tier, the same variants decoding with a
   draft model (speculative decoding, docs/speculative.md) when the tier failed on time per output token alone
   (mode Auto; mode On drafts on every rung that can, Off never): a draft changes no answer, so it comes
   before any loss of quality;
2. the same tiers again with an 8-bit KV cache (vLLM fp8, llama.cpp q8_0), when allowed and the cache is what
   does not fit;
3. the next smaller model of the same capability (a vision request stays vision), never below the floor,
   and so on down.

Which rungs come next depends on the candidates tried so far (the caller's list, which it extends as it walks):
the planner (planner.py) checks every candidate of a rung before asking for the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from .api import LlamaDeploymentSpec
from .candidate import Candidate
from .catalog import Model, Quantization, load_catalog
from .finetune import custom_weights_quantizations, pins_base_model
from .multinode import NO_SPAN_PREFIX
from .speculation import chosen_draft

#: Bits below which a quantization is used only when the spec lists it ("down to 4-bit by default").
DEFAULT_MIN_BITS = 4
#: How the reason of a candidate that missed its time-per-output-token target starts (planner._fixed_verdict).
TPOT_MISSED = "predicted TPOT "


def ladder_models(spec: LlamaDeploymentSpec) -> list[Model]:
    """The requested model, then smaller ones of the same capability down to the floor (largest first).

    Models of one size share one rung (Llama 3.3 70B and 3.1 70B need the same memory), so only the
    newest of a size is offered as a fallback.
    """
    catalog = load_catalog()
    requested = catalog.model(spec.model)
    out = [requested]
    if not spec.fallback.allowSmallerModels or pins_base_model(spec):
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
    """The model's variants the spec allows: published ones, or a fine-tune's own (spec.weights)."""
    catalog = load_catalog()
    listed = spec.fallback.quantizations
    out = []
    variants = model.variants() if spec.weights is None else custom_weights_quantizations(
        spec, [q.id for q in catalog.quantizations.values() if q.runtime == "llamacpp"])
    for qid in variants:
        q = catalog.quantizations[qid]
        if spec.runtime != "auto" and q.runtime != spec.runtime:
            continue
        if listed is not None:
            if qid not in listed:
                continue
        elif q.bits < DEFAULT_MIN_BITS and spec.weights is None:  # (a fine-tune's GGUF file is the user's choice)
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


def kv_dtype(quant: Quantization) -> str:
    return "fp8" if quant.runtime == "vllm" else "q8_0"


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder: the variants of one quality tier of a model, with the model's own KV cache
    or an 8-bit one."""

    model: Model
    tier: list[Quantization]
    kv_8bit: bool
    draft: bool = False  # its variants decode with a draft model (speculation.chosen_draft)

    @property
    def label(self) -> str:
        kv = " with 8-bit KV cache" if self.kv_8bit else ""
        draft = " with a draft" if self.draft else ""
        return f"{self.model.id} {'/'.join(q.id for q in self.tier)}{kv}{draft}"


def rungs(spec: LlamaDeploymentSpec, tried: list[Candidate], drafts_off: bool = False) -> Iterator[Rung]:
    """The ladder's rungs in order: each model's quality tiers (best first), each followed by its draft rung
    when it failed on time per output token alone (mode Auto, unless `drafts_off`: the SLO loop turned drafts
    off), then the same tiers with an 8-bit KV cache when the spec allows it and the candidates tried so far
    show that the cache is what does not fit (`tried`: the caller's list, which it extends as it walks the
    rungs). Mode On: every rung of a model that has a draft drafts."""
    mode = spec.speculative.mode
    for model in ladder_models(spec):
        tiers = quality_tiers(allowed_quantizations(spec, model))
        has_draft = chosen_draft(spec, model) is not None
        always = mode == "On" and has_draft
        for tier in tiers:
            before = len(tried)
            yield Rung(model, tier, False, always)
            if mode == "Auto" and has_draft and not drafts_off and tpot_is_the_problem(tried[before:]):
                yield Rung(model, tier, False, True)
        if spec.fallback.allowKVCacheQuantization and kv_is_the_problem(tried):
            for tier in tiers:
                yield Rung(model, tier, True, always)


def kv_is_the_problem(candidates: list[Candidate]) -> bool:
    """True when some candidate failed on memory alone and its KV cache is a large share of its memory: an
    8-bit KV cache only helps when the cache is what does not fit. A replica spanning nodes stands for the
    one-node attempt no node held: whatever kept it out (LeaderWorkerSet, free nodes) but the SLO counts so."""
    for c in candidates:
        if c.estimate is None or c.kv_cache_dtype != "auto":
            continue
        memory_only = all(r.startswith(("needs ", NO_SPAN_PREFIX)) or "per GPU" in r  # a replica spanning nodes
                          or (c.nodes_per_replica > 1 and not r.startswith("predicted ")) for r in c.reasons)
        if memory_only and c.estimate.kv_cache_bytes >= 0.25 * c.estimate.total_bytes:
            return True
    return False


def tpot_is_the_problem(candidates: list[Candidate]) -> bool:
    """True when some candidate failed on its time per output token alone: it fits, it has the GPUs, it meets
    the time to first token. A draft lowers time per output token only, and adds memory: it is tried for such
    a variant, not for one that does not fit."""
    return any(c.estimate is not None and c.reasons and all(r.startswith(TPOT_MISSED) for r in c.reasons)
               for c in candidates)
