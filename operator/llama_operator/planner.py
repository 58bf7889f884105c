"""The planner: from a LlamaDeployment spec and the cluster's inventory, the variant to run and why.

Pure and deterministic. It walks the fallback ladder rung by rung (ladder.py, docs/fallback.md): the requested
model's quality tiers best first, each followed by the same variants with a draft model when time per output
token is what failed (drafts.py), then an 8-bit KV cache, then smaller models.

Within a rung every candidate (variant x runtime x hardware pool x GPUs per replica) is estimated and
checked against the hard limits: the support matrix, the memory budget, GPU memory, free GPUs, the SLO.
The first rung with a feasible candidate wins, and among its candidates the cheapest: CPU (when it
meets the SLO), then fewer GPUs, then smaller GPUs. Every rejected candidate keeps its reasons, and every
variant a rung considers is a candidate: one that no pool can run (vLLM where only CPU nodes match the
placement, anything where no node does) is listed on a stand-in pool ("no GPU node", "no matching node")
with why. Which nodes form the pools is placement's (placement.py); what one candidate is, candidate.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Collection, Mapping

from .api import LlamaDeploymentSpec
from .candidate import Candidate, Plan
from .catalog import Model, Quantization, load_catalog
from .drafting import DraftChoice
from .drafts import MeasuredAcceptance, draft_for, draft_limits, gain_problem, with_draft
from .engines import support_problem
from .finetune import finetune_support_problem, pins_base_model, source_problem
from .estimate import VLLM_MAX_GPU_MEMORY_UTILIZATION, Estimate, Hardware, Workload, estimate, host_requests
from .inventory import Inventory
from .ladder import TPOT_MISSED, Rung, ladder_models, rungs
from .ladder import kv_dtype as kv_dtype_of
from .multinode import across_nodes, out_of_one_node, span_problem
from .pipeline import estimate_pipeline
from .placement import DEFAULT_FORBIDDEN_TOLERATIONS, NO_GPU_NODE, NO_NODE, Pool, build_pools
from .status import variant_name
from .units import format_bytes, format_seconds

__all__ = ["Corrections", "Plan", "STATUS_REJECTED_LIMIT", "check_choice", "ladder_models", "plan", "rank"]
#: llama.cpp on GPU loads everything it is given; leave the driver a little room.
LLAMACPP_MAX_GPU_MEMORY_FRACTION = 0.95
#: Tensor-parallel sizes vLLM supports for Llama (they must divide the KV heads).
VLLM_TP_SIZES = (1, 2, 4, 8)
#: GPUs one llama.cpp replica may split layers over.
LLAMACPP_MAX_GPUS = 8
#: How many rejected candidates status carries (the CLI shows them all).
STATUS_REJECTED_LIMIT = 20

#: Observed over estimated latency per (variant "model/quantization", hardware as Candidate.hardware names it):
#: (TTFT factor, TPOT factor). The SLO loop learns them from sustained breaches (slo.py); the planner multiplies
#: the estimates of exactly that variant on exactly that hardware by them, before judging the SLO.
Corrections = Mapping[tuple[str, str], tuple[float, float]]
NO_CORRECTION = (1.0, 1.0)


# --- Checking one candidate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    """What a candidate's verdict depends on besides the hardware and the free capacity."""

    budget_bytes: int
    ttft_seconds: float
    tpot_seconds: float
    ttft_text: str
    tpot_text: str

    @classmethod
    def of(cls, spec: LlamaDeploymentSpec) -> "_Limits":
        return cls(spec.memory_budget_bytes, spec.slo.ttft_seconds, spec.slo.tpot_seconds,
                   spec.slo.ttftP95, spec.slo.tpotP95)


@dataclass(frozen=True)
class _FixedVerdict:
    """A candidate's estimate and its verdict on everything but free capacity. The same variant on the same
    hardware under the same limits always gets the same one, so it is computed once (see _fixed_verdict):
    every pass re-plans, and deployments alike in spec plan alike."""

    estimate: Estimate | None
    before: tuple[str, ...]  # reasons listed before the capacity one (support, budget, GPU memory)
    after: tuple[str, ...]  # and after it (the SLO)
    shortfall: float  # the largest needed/available ratio, capacity aside
    cpu_millis: int = 0  # host requests of one replica, for the capacity check
    memory_bytes: int = 0


