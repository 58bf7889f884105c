"""Prefill on GPUs: how long llama.cpp and vLLM take to process a prompt (docs/estimator.md, "Prefill").

* llama.cpp, per 512-token micro-batch: the matmuls at a share of the FP16-accumulate tensor peak, passes over
  the weights at peak bandwidth, and passes over the f32 attention-score matrix over the filled cache.
* vLLM, one batch of every prompt that arrives together: the batch's FLOPs at a share of the kernel's peak
  (bf16, FP8 W8A8, Marlin W8A16), one weight pass, tensor parallelism's all-reduces.

estimate.py adds these to the time to first token; benchmarks/calibration/compare.py fits the constants on the
terms this module returns.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

from .catalog import GPU, ModelArch, Quantization, load_catalog

#: llama.cpp processes prompts in micro-batches of 512 tokens (its default --ubatch-size).
LLAMACPP_UBATCH = 512

# --- Constants: fitted by benchmarks/calibrate_estimator.py on public rows copied into
# benchmarks/calibration/prefill-rows.json (llama.cpp) and vllm-ttft-rows.json (vLLM).

#: llama.cpp on GPUs, per 512-token micro-batch: the matmuls at a share of the FP16-accumulate tensor peak
#: (cuBLAS FP16 GEMMs; catalog `fp16AccTFLOPS` on GeForce cards, else the 16-bit figure), including the
#: micro-batch's non-GEMM ops (norms, RoPE, copies). 16-bit GGUF weights go straight to cuBLAS; every
#: quantized GGUF type is first dequantised to FP16 (the extra work is why its share is lower). Fitted on the
#: single-GPU pp512 and pp4096 rows of Llama 3 8B (F16, Q4_K_M) on RTX A6000, A40, L40S, A100 PCIe, A100 SXM,
#: H100 PCIe and RTX 4090 in XiongjieDai/GPU-Benchmarks-on-LLM-Inference README.md (llama-bench, May 2024).
LLAMACPP_PREFILL_EFFICIENCY_16BIT = 0.589
LLAMACPP_PREFILL_EFFICIENCY_QUANTIZED = 0.349
#: llama.cpp: passes over the weights per micro-batch at peak bandwidth (each micro-batch streams every weight,
#: and for quantized types the dequantised copy). Same rows.
LLAMACPP_PREFILL_WEIGHT_PASSES = 1.123
#: llama.cpp without flash attention materialises the f32 KQ score matrix of a micro-batch over the whole
#: filled cache (4 bytes x heads x self-attention layers x micro-batch tokens x filled cells), masks rather
#: than skips its causal half and softmaxes it in memory: passes over it at peak bandwidth. This term carries
#: attention's quadratic cost in the prompt. Same rows.
LLAMACPP_PREFILL_KQ_PASSES = 8.24

#: vLLM: fixed time per request in the server (HTTP, tokenisation, scheduling, detokenisation), as
#: benchmark_serving measures it on localhost. Fitted on the 9 LambdaLabsML/vllm-benchmark
#: results/prompt_10 runs (Llama 3/3.1 8B and 70B, bf16 and FP8, 1-2x H100 SXM and A100 SXM, Sept 2024).
VLLM_REQUEST_OVERHEAD_SECONDS = 0.0304
#: vLLM prefill: share of the GPU's peak reached by the batch's GEMMs (and attention), per kernel family.
#: bf16: cuBLAS on the 16-bit peak (LambdaLabs bf16 rows, H100 SXM and A100 SXM). FP8 W8A8 on FP8 tensor
#: cores (cc >= 8.9): on the FP8 peak; with dynamic per-token activation quantisation it gains about nothing
#: over bf16 (LambdaLabs FP8 rows on H100). Marlin W8A16 (FP8 weights on GPUs without FP8 tensor cores):
#: on the 16-bit peak, dequantising in the GEMM (LambdaLabs FP8 rows on A100). AWQ/GPTQ INT4 run the Marlin
#: (W4A16) kernels and are given the Marlin figure: no public row measures them.
VLLM_PREFILL_EFFICIENCY_BF16 = 0.688
VLLM_PREFILL_EFFICIENCY_FP8_W8A8 = 0.391
VLLM_PREFILL_EFFICIENCY_MARLIN = 0.531


def conservative_tflops() -> float:
    """For a GPU whose tensor throughput no source gives: the slowest 16-bit figure in the catalog."""
    known = [g.tensor_tflops_16bit for g in load_catalog().gpus.values() if g.tensor_tflops_16bit]
    return min(known)


def gpu_tflops(gpu: GPU, quant: Quantization) -> float:
    """The tensor peak a variant computes at: FP8 where the weights are FP8 and the GPU has FP8 tensor cores
    (W8A8), else the 16-bit figure (weight-only FP8 and INT4 dequantise to 16 bits)."""
    if quant.id == "fp8" and gpu.fp8_tflops:
        return gpu.fp8_tflops
    return gpu.tensor_tflops_16bit or conservative_tflops()


def attention_flops(arch: ModelArch, prompt: int) -> float:
    """Causal attention of one prompt: QK^T and AV over half the square, every self-attention layer."""
    return 2 * arch.self_attention_layers * prompt**2 * arch.heads * arch.head_dim


def llamacpp_fp16_peak(gpu: GPU) -> float:
    """FLOP/s of llama.cpp's cuBLAS FP16 GEMMs (FP16 accumulate): the catalog's FP16-accumulate figure where
    it differs (GeForce), else the 16-bit tensor peak (or the catalog's slowest for an unknown GPU)."""
    return (gpu.fp16_acc_tflops or gpu.tensor_tflops_16bit or conservative_tflops()) * 1e12


class LlamacppPrefillTerms(NamedTuple):
    """The terms of a llama.cpp GPU prompt, each before its constant (the calibration fits those)."""

    matmul_at_peak: float  # seconds of the matmuls at 100% of the FP16-accumulate peak
    weight_pass: float  # seconds of one pass over the weights per micro-batch, summed, at peak bandwidth
    kq_pass: float  # seconds of one pass over the f32 KQ scores per micro-batch, summed, at peak bandwidth


def llamacpp_prefill_terms(arch: ModelArch, prompt: int, weights: float, active_parameters: float, gpu: GPU,
                           depth: int = 0) -> LlamacppPrefillTerms:
    """`prompt` new tokens on top of `depth` cached ones, in micro-batches of LLAMACPP_UBATCH; micro-batch i
    of u_i tokens sees kv_i = depth + tokens done + u_i filled cells. With --split-mode layer the GPUs hold
    blocks of layers and a micro-batch passes through them in turn: the time is one GPU's, whatever N
    (llama.cpp's pipelining of micro-batches across GPUs is not modelled)."""
    peak = llamacpp_fp16_peak(gpu)
    bandwidth = gpu.memory_bandwidth_gbps * 1e9
    matmul = weight = kq = 0.0
    done = 0
    while done < prompt:
        u = min(LLAMACPP_UBATCH, prompt - done)
        kv = depth + done + u
        matmul += 2 * active_parameters * u / peak
        weight += weights / bandwidth
        kq += 4 * arch.heads * arch.self_attention_layers * u * kv / bandwidth
        done += u
    return LlamacppPrefillTerms(matmul, weight, kq)


def llamacpp_prefill_efficiency(quant: Quantization) -> float:
    """The share of the FP16-accumulate peak llama.cpp's prompt kernels reach with `quant`'s weights."""
    return LLAMACPP_PREFILL_EFFICIENCY_16BIT if quant.bits >= 16 else LLAMACPP_PREFILL_EFFICIENCY_QUANTIZED


def llamacpp_gpu_prefill_seconds(arch: ModelArch, quant: Quantization, prompt: int, weights: float,
                                  active_parameters: float, gpu: GPU) -> float:
    terms = llamacpp_prefill_terms(arch, prompt, weights, active_parameters, gpu)
    return (terms.matmul_at_peak / llamacpp_prefill_efficiency(quant) + LLAMACPP_PREFILL_WEIGHT_PASSES * terms.weight_pass
            + LLAMACPP_PREFILL_KQ_PASSES * terms.kq_pass)


VllmKernel = Literal["bf16", "fp8-w8a8", "marlin"]


def vllm_prefill_kernel(quant: Quantization, gpu: GPU) -> VllmKernel:
    """The GEMM family vLLM prefills with: bf16; FP8 W8A8 on FP8 tensor cores; else weight-only Marlin
    (FP8 W8A16 on GPUs without FP8 tensor cores, and AWQ/GPTQ INT4, given the same figure)."""
    if quant.bits >= 16:
        return "bf16"
    if quant.id == "fp8" and gpu.fp8_tflops:
        return "fp8-w8a8"
    return "marlin"


def vllm_prefill_efficiency(kernel: VllmKernel) -> float:
    return {"bf16": VLLM_PREFILL_EFFICIENCY_BF16, "fp8-w8a8": VLLM_PREFILL_EFFICIENCY_FP8_W8A8,
            "marlin": VLLM_PREFILL_EFFICIENCY_MARLIN}[kernel]


class VllmPrefillTerms(NamedTuple):
    kernel: VllmKernel
    compute_at_peak: float  # seconds of the batch's FLOPs at 100% of the kernel's peak, N GPUs
    fixed: float  # one weight pass at peak bandwidth (N ways) plus tensor parallelism's all-reduces


def vllm_prefill_terms(arch: ModelArch, quant: Quantization, prompts: list[int], weights: float,
                       active_parameters: float, gpu: GPU, gpu_count: int, allreduce_seconds: float) -> VllmPrefillTerms:
    """One batched prefill of `prompts` (vLLM prefills every waiting prompt together) on N GPUs, with
    `allreduce_seconds` of tensor parallelism's all-reduces in one pass over the layers (0 for one GPU)."""
    kernel = vllm_prefill_kernel(quant, gpu)
    tflops = gpu_tflops(gpu, quant)
    n = max(1, gpu_count)
    flops = 2 * active_parameters * sum(prompts) + sum(attention_flops(arch, p) for p in prompts)
    fixed = weights / (gpu.memory_bandwidth_gbps * 1e9 * n) + allreduce_seconds
    return VllmPrefillTerms(kernel, flops / (tflops * 1e12 * n), fixed)


def vllm_prefill_seconds(arch: ModelArch, quant: Quantization, prompts: list[int], weights: float,
                         active_parameters: float, gpu: GPU, gpu_count: int, allreduce_seconds: float) -> float:
    terms = vllm_prefill_terms(arch, quant, prompts, weights, active_parameters, gpu, gpu_count, allreduce_seconds)
    return terms.compute_at_peak / vllm_prefill_efficiency(terms.kernel) + terms.fixed
