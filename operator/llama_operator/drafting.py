"""The estimate of a replica that decodes speculatively: a draft model proposes `k` tokens per sequence, the
target checks them in one pass and keeps the accepted ones plus one of its own. Pure functions; the formulas
and their sources are in docs/speculative.md.

* Tokens per target pass: with a per-token acceptance probability alpha (the chance the target accepts a
  drafted token, given it accepted the ones before), a pass yields 1 + alpha + ... + alpha^k =
  (1 - alpha^(k+1)) / (1 - alpha) tokens on average (Leviathan et al. 2023, eq. 1; Chen et al. 2023).
* One speculative step is the target's verifying pass plus `k` draft steps. The verifying pass reads what a
  decode step reads (every weight once, the running sequences' KV cache: the target's decode step, estimate.py)
  and computes k + 1 tokens per sequence instead of one: the k extra tokens' FLOPs are added at the share of
  peak the runtime's kernels reach on a batch of that size (_extra_token_seconds). A draft step is the draft
  model's own decode step at the same concurrency, on the same GPUs, plus (vLLM) a fixed cost per pass.
* Time per output token = (verifying pass + k x draft step) / tokens per pass. As concurrency grows the extra
  tokens' FLOPs grow with it while the weight traffic does not, so the gain shrinks; a long draft pays k draft
  steps for tokens that are rarely all accepted, so past some k it shrinks too.
* Time to first token: the draft prefills the prompt too, and drafts for the first step before the first
  token is returned (vLLM proposes in the same engine step): its prefill and k draft steps are added.
* Memory: the draft's weights and its KV cache for the same sequences, split like the target's over the GPUs;
  llama.cpp also holds the draft's compute buffer, whole on the device that computes the draft (vLLM profiles
  one activation peak for both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .catalog import Model, Quantization
from .cpunode import cpu_flops_rate
from .estimate import (
    DECODE_COMPUTE_EFFICIENCY,
    LLAMACPP_GPU_CONTEXT_BYTES,
    Estimate,
    Hardware,
    Workload,
    _overhead_bytes,
    _vllm_gpu_memory_utilization,
    estimate,
    parameter_counts,
)
from .prefill import VLLM_REQUEST_OVERHEAD_SECONDS, gpu_tflops, llamacpp_fp16_peak, llamacpp_prefill_efficiency

#: vLLM: what one draft pass costs beyond the draft model's own decode step as estimate.py times it (its
#: weights and KV cache at the GPUs' bandwidth, its per-parameter cost): launching the pass, sampling its token,
#: preparing the next pass's inputs. Fitted on the concurrency-1 rows of benchmarks/calibration/
#: speculative-rows.json (vLLM draft_model, Llama 3.3 70B with a Llama 3.2 1B draft, 2x H100, k = 3..8, each run
#: predicted at the acceptance it measured) by benchmarks/calibrate_speculative.py: 1.215 ms (1.205-1.233 ms
#: leaving out any one k). Held out, the speedup at concurrency 2 to 32 is within 9% (overpredicted by 6% or less
#: at each concurrency's median), at 64 overpredicted by 14-20%, where those runs' KV cache was full
#: (tests/unit/test_speculative_calibration.py). The fit is relative to estimate.py's decode step: those GPUs
#: all-reduced without peer-to-peer (their decode step without a draft took 43 ms where estimate.py predicts
#: 28 ms), so where all-reduces are faster, as over NVLink, a draft pass probably costs less and the gain is
#: underpredicted. llama.cpp's decode estimate already has a fixed time per layer.
VLLM_DRAFT_PASS_SECONDS = 0.0012


@dataclass(frozen=True)
class DraftChoice:
    """A draft a candidate decodes with: the draft's variant, the draft length asked for (None: the planner picks
    the fastest), and the per-token acceptance assumed (`measured`: the SLO loop's, else the catalog's)."""

    model: Model
    quant: Quantization
    tokens: int | None
    alpha: float
    measured: bool = False


@dataclass(frozen=True)
class DraftEstimate(Estimate):
    """An Estimate of a replica decoding with a draft, with what the draft adds and what it is predicted to gain."""

    draft_tokens: int = 0  # k, drafted per sequence per step
    acceptance: float = 0.0  # alpha, per drafted token
    tokens_per_pass: float = 1.0  # output tokens one verifying pass yields, on average
    speedup: float = 1.0  # time per output token without the draft over with it, at the workload's concurrency
    draft_bytes: int = 0  # the draft's weights, KV cache and (llama.cpp) compute buffer, part of total_bytes
    draft_step_seconds: float = 0.0
    verify_seconds: float = 0.0


def tokens_per_pass(alpha: float, k: int) -> float:
    """Expected output tokens per verifying pass of `k` drafted tokens at per-token acceptance `alpha`."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def acceptance_rate(alpha: float, k: int) -> float:
    """Accepted over drafted tokens (what the engines count) at per-token acceptance `alpha`: the expected
    accepted tokens of a pass, alpha + ... + alpha^k, over k."""
    return (tokens_per_pass(alpha, k) - 1.0) / k