@lru_cache(maxsize=65536)
def _fixed_verdict(model: Model, quant: Quantization, hw: Hardware, workload: Workload,
                   limits: _Limits, correction: tuple[float, float] = NO_CORRECTION,
                   adapter_ranks: tuple[int, ...] = (), in_flight: bool = False, nodes: int = 1,
                   network_gbps: float = 0.0, draft: DraftChoice | None = None,
                   auto_draft: bool = False) -> _FixedVerdict:
    """`draft`: decode with it (`auto_draft`: only when it gains the catalog's minimum, mode Auto)."""
    gpu, runtime = hw.gpu, quant.runtime
    problem = support_problem(model, quant, gpu, workload.kv_cache_dtype) or \
        finetune_support_problem(model, quant, gpu, bool(adapter_ranks), in_flight) or \
        (support_problem(draft.model, draft.quant, gpu, workload.kv_cache_dtype) if draft else None)
    if problem:
        return _FixedVerdict(None, (problem,), (), float("inf"))
    e = estimate(model, quant, hw, workload, adapter_ranks=adapter_ranks, in_flight=in_flight) if nodes == 1 else \
        estimate_pipeline(model, quant, hw, workload, nodes, network_gbps, adapter_ranks=adapter_ranks,
                          in_flight=in_flight)
    gain = None
    if draft is not None:
        e = with_draft(model, quant, hw, workload, draft, e)
        gain = gain_problem(e, draft, workload.concurrency) if auto_draft else None
    if correction != NO_CORRECTION:
        e = replace(e, ttft_seconds=e.ttft_seconds * correction[0], tpot_seconds=e.tpot_seconds * correction[1])
    before, after = [], []
    ratios = [e.total_bytes / limits.budget_bytes]
    if e.total_bytes > limits.budget_bytes:
        adapters = f", adapters {format_bytes(e.adapter_bytes)}" if e.adapter_bytes else ""
        before.append(f"needs {format_bytes(e.total_bytes)} per replica > memory budget "
                      f"{format_bytes(limits.budget_bytes)} (weights {format_bytes(e.weights_bytes)}{adapters}, "
                      f"KV cache {format_bytes(e.kv_cache_bytes)})")
    if gpu is not None:
        fraction = VLLM_MAX_GPU_MEMORY_UTILIZATION if runtime == "vllm" else LLAMACPP_MAX_GPU_MEMORY_FRACTION
        usable = gpu.memory_bytes * fraction
        ratios.append(e.per_gpu_bytes / usable)
        if e.per_gpu_bytes > usable:
            before.append(f"needs {format_bytes(e.per_gpu_bytes)} per GPU > {format_bytes(usable)} usable on "
                          f"{gpu.product}")
        cpu_millis, memory_bytes = host_requests(runtime, hw.gpu_count, 0, e.total_bytes, e.adapter_host_bytes)
    else:
        cpu_millis, memory_bytes = host_requests(runtime, 0, hw.cpu_cores, e.total_bytes)
    ratios.append(e.ttft_seconds / limits.ttft_seconds)
    ratios.append(e.tpot_seconds / limits.tpot_seconds)
    observed = " (corrected by what was observed)" if correction != NO_CORRECTION else ""
    if e.ttft_seconds > limits.ttft_seconds:
        after.append(f"predicted TTFT {format_seconds(e.ttft_seconds)}{observed} > SLO {limits.ttft_text}")
    if e.tpot_seconds > limits.tpot_seconds:
        after.append(f"{TPOT_MISSED}{format_seconds(e.tpot_seconds)}{observed} > SLO {limits.tpot_text}")
    if gain:
        after.append(gain)
    return _FixedVerdict(e, tuple(before), tuple(after), max(ratios), cpu_millis, memory_bytes)


