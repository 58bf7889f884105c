"""`llama-operator plan`'s table: the chosen plan with its prediction and why, then every candidate tried."""
from __future__ import annotations

from . import api
from .lora import vllm_lora_settings
from .units import format_bytes, format_seconds


def adapter_summary(spec: api.LlamaDeploymentSpec, c) -> str | None:
    """The chosen candidate's adapters, what they take and the flags that size them (None: no adapters)."""
    if not spec.adapters or c.estimate is None:
        return None
    names = ", ".join(f"{a.name} (rank {a.rank})" for a in spec.adapters)
    e = c.estimate
    where = "of RAM" if c.pool.gpu is None else "on the GPUs"
    if c.runtime == "vllm":
        s = vllm_lora_settings(tuple(a.rank for a in spec.adapters), spec.slo.concurrency)
        return (f"{names}: {format_bytes(e.adapter_bytes)} {where} (--max-loras {s.max_loras} at --max-lora-rank "
                f"{s.max_lora_rank}), {format_bytes(e.adapter_host_bytes)} in host memory")
    return f"{names}: {format_bytes(e.adapter_bytes)} {where} (the GGUF files, as f32 at most)"


def _predicted_cells(c) -> tuple[str, str, str]:
    if c.estimate is None:
        return "-", "-", "-"
    e = c.estimate
    return format_bytes(e.total_bytes), format_seconds(e.ttft_seconds), format_seconds(e.tpot_seconds)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _nodes(c) -> str:
    """Nodes per replica, for GPU plans: one, or a LeaderWorkerSet group (pipeline parallel across nodes)."""
    if c.pool.gpu is None:
        return ""
    n = c.nodes_per_replica
    if n == 1:
        return " (1 node)"
    return (f" ({n} nodes: a LeaderWorkerSet group, tensor parallel {c.gpus_per_replica} in each node, pipeline "
            f"parallel {n} across them)")


def render_plan_table(name: str, spec: api.LlamaDeploymentSpec, plan, cluster_label: str) -> str:
    out = []
    slo = spec.slo
    out.append(f"LlamaDeployment {name} on {cluster_label}")
    out.append("")
    out.append(f"  Requested  {spec.model}, {spec.replicas} replica(s), context {spec.contextLength} tokens x "
               f"{slo.concurrency} concurrent")
    out.append(f"  Limits     TTFT p95 <= {slo.ttftP95} (prompt {slo.promptTokens} tokens), TPOT p95 <= {slo.tpotP95}, "
               f"memory budget {format_bytes(spec.memory_budget_bytes)} per replica")
    c = plan.chosen
    if c is None:
        out.append("  Result     INFEASIBLE: no candidate meets every limit")
    else:
        flag = "  [FALLBACK]" if plan.fallback else ""
        out.append(f"  Chosen     {c.model.id} {c.quant.id} on {c.runtime}, {c.hardware} per replica"
                   f"{_nodes(c)}{flag}")
        e = c.estimate
        per_gpu = f", {format_bytes(e.per_gpu_bytes)} per GPU" if c.pool.gpu else " of RAM"
        draft_bytes = getattr(e, "draft_bytes", 0)  # decoding with a draft (drafting.DraftEstimate)
        out.append(f"  Predicted  memory {format_bytes(e.total_bytes)}{per_gpu} (weights {format_bytes(e.weights_bytes)},"
                   + (f" adapters {format_bytes(e.adapter_bytes)}," if e.adapter_bytes else "")
                   + (f" draft {format_bytes(draft_bytes)}," if draft_bytes else "") +
                   f" KV cache {format_bytes(e.kv_cache_bytes)}, overhead {format_bytes(e.overhead_bytes)})")
        out.append(f"             TTFT {format_seconds(e.ttft_seconds)} (limit {slo.ttftP95}), "
                   f"TPOT {format_seconds(e.tpot_seconds)} (limit {slo.tpotP95})")
        startup = getattr(e, "startup_seconds", None)  # a replica spanning nodes (pipeline.PipelineEstimate)
        if startup is not None and c.nodes_per_replica > 1:
            out.append(f"             startup {_duration(startup)} (every node downloads the weights), "
                       f"a pipeline hop {format_seconds(e.hop_seconds)} per token at {e.network_gbps:g} Gbit/s")
        kernel = f", kernel {c.kernel}" if c.kernel else ""
        out.append(f"  Engine     {c.engine}{kernel}")
        if c.kv_cache_dtype != "auto":
            out.append(f"  KV cache   {c.kv_cache_dtype}")
        in_flight = " (16-bit, quantized to " + c.quant.id + " as vLLM loads it)" \
            if c.custom_weights and c.runtime == "vllm" and c.quant.bits < 16 else ""
        out.append(f"  Weights    {c.weights_source()}{in_flight}")
        adapters = adapter_summary(spec, c)
        if adapters:
            out.append(f"  Adapters   {adapters}")
        draft = c.speculative()
        if draft:
            rate, up_to = draft["minAcceptanceRate"], draft["paysUpToConcurrency"]
            out.append(f"  Draft      {draft['draftModel']} {draft['draftQuantization']} ({draft['draftWeightsSource']}), "
                       f"{draft['numSpeculativeTokens']} tokens per step: predicted {draft['predictedSpeedup']:g}x "
                       f"faster at acceptance {draft['acceptance']:g} per token ({draft['acceptanceSource']})")
            if rate is not None or up_to is not None:
                out.append("             pays while " + " and ".join(
                    ([f"more than {rate:.0%} of drafted tokens are accepted"] if rate is not None else [])
                    + ([f"at most {up_to} requests run per replica"] if up_to is not None else [])))
    if plan.fallback_reason:
        out.append("  Why        " + plan.fallback_reason.replace(" | ", "\n             "))
    for note in plan.notes:
        out.append(f"  Note       {note}")
    out.append("")
    headers = ("VERDICT", "MODEL", "QUANT", "RUNTIME", "HARDWARE", "MEMORY", "TTFT", "TPOT")
    rows = []
    for cand in plan.candidates:
        mem, ttft, tpot = _predicted_cells(cand)
        quant = cand.quant.id + (f"+kv:{cand.kv_cache_dtype}" if cand.kv_cache_dtype != "auto" else "") \
            + (f"+draft:{cand.draft.model.id.removeprefix('llama-')}" if cand.draft else "")
        rows.append(((cand.verdict, cand.model.id, quant, cand.runtime, cand.hardware, mem, ttft, tpot), cand.reasons))
    widths = [max([len(h)] + [len(r[0][i]) for r in rows]) for i, h in enumerate(headers)]
    out.append(f"  Candidates tried: {len(plan.candidates)}")
    out.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for cells, reasons in rows:
        out.append("  " + "  ".join(v.ljust(w) for v, w in zip(cells, widths)).rstrip())
        for r in reasons:
            out.append(f"      - {r}")
    return "\n".join(out)
