"""The planner's drafts (speculative decoding, docs/speculative.md): which draft a rung's variant decodes with,
why a candidate cannot draft, the draft length, and the chosen draft's limits for the SLO loop.

A draft is a rung of its own, right after the variant it drafts for (ladder.rungs): the same model and
quantization, so the same answers, decoding faster where a step is bound by reading the weights. In mode Auto it
is tried only when the variant failed on time per output token alone, and kept only when predicted at least
`speculation.yaml minSpeedup` faster at the planned concurrency; mode On drafts every rung that can; Off never.
The planner imports this module, never the reverse.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from .api import LlamaDeploymentSpec
from .catalog import Model, Quantization, load_catalog
from .drafting import DraftChoice, DraftEstimate, acceptance_rate, estimate_with_draft
from .engines import release_for
from .estimate import Estimate, Hardware, Workload
from .speculation import chosen_draft

#: Per-token acceptance the SLO loop measured, per (target id, draft id): it replaces the catalog's figure.
MeasuredAcceptance = Mapping[tuple[str, str], float]
#: The most requests per replica draft_limits looks at.
MAX_CONCURRENCY = 1024


def draft_quantization(target_quant: Quantization, draft: Model) -> Quantization | None:
    """The draft's variant: vLLM loads the draft in the target's format when the draft is published in it (an FP8
    target, an FP8 draft), else its 16-bit checkpoint; llama.cpp its Q8_0 file (the published 8B/1B pair ran Q8_0
    drafts). None: the draft is published in neither."""
    catalog = load_catalog()
    if target_quant.runtime == "vllm":
        for qid in (target_quant.id, "bf16"):
            if qid in draft.vllm_repos:
                return catalog.quantizations[qid]
        return None
    if draft.gguf is None or "q8_0" in draft.gguf.unpublished:
        return None
    return catalog.quantizations["q8_0"]


def draft_for(spec: LlamaDeploymentSpec, model: Model, quant: Quantization,
              measured: MeasuredAcceptance | None = None) -> DraftChoice | str:
    """The draft `spec` asks for on a variant of `model`, or why it cannot draft (a reason for the candidate)."""
    draft = chosen_draft(spec, model)
    if draft is None:
        return f"no catalog model smaller than {model.id} shares its tokenizer, so nothing can draft for it"
    rel = release_for(model, quant.runtime)
    if rel is None or rel.speculative is None:
        title = rel.title if rel else quant.runtime
        why = f" ({rel.speculative_refused.strip()})" if rel and rel.speculative_refused else ""
        return f"{title} does not decode with a draft model{why}"
    if spec.adapters and rel.speculative.lora_refused:
        return f"{rel.title} does not draft for LoRA adapters: {rel.speculative.lora_refused.strip()}"
    draft_quant = draft_quantization(quant, draft)
    if draft_quant is None:
        return f"{draft.id} is not published in a format {rel.title} can draft with"
    facts = load_catalog().speculation
    seen = (measured or {}).get((model.id, draft.id))
    alpha = seen if seen is not None else facts.pair(model.id, draft.id).alpha
    return DraftChoice(draft, draft_quant, spec.speculative.numSpeculativeTokens, alpha, measured=seen is not None)


def with_draft(model: Model, quant: Quantization, hw: Hardware, workload: Workload, choice: DraftChoice,
               base: Estimate) -> DraftEstimate:
    """The estimate with the draft: at the length asked for, else the length predicted fastest (the shorter on a
    tie) up to the catalog's maxDraftTokens."""
    lengths = [choice.tokens] if choice.tokens else range(1, load_catalog().speculation.max_draft_tokens + 1)
    best = None
    for k in lengths:
        e = estimate_with_draft(model, quant, choice.model, choice.quant, hw, workload, choice.alpha, k, base=base)
        if best is None or e.tpot_seconds < best.tpot_seconds * (1 - 1e-9):
            best = e
    assert best is not None
    return best


def gain_problem(e: DraftEstimate, choice: DraftChoice, concurrency: int) -> str | None:
    """Mode Auto: why a draft predicted to gain less than the catalog's minimum is not planned; None when it gains
    enough."""
    minimum = load_catalog().speculation.min_speedup
    if e.speedup >= minimum:
        return None
    source = "measured" if choice.measured else "published"
    return (f"a {choice.model.id} draft of {e.draft_tokens} tokens is predicted only {e.speedup:.2f}x faster at "
            f"concurrency {concurrency} (acceptance {e.acceptance:.2f} per token, {source}); Auto drafts from "
            f"{minimum:g}x")


def draft_limits(model: Model, quant: Quantization, hw: Hardware, workload: Workload, e: DraftEstimate,
                 choice: DraftChoice, base_of) -> tuple[float | None, int | None]:
    """(minimum acceptance rate, most requests per replica) at which the chosen draft still gains the catalog's
    minimum, for the SLO loop: the rate is accepted over drafted tokens, what the engines count, found by bisection
    on the per-token acceptance at the planned concurrency; the requests by doubling then bisection at the planned
    acceptance. `base_of(workload)`: the target's estimate without the draft at that workload."""
    minimum = load_catalog().speculation.min_speedup
    k = e.draft_tokens

    def gain(alpha: float, w: Workload) -> float:
        return estimate_with_draft(model, quant, choice.model, choice.quant, hw, w, alpha, k, base=base_of(w)).speedup

    min_rate = None
    if gain(1.0 - 1e-9, workload) >= minimum:
        lo, hi = 0.0, 1.0 - 1e-9  # gain rises with acceptance
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if gain(mid, workload) >= minimum else (mid, hi)
        min_rate = acceptance_rate(hi, k)

    def at(c: int) -> Workload:
        return replace(workload, concurrency=c)

    if gain(choice.alpha, at(1)) < minimum:
        return min_rate, None
    lo, hi = 1, 2
    while hi <= MAX_CONCURRENCY and gain(choice.alpha, at(hi)) >= minimum:
        lo, hi = hi, hi * 2
    if hi > MAX_CONCURRENCY:
        return min_rate, MAX_CONCURRENCY
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if gain(choice.alpha, at(mid)) >= minimum else (lo, mid)
    return min_rate, lo


def keep_draft_length(spec: LlamaDeploymentSpec, in_force) -> LlamaDeploymentSpec:
    """The spec to plan with while a plan with a draft is in force (status.ChosenPlan): its draft length, when the
    spec leaves the length to the planner. The length is chosen when a draft is planned and kept while it runs,
    so an acceptance measured a little higher or lower refreshes the prediction without rolling the servers out
    for another length."""
    if in_force is None or in_force.speculative is None or spec.speculative.numSpeculativeTokens is not None:
        return spec
    kept = spec.speculative.model_copy(update={"numSpeculativeTokens": in_force.speculative.numSpeculativeTokens})
    return spec.model_copy(update={"speculative": kept})