def _check(c: Candidate, spec: LlamaDeploymentSpec, workload: Workload, limits: _Limits | None = None,
           corrections: Corrections | None = None, draft: DraftChoice | str | None = None) -> None:
    """Estimate `c` and give its verdict, into it. `draft`: the draft it decodes with, or why it cannot."""
    gpu = c.pool.gpu
    if isinstance(draft, str):
        c.reasons.append(draft)
        return
    c.draft = draft
    if spec.weights is not None:
        c.custom_weights = spec.weights.source if c.runtime == "vllm" else spec.weights.gguf
    if spec.adapters or spec.weights is not None:
        problem = source_problem(spec, c.model, c.runtime)
        if problem:
            c.reasons.append(problem)
            return
    hw = _hardware(c)
    if corrections:  # a draft's own, else its variant's: a target slower than predicted verifies slower too
        c.correction = corrections.get((c.variant, c.hardware)) or (
            corrections.get((variant_name(c.model.id, c.quant.id), c.hardware)) if c.draft else None)
    fixed = _fixed_verdict(c.model, c.quant, hw, workload, limits or _Limits.of(spec), c.correction or NO_CORRECTION,
                           tuple(a.rank for a in spec.adapters), spec.weights is not None, c.nodes_per_replica,
                           c.pool.network_gbps, draft, spec.speculative.mode == "Auto")
    c.reasons.extend(fixed.before)
    if fixed.estimate is None:  # the hardware cannot run the format: nothing else to say
        return
    c.estimate = fixed.estimate
    nodes = c.nodes_per_replica  # a replica spanning nodes: one pod on each (they hold every GPU of a node)
    placements = c.pool.slots(c.gpus_per_replica, fixed.cpu_millis, fixed.memory_bytes)
    slots = placements // nodes
    if slots < spec.replicas:
        if nodes > 1:
            c.reasons.append(f"{spec.replicas} replica(s) need {nodes} nodes each with {c.gpus_per_replica} free "
                             f"{gpu.product} GPU(s), {fixed.cpu_millis / 1000:g} cores and "
                             f"{format_bytes(fixed.memory_bytes)} RAM; only {placements} such node(s) are free")
        elif gpu is not None:
            c.reasons.append(f"{spec.replicas} replica(s) need {c.gpus_per_replica} free {gpu.product} GPU(s), "
                             f"{fixed.cpu_millis / 1000:g} cores and {format_bytes(fixed.memory_bytes)} RAM on one "
                             f"node each; only {slots} such placement(s) are free")
        else:
            c.reasons.append(f"{spec.replicas} replica(s) need {c.cpu_threads} free cores and "
                             f"{format_bytes(fixed.estimate.total_bytes)} RAM on one node each; only {slots} "
                             f"such node slot(s)")
    c.reasons.extend(fixed.after)
    c.shortfall = max(fixed.shortfall, spec.replicas / slots if slots else float("inf"))


def _gpu_counts(quant: Quantization, model: Model, pool: Pool) -> list[int]:
    if pool.gpu is None:
        return [0]
    top = pool.max_gpus_per_node
    if quant.runtime == "vllm":
        return [n for n in VLLM_TP_SIZES if n <= top and model.arch.kv_heads % n == 0 and model.arch.heads % n == 0]
    return list(range(1, min(top, LLAMACPP_MAX_GPUS) + 1))


def _best_of(attempts: list[Candidate]) -> Candidate:
    """One line per (variant, pool): the cheapest feasible GPU count, else the attempt closest to working."""
    feasible = [a for a in attempts if a.feasible]
    if feasible:
        return min(feasible, key=lambda a: a.gpus_per_replica)
    return min(attempts, key=lambda a: (a.shortfall, a.gpus_per_replica))