def alpha_for_rate(rate: float, k: int) -> float:
    """The per-token acceptance that gives `rate` accepted over drafted tokens at draft length `k` (the inverse of
    acceptance_rate, which rises with alpha; bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if acceptance_rate(mid, k) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _extra_token_seconds(target: Model, quant: Quantization, hw: Hardware) -> float:
    """Seconds of one more token per sequence in a verifying pass: its FLOPs at the share of peak the runtime's
    kernels reach on a batch of that size. vLLM: a decode-sized batch (concurrency x (k + 1) tokens, tens to
    hundreds) reaches what its batched decode GEMMs do (estimate.DECODE_COMPUTE_EFFICIENCY), over the
    tensor-parallel GPUs; llama.cpp on GPUs: its prefill share of the FP16-accumulate peak (it runs several
    tokens through its prompt kernels), one GPU at a time as its layer split runs; on CPU: its threads' prefill
    rate."""
    flops = 2 * parameter_counts(target.arch).active_per_token
    if hw.gpu is None:
        return flops / cpu_flops_rate(quant, hw.cpu_cores)
    if quant.runtime == "vllm":
        return flops / (gpu_tflops(hw.gpu, quant) * 1e12 * DECODE_COMPUTE_EFFICIENCY * max(1, hw.gpu_count))
    return flops / (llamacpp_fp16_peak(hw.gpu) * llamacpp_prefill_efficiency(quant))


def speculative_step(base: Estimate, draft: Estimate, target: Model, quant: Quantization, hw: Hardware,
                     concurrency: int, alpha: float, k: int) -> tuple[float, float, float]:
    """(time per output token, verifying pass, tokens per pass) with `k` drafted tokens, from the target's and the
    draft's own estimates at this concurrency."""
    verify = base.tpot_seconds + k * concurrency * _extra_token_seconds(target, quant, hw)
    per_pass = tokens_per_pass(alpha, k)
    draft_step = draft.tpot_seconds + (VLLM_DRAFT_PASS_SECONDS if quant.runtime == "vllm" else 0.0)
    return (verify + k * draft_step) / per_pass, verify, per_pass


def estimate_with_draft(target: Model, quant: Quantization, draft: Model, draft_quant: Quantization, hw: Hardware,
                        workload: Workload, alpha: float, k: int, base: Estimate | None = None) -> DraftEstimate:
    """Memory and latency of one replica of `target` in `quant` decoding with `draft` in `draft_quant`, `k` tokens
    drafted per step at per-token acceptance `alpha` (see the module's docstring). `base`: the target's estimate
    without the draft (its LoRA adapters or fine-tune counted), when the caller has it."""
    base = base or estimate(target, quant, hw, workload)
    d = estimate(draft, draft_quant, hw, workload)  # the same sequences, in the same kind of cache
    tpot, verify, per_pass = speculative_step(base, d, target, quant, hw, workload.concurrency, alpha, k)
    buffer = 0
    if quant.runtime == "llamacpp":  # a second context: its own compute buffer (the CUDA context is the process's)
        buffer = _overhead_bytes(draft, draft_quant, replace(hw, gpu_count=1))[1]
        if hw.gpu is not None:
            buffer -= int(LLAMACPP_GPU_CONTEXT_BYTES)
    held = d.weights_bytes + d.kv_cache_bytes
    draft_bytes = held + buffer
    # split over the GPUs like the target's; the buffer sits whole on the device that computes the draft
    per_gpu = base.per_gpu_bytes + (draft_bytes if hw.is_cpu else math.ceil(held / hw.gpu_count) + buffer)
    # The draft's prefill (its request overhead is the target's, paid once) and its first k proposals.
    draft_prefill = d.ttft_seconds - (VLLM_REQUEST_OVERHEAD_SECONDS if quant.runtime == "vllm" and hw.gpu else 0.0)
    fields = {f: getattr(base, f) for f in Estimate.__dataclass_fields__}
    fields.update(
        total_bytes=base.total_bytes + draft_bytes,
        per_gpu_bytes=per_gpu,
        ttft_seconds=base.ttft_seconds + draft_prefill + k * d.tpot_seconds,
        tpot_seconds=tpot,
        decode_tokens_per_second=1.0 / tpot,
        gpu_memory_utilization=_vllm_gpu_memory_utilization(quant, hw, per_gpu),
    )
    return DraftEstimate(**fields, draft_tokens=k, acceptance=alpha, tokens_per_pass=per_pass,
                         speedup=base.tpot_seconds / tpot, draft_bytes=draft_bytes, draft_step_seconds=d.tpot_seconds,
                         verify_seconds=verify)