def _rung_candidates(spec: LlamaDeploymentSpec, rung: Rung, index: int, pools: list[Pool], base: Workload,
                     limits: _Limits, corrections: Corrections | None, lws: bool = False,
                     measured: MeasuredAcceptance | None = None) -> list[Candidate]:
    """Every variant of the rung, checked: one candidate per pool that can run it (the fewest GPUs that
    work, else the count closest to working; when no node of any pool holds it, a replica spanning nodes,
    multinode.py),
    or one on a stand-in pool saying why none can. `lws`: the cluster has LeaderWorkerSet. A draft rung's
    candidates decode with the draft (drafts.draft_for; `measured`: the SLO loop's acceptance) on one node."""
    out = []
    for quant in rung.tier:
        draft = draft_for(spec, rung.model, quant, measured) if rung.draft else None
        kv_dtype = kv_dtype_of(quant) if rung.kv_8bit else "auto"
        workload = base if kv_dtype == "auto" else replace(base, kv_cache_dtype=kv_dtype)
        tried = []
        for pool in pools:
            if pool.gpu is None and quant.runtime == "vllm":
                continue  # vLLM serves on GPUs only: no attempt on a CPU pool
            attempts = []
            for n in _gpu_counts(quant, rung.model, pool):
                c = Candidate(rung.model, quant, kv_dtype, pool, n, index)
                _check(c, spec, workload, limits, corrections, draft)
                attempts.append(c)
                if c.feasible:
                    break  # _best_of takes the fewest GPUs that work: larger counts never win
            if attempts:
                tried.append(attempts)
        # A replica spans nodes only when no node of the cluster holds the variant (whether or not that node's
        # GPUs are free): one node is always the better way to run the same variant.
        # A draft is planned on one node only (docs/speculative.md).
        one_node_holds = rung.draft or any(c.estimate is not None and not out_of_one_node(c) for a in tried for c in a)
        for attempts in tried:
            best = _best_of(attempts)
            out.append(best if one_node_holds else across_nodes(
                best, attempts[-1], lws, lambda c, w=workload: _check(c, spec, w, limits, corrections)))
        placed = bool(tried)
        if not placed:  # still a candidate, on a stand-in pool, saying why nothing could run it
            out.append(_unplaceable(spec, rung.model, quant, kv_dtype, index, bool(pools)))
    return out


def plan(spec: LlamaDeploymentSpec, inventory: Inventory, *,
         forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS,
         corrections: Corrections | None = None, measured: MeasuredAcceptance | None = None,
         drafts_off: str | None = None) -> Plan:
    """Choose what to run for `spec` on `inventory`, with the verdict and reasons for every candidate tried.
    `forbidden_tolerations`: taint keys the spec's tolerations do not count for (placement.effective_tolerations);
    `corrections`: observed over estimated latency of variants on hardware (the SLO loop's); `measured`: per-token
    acceptance of draft pairs the SLO loop measured; `drafts_off`: why the SLO loop turned drafts off (mode Auto:
    no draft rung is tried)."""
    pools, notes = build_pools(spec, inventory, forbidden_tolerations)
    base = Workload(context_length=spec.contextLength, concurrency=spec.slo.concurrency,
                    prompt_tokens=spec.slo.promptTokens)
    limits = _Limits.of(spec)
    candidates: list[Candidate] = []
    chosen: Candidate | None = None
    rung_labels: list[str] = []
    if not pools:
        notes.append("no ready node matches the placement (nodeSelector, tolerations, gpuProducts)")
    pinned = pins_base_model(spec)
    if pinned:
        notes.append(f"{spec.model} is pinned: {pinned}; no smaller model is tried")
    off = bool(drafts_off) and spec.speculative.mode == "Auto"
    if off:
        notes.append(f"drafts are off: {drafts_off}")
    walked: list[Rung] = []
    for index, rung in enumerate(rungs(spec, candidates, off)):
        walked.append(rung)
        rung_labels.append(rung.label)
        rung_candidates = _rung_candidates(spec, rung, index, pools, base, limits, corrections,
                                           inventory.leaderworkerset, measured)
        rung_candidates.sort(key=Candidate.cost_key)
        candidates.extend(rung_candidates)
        feasible = [c for c in rung_candidates if c.feasible]
        if feasible:
            chosen = feasible[0]
            chosen.verdict = "chosen"
            for other in feasible[1:]:
                other.verdict = "feasible"
            if chosen.draft is not None:
                chosen.draft_limits = _draft_limits(chosen, spec, base)
            break
    return Plan(
        requested_model=spec.model,
        feasible=chosen is not None,
        chosen=chosen,
        candidates=candidates,
        # A draft on the first rung's variants changes no answer: not a fallback (though the reason says why).
        fallback=chosen is not None and chosen.rung > (1 if walked[chosen.rung].draft and not walked[0].draft else 0),
        fallback_reason=_fallback_reason(candidates, chosen, rung_labels, notes)
        + (f" | {spec.model} is pinned: {pinned}" if pinned and chosen is None else ""),
        notes=notes,
    )


def _hardware(c: Candidate) -> Hardware:
    """What one replica of `c` runs on, as the estimator takes it (on each node, for a replica spanning nodes)."""
    if c.pool.gpu is None:
        return Hardware(gpu=None, cpu_cores=c.cpu_threads, cpu_bandwidth_gbps=c.pool.cpu_bandwidth_gbps)
    return Hardware(gpu=c.pool.gpu, gpu_count=c.gpus_per_replica)


def _draft_limits(c: Candidate, spec: LlamaDeploymentSpec, base: Workload) -> tuple[float | None, int | None]:
    """The chosen draft's limits for the SLO loop (drafts.draft_limits), on the estimates without corrections."""
    hw = _hardware(c)
    workload = replace(base, kv_cache_dtype=c.kv_cache_dtype)

    def base_of(w: Workload) -> Estimate:
        return estimate(c.model, c.quant, hw, w, in_flight=spec.weights is not None)
    return draft_limits(c.model, c.quant, hw, workload, c.estimate, c.draft, base_of)  # type: ignore[arg-type]


def _unplaceable(spec: LlamaDeploymentSpec, model: Model, quant: Quantization, kv_dtype: str, rung: int,
                 any_pool: bool) -> Candidate:
    """The candidate of a variant that no pool can run: vLLM where only CPU nodes match the placement, or
    anything where no node matches at all. It is rejected, on a stand-in pool (hardware "no GPU node" or
    "no matching node"), with the reasons. Only such variants pay for this: no per-node work."""
    reasons = []
    needs_gpu = quant.runtime == "vllm" or not spec.fallback.allowCPU
    if quant.runtime == "vllm":
        reasons.append(support_problem(model, quant, None, kv_dtype) or f"{quant.runtime} needs a GPU")
    if needs_gpu:
        gpu_reason = "no ready GPU node matches the placement"
        if not spec.fallback.allowCPU and quant.runtime != "vllm":
            gpu_reason += " (fallback.allowCPU is false: CPU nodes do not count)"
        reasons.append(gpu_reason)
    else:
        assert not any_pool  # with a CPU or GPU pool, llama.cpp always has an attempt
        reasons.append("no ready node matches the placement")
    return Candidate(model, quant, kv_dtype, NO_GPU_NODE if needs_gpu else NO_NODE, 0, rung, reasons=reasons)


def _fallback_reason(candidates: list[Candidate], chosen: Candidate | None, rung_labels: list[str],
                     notes: list[str]) -> str:
    """Why the rungs above the chosen one did not work: the closest candidate's reasons, per rung."""
    if chosen is not None and chosen.rung == 0:
        return ""
    parts = []
    last = chosen.rung if chosen else len(rung_labels)
    for rung in range(last):
        rejected = [c for c in candidates if c.rung == rung]  # never empty: every variant is a candidate
        # The candidate closest to working explains the rung best; a support-matrix refusal (no
        # estimate, infinite shortfall) says less than a limit missed on hardware that can run the format.
        closest = min(rejected, key=lambda c: (c.shortfall, c.cost_key()))
        parts.append(f"{rung_labels[rung]}: {closest.hardware}: {'; '.join(closest.reasons)}")
    if not parts and notes:
        parts = list(notes)
    head = "" if chosen is None else f"chose {chosen.describe()} because "
    shown = parts[:4] + ([f"and {len(parts) - 4} more rung(s)"] if len(parts) > 4 else [])
    return head + " | ".join(shown)


# --- Judging a plan already in force ---------------------------------------------------------------------


def rank(spec: LlamaDeploymentSpec, chosen) -> tuple:
    """Where a plan (status.ChosenPlan) stands on this spec's ladder: smaller is better.

    (model position, 8-bit KV cache, quality tier, draft, nodes, GPUs, GPU memory): on one rung, one node before
    several; a tier's variant before the same with a draft (mode Auto; mode On the other way round); a plan off
    the ladder (the spec changed since, or drafts where mode is Off) ranks last.
    """
    catalog = load_catalog()
    models = [m.id for m in ladder_models(spec)]
    drafting = chosen.speculative is not None
    if chosen.model not in models or chosen.quantization not in catalog.quantizations or \
            (drafting and spec.speculative.mode == "Off"):
        return (len(models), 1, 0, 0, 0, 0, 0.0)
    gpu = catalog.find_gpu(chosen.gpuProduct) if chosen.gpuProduct else None
    return (
        models.index(chosen.model),
        0 if chosen.kvCacheDtype == "auto" else 1,
        -catalog.quantizations[chosen.quantization].quality,
        int(drafting) if spec.speculative.mode != "On" else int(not drafting),
        chosen.nodesPerReplica,
        chosen.gpusPerReplica if chosen.gpuProduct else 0,
        gpu.memory_gib if gpu else 0.0,
    )


def check_choice(spec: LlamaDeploymentSpec, inventory: Inventory, chosen, *,
                 forbidden_tolerations: Collection[str] = DEFAULT_FORBIDDEN_TOLERATIONS,
                 corrections: Corrections | None = None, drafts_off: str | None = None) -> list[str]:
    """Reasons the plan in force (status.ChosenPlan) no longer works on `inventory`; empty while it does.

    The operator keeps a working plan until a better one has been stable for a while, but moves at once
    when the one in force has lost its hardware, or its draft (`drafts_off`: the SLO loop turned drafts off).
    A draft in force is judged with the catalog's acceptance: the acceptance measured takes a draft away only
    through the SLO loop, once it has lasted the loop's window (slo.judge), never on one reading.
    """
    catalog = load_catalog()
    if chosen.model not in catalog.models or chosen.quantization not in catalog.quantizations:
        return [f"{chosen.model} {chosen.quantization} is no longer in the catalog"]
    model = catalog.model(chosen.model)
    quant = catalog.quantizations[chosen.quantization]
    pools, _ = build_pools(spec, inventory, forbidden_tolerations)
    if chosen.gpuProduct:
        pool = next((p for p in pools if p.gpu is not None and p.gpu.product == chosen.gpuProduct), None)
    else:
        pool = next((p for p in pools if p.gpu is None and p.cpu_bandwidth_gbps == chosen.cpuMemoryBandwidthGbps),
                    None)
    if pool is None:
        return [f"no ready node of {chosen.gpuProduct or 'the planned CPU shape'} matches the placement any more"]
    workload = Workload(spec.contextLength, spec.slo.concurrency, spec.slo.promptTokens,
                        chosen.kvCacheDtype)  # type: ignore[arg-type]
    c = Candidate(model, quant, chosen.kvCacheDtype, pool, chosen.gpusPerReplica, rung=0,
                  nodes_per_replica=chosen.nodesPerReplica)
    draft = None
    if chosen.speculative is not None:
        if drafts_off and spec.speculative.mode == "Auto":
            return [f"the draft was turned off: {drafts_off}"]
        draft = draft_for(spec, model, quant)
        if not isinstance(draft, str):
            if draft.model.id != chosen.speculative.draftModel:
                return [f"spec.speculative asks for another draft than {chosen.speculative.draftModel}"]
            draft = replace(draft, tokens=chosen.speculative.numSpeculativeTokens)
    _check(c, spec, workload, corrections=corrections, draft=draft)
    problem = span_problem(c, inventory.leaderworkerset)
    return ([problem] if problem else []) + c.reasons
