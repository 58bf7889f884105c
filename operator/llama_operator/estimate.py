"""The estimator: memory and latency of one replica, from the architecture and the hardware.

Pure functions of their inputs. Every formula is written out in docs/estimator.md; the constants
below say where each number comes from. The shape of the model:

* Weights: parameters counted from the architecture (attention, MLP, embeddings, norms, vision
  tower) times the bytes each tensor costs in the variant's format (see catalog/quantizations.yaml).
* KV cache: 2 (K and V) x self-attention layers x KV heads x head dim x bytes per element, per token,
  for `contextLength x concurrency` tokens; vision models add the cross-attention cache of one image
  per sequence.
* Overhead: what the runtime holds besides weights and KV cache (measured for vLLM; llama.cpp's
  compute buffers from its graph sizes).
* Decode (time per output token): one step reads every weight once and the KV cache of every running
  sequence; it takes the longer of that traffic at the calibrated share of peak bandwidth plus a
  fixed per-parameter kernel cost, and the step's FLOPs at the calibrated share of peak throughput.
* Prefill (time to first token): on GPUs, llama.cpp per 512-token micro-batch (matmuls at a share of the
  FP16 tensor peak, weight passes, the f32 attention-score matrix over the filled cache), vLLM as one batch
  of every request that arrives together (concurrency x prompt tokens) at a share of the kernel's peak plus
  a weight pass, all-reduces and a fixed per-request time; on CPU 2 x parameters x tokens plus attention at
  the fitted per-thread rate (up to 16 threads). The first token is sampled from the prefill's last logits, so no decode step is
  added for it; llama.cpp adds one decode step of the running slots when other sequences run (concurrency
  > 1: they share the server loop), vLLM's queue is the batch it prefills together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .catalog import GPU, Model, ModelArch, Quantization, load_catalog
from .cpunode import CPU_BANDWIDTH_EFFICIENCY, cpu_flops_rate, cpu_prefill_seconds
from .lora import AdapterMemory, adapter_memory
from .prefill import (
    LLAMACPP_UBATCH,
    VLLM_REQUEST_OVERHEAD_SECONDS,
    gpu_tflops,
    llamacpp_gpu_prefill_seconds,
    vllm_prefill_seconds,
)

GiB = 2**30

# --- Constants: measured or fitted (docs/estimator.md, "Constants") ----------------------------------

#: vLLM's memory outside PyTorch's allocator (CUDA context, cuBLAS workspaces, NCCL), per GPU:
#: 1.79 GiB at TP1 and 3.58 GiB at TP2 in vLLM's startup profile of Llama 3 8B on H100
#: (calibration D rows). The TP>1 extra is NCCL's buffers.
VLLM_NON_TORCH_BYTES = 1.79 * GiB
VLLM_NON_TORCH_EXTRA_TP_BYTES = (3.58 - 1.79) * GiB
#: vLLM's activation peak in the profiling run: 1.26 GiB for Llama 3 8B (hidden 4096), the same at TP1
#: and TP2 (calibration D). Scaled by hidden size for other models.
VLLM_ACTIVATION_PEAK_BYTES_AT_4096 = 1.26 * GiB
#: The highest --gpu-memory-utilization the operator plans (vLLM's default is 0.90; the rest of the
#: device is left to the driver and fragmentation).
VLLM_MAX_GPU_MEMORY_UTILIZATION = 0.95

#: CUDA context and cuBLAS workspace a llama.cpp server holds on each GPU it uses.
LLAMACPP_GPU_CONTEXT_BYTES = 0.30 * GiB

#: Decode: share of peak memory bandwidth the weight-streaming kernels reach (GDDR cards reach about 92% of peak
#: in llama-bench tg runs, calibration C).
DECODE_BANDWIDTH_EFFICIENCY_16BIT = 0.92
DECODE_BANDWIDTH_EFFICIENCY_QUANTIZED = 0.92
#: vLLM decode: a fixed cost per parameter per token (dequantisation, kernel launches), from llama.cpp's Llama 3
#: 8B tg512 rows (calibration C); vLLM has no batch-1 row of its own to fit a better form on.
DECODE_SECONDS_PER_PARAMETER_16BIT = 0.10e-12
DECODE_SECONDS_PER_PARAMETER_QUANTIZED = 0.30e-12
#: llama.cpp decode: a fixed time per layer per token, beside the weight traffic. One token runs ~15-20 small
#: kernels per layer (norms, rope, softmax, copies, the matrix-vector products' tails), each paying a launch
#: and a ramp-up that does not shrink with bandwidth (the May-2024 build has no CUDA graphs). A cost per
#: *parameter* grows with the model exactly like the weight traffic and double-charged 70B. Fitted with the
#: caps below on the 33 single-GPU tg512 rows of benchmarks/calibration/decode-rows.json (XiongjieDai
#: llama-bench, Llama 3 8B/70B F16 and Q4_K_M, 15 GPUs) by benchmarks/calibrate_estimator.py.
LLAMACPP_DECODE_SECONDS_PER_LAYER = 80e-6
#: llama.cpp's batch-1 kernels stop scaling with bandwidth on HBM GPUs: an A100 (2039 GB/s) reaches about
#: 1050 GB/s on 70B Q4_K_M and a 4090 (1008 GB/s) 92% of its peak. The effective bandwidth it reaches is capped
#: (fitted with the per-layer time on the same rows). vLLM's kernels are not capped.
LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_16BIT = 1100.0
LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_QUANTIZED = 1150.0
#: Decode compute (matters at high concurrency): batched GEMMs reach less of peak than prefill.
DECODE_COMPUTE_EFFICIENCY = 0.50
#: Tensor parallelism: every layer all-reduces twice per step. Latency per all-reduce (assumed from
#: NCCL's published small-message latencies: NVLink ~10 us, PCIe ~25 us).
ALLREDUCE_LATENCY_SECONDS = {"nvlink": 10e-6, "pcie": 25e-6, "infinity-fabric": 12e-6}
#: Decode speed is reported at a reference context: the prompt plus half of a 256-token answer.
REFERENCE_OUTPUT_TOKENS = 256

KvCacheDtype = Literal["auto", "fp8", "q8_0"]
RuntimeName = Literal["vllm", "llamacpp"]


@dataclass(frozen=True)
class Hardware:
    """What one replica runs on: `gpu_count` GPUs of one product in one node, or a CPU node."""

    gpu: GPU | None
    gpu_count: int = 1
    cpu_cores: int = 0
    cpu_bandwidth_gbps: float = 0.0

    @property
    def is_cpu(self) -> bool:
        return self.gpu is None

    def describe(self) -> str:
        if self.gpu is None:
            return f"cpu ({self.cpu_cores} cores, {self.cpu_bandwidth_gbps:g} GB/s)"
        return f"{self.gpu_count}x {self.gpu.product}"


@dataclass(frozen=True)
class Workload:
    context_length: int
    concurrency: int = 1
    prompt_tokens: int = 512
    kv_cache_dtype: KvCacheDtype = "auto"


@dataclass(frozen=True)
class ParameterCounts:
    embedding: float
    output: float  # 0 when tied to the embedding
    attention: float  # all decoder layers' q/k/v/o projections
    mlp: float
    norms: float
    vision: float  # vision tower and projector (vision models only)
    attn_v: float  # part of `attention` in v projections (GGUF mixes treat them apart)
    attn_output: float  # part of `attention` in o projections
    ffn_down: float  # part of `mlp` in down projections

    @property
    def linear(self) -> float:
        """Weights of the decoder's linear layers: what AWQ/GPTQ/FP8 quantize."""
        return self.attention + self.mlp

    @property
    def total(self) -> float:
        return self.embedding + self.output + self.attention + self.mlp + self.norms + self.vision

    @property
    def active_per_token(self) -> float:
        """Parameters a text token passes through (the embedding is a lookup, not a matmul)."""
        return self.output_matmul + self.attention + self.mlp

    @property
    def output_matmul(self) -> float:
        return self.output or self.embedding


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    per_gpu_bytes: int  # for CPU: equal to total (RAM)
    ttft_seconds: float
    tpot_seconds: float
    decode_tokens_per_second: float  # per sequence, at the workload's concurrency
    prefill_tokens_per_second: float
    gpu_memory_utilization: float | None = None  # vLLM's flag, when planned on GPUs
    adapter_bytes: int = 0  # LoRA adapters in accelerator memory (RAM on CPU), part of total_bytes
    adapter_host_bytes: int = 0  # and in the pod's RAM besides (vLLM's cache of loaded adapters)

    def to_dict(self) -> dict:
        return {
            "weightsBytes": self.weights_bytes,
            "kvCacheBytes": self.kv_cache_bytes,
            "overheadBytes": self.overhead_bytes,
            "totalBytes": self.total_bytes,
            "perGpuBytes": self.per_gpu_bytes,
            "ttftSeconds": round(self.ttft_seconds, 6),
            "tpotSeconds": round(self.tpot_seconds, 6),
            "decodeTokensPerSecond": round(self.decode_tokens_per_second, 3),
            "prefillTokensPerSecond": round(self.prefill_tokens_per_second, 3),
            **({"adapterBytes": self.adapter_bytes, "adapterHostBytes": self.adapter_host_bytes}
               if self.adapter_bytes else {}),
        }


# --- What a replica asks of its node besides accelerators ------------------------------------------------

#: llama.cpp with every layer on GPUs does little on the CPU: two threads.
LLAMACPP_GPU_THREADS = 2


def host_requests(runtime: RuntimeName, gpus: int, cpu_threads: int, replica_bytes: int,
                  adapter_host_bytes: int = 0) -> tuple[int, int]:
    """(CPU millicores, memory bytes) one replica's pod requests; the planner checks them against the free
    CPU and memory of the nodes, and the renderer writes them into the pod.

    vLLM: 2 cores plus one per GPU worker, 8 GiB plus vLLM's default 4 GiB CPU swap space per GPU worker
    (calibration D). llama.cpp on GPUs: 2 threads and 4 GiB. llama.cpp on CPU: its threads, and the whole
    replica (memory-mapped weights stay resident) plus 1 GiB. vLLM serving LoRA adapters keeps them in host
    memory too (`adapter_host_bytes`, lora.adapter_memory).
    """
    if runtime == "vllm":
        return (2 + gpus) * 1000, 8 * GiB + 4 * GiB * gpus + adapter_host_bytes
    if gpus:
        return LLAMACPP_GPU_THREADS * 1000, 4 * GiB
    return cpu_threads * 1000, replica_bytes + GiB


# --- Parameters and bytes ------------------------------------------------------------------------------


def parameter_counts(arch: ModelArch) -> ParameterCounts:
    """Count parameters from the architecture, tensor by tensor (HF Llama / Mllama layouts).

    Cross-attention layers of the vision models have the same projections and MLP as self-attention
    layers (their K/V read the projected vision features), so every decoder layer counts alike.
    """
    h, L = arch.hidden_size, arch.layers
    q = h * arch.heads * arch.head_dim
    kv = h * arch.kv_heads * arch.head_dim
    o = arch.heads * arch.head_dim * h
    mlp_layer = 3 * h * arch.intermediate_size
    embedding = arch.vocab_size * h
    vision = 0.0
    if arch.vision is not None:
        v = arch.vision
        per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
        patches = (v.image_size // v.patch_size) ** 2 + 1
        patch_embed = 3 * v.patch_size**2 * v.hidden_size
        position = patches * v.hidden_size * (1 + v.max_tiles**2)  # gated + tile position embeddings
        projector = v.output_dim * h
        vision = v.layers * per_layer + patch_embed + position + projector
    return ParameterCounts(
        embedding=embedding,
        output=0.0 if arch.tied_embeddings else embedding,
        attention=L * (q + 2 * kv + o),
        mlp=L * mlp_layer,
        norms=L * 2 * h + h,
        vision=vision,
        attn_v=L * kv,
        attn_output=L * o,
        ffn_down=L * h * arch.intermediate_size,
    )


def weights_bytes(model: Model, quant: Quantization, *, in_flight: bool = False) -> int:
    """Bytes of the variant's weights as the runtime loads them. `in_flight`: a 16-bit checkpoint (a fine-tune)
    that vLLM quantizes as it loads it: every linear layer converted, whatever a published checkpoint keeps."""
    p = parameter_counts(model.arch)
    if quant.runtime == "vllm":
        # Linear layers in the checkpoint's format; embeddings, lm_head, norms and the vision tower
        # stay 16-bit in every published Llama AWQ/GPTQ/FP8 checkpoint, and in vLLM's in-flight FP8.
        assert quant.linear_bits is not None
        unquantized = p.embedding + p.output + p.norms + p.vision
        unconverted = None if in_flight else model.vllm_unconverted.get(quant.id)
        if unconverted is not None:
            return int(_linear_bytes_with_unconverted(model.arch, quant, unconverted) + unquantized * 2)
        return int(p.linear * quant.linear_bits / 8 + unquantized * 2)
    bits = load_catalog().ggml_type_bits
    share = quant.more_bits_share
    base = bits[quant.base]
    attn_v_bits = share * bits[quant.attn_v] + (1 - share) * base
    ffn_down_bits = share * bits[quant.ffn_down] + (1 - share) * base
    other_linear = p.linear - p.attn_v - p.attn_output - p.ffn_down
    total_bits = (
        other_linear * base
        + p.attn_v * attn_v_bits
        + p.ffn_down * ffn_down_bits
        + p.attn_output * bits[quant.attn_output]
        + p.norms * bits["F32"]
    )
    if model.arch.tied_embeddings:
        total_bits += p.embedding * bits[quant.output]  # llama.cpp treats a tied embedding as the output
    else:
        total_bits += p.embedding * bits[quant.embedding] + p.output * bits[quant.output]
    return int(total_bits / 8 + load_catalog().gguf_metadata_bytes)


#: A checkpoint that leaves modules unconverted (Meta's fbgemm_fp8 405B) stores one fp32 scale per output row
#: of each converted weight (fbgemm's per-channel FP8 scales): 4 bytes a row.
PER_ROW_SCALE_BYTES = 4


def _linear_bytes_with_unconverted(arch: ModelArch, quant: Quantization, unconverted) -> float:
    """Decoder linear bytes, module by module, of a checkpoint that keeps some modules in 16 bits
    (models.yaml `unconverted`): whole layers by index, and/or every layer's self-attention. Converted
    weights cost the format's bits plus one fp32 scale per output row."""
    h = arch.hidden_size
    attn_params = h * arch.heads * arch.head_dim + 2 * h * arch.kv_heads * arch.head_dim + arch.heads * arch.head_dim * h
    attn_rows = arch.heads * arch.head_dim + 2 * arch.kv_heads * arch.head_dim + h  # q, k, v, o output rows
    mlp_params = 3 * h * arch.intermediate_size
    mlp_rows = 2 * arch.intermediate_size + h  # gate and up: I rows each; down: h rows
    converted = quant.linear_bits / 8
    total = 0.0
    for layer in range(arch.layers):
        whole = layer in unconverted.layers
        for params, rows, keep in ((attn_params, attn_rows, whole or unconverted.self_attention),
                                   (mlp_params, mlp_rows, whole)):
            total += params * 2 if keep else params * converted + rows * PER_ROW_SCALE_BYTES
    return total


def kv_bytes_per_element(dtype: KvCacheDtype) -> float:
    if dtype == "fp8":
        return 1.0
    if dtype == "q8_0":
        return load_catalog().ggml_type_bits["Q8_0"] / 8
    return 2.0  # the model's 16-bit dtype (vLLM "auto", llama.cpp f16)


def kv_cache_bytes(arch: ModelArch, workload: Workload) -> int:
    """KV cache for `context_length` tokens in each of `concurrency` sequences.

    Vision models also cache, per sequence, the cross-attention K/V of one image's encoder tokens.
    """
    elem = kv_bytes_per_element(workload.kv_cache_dtype)
    per_token = 2 * arch.self_attention_layers * arch.kv_heads * arch.head_dim * elem
    total = per_token * workload.context_length * workload.concurrency
    if arch.vision is not None and arch.cross_attention_layers:
        per_image = 2 * arch.cross_attention_layers * arch.kv_heads * arch.head_dim * elem * arch.vision.image_tokens
        total += per_image * workload.concurrency
    return int(total)


def kv_read_bytes_per_step(arch: ModelArch, workload: Workload) -> float:
    """KV bytes one decode step reads: every running sequence at the reference context."""
    elem = kv_bytes_per_element(workload.kv_cache_dtype)
    context = min(workload.context_length, workload.prompt_tokens + REFERENCE_OUTPUT_TOKENS // 2)
    per_token = 2 * arch.self_attention_layers * arch.kv_heads * arch.head_dim * elem
    return per_token * context * workload.concurrency


# --- The estimate --------------------------------------------------------------------------------------


def _is_16bit(quant: Quantization, gpu: GPU | None) -> bool:
    """Whether decode runs the 16-bit kernels' costs: 16-bit weights, or FP8 on FP8 tensor cores (W8A8).
    FP8 weights on a GPU without FP8 tensor cores (Ampere) run weight-only, dequantised to 16 bits inside
    the matmul (vLLM's Marlin W8A16), and pay the quantized kernels' per-parameter cost."""
    if quant.id == "fp8":
        return gpu is None or gpu.fp8_tflops is not None
    return quant.bits >= 16


def _overhead_bytes(model: Model, quant: Quantization, hw: Hardware) -> tuple[int, int]:
    """(total overhead, overhead per GPU) the runtime holds besides weights and KV cache."""
    arch = model.arch
    if quant.runtime == "vllm":
        per_gpu = VLLM_NON_TORCH_BYTES + VLLM_ACTIVATION_PEAK_BYTES_AT_4096 * arch.hidden_size / 4096
        if hw.gpu_count > 1:
            per_gpu += VLLM_NON_TORCH_EXTRA_TP_BYTES
        return int(per_gpu * hw.gpu_count), int(per_gpu)
    # llama.cpp: one micro-batch's activations and logits in f32 (the compute buffer), per device.
    compute = LLAMACPP_UBATCH * (arch.vocab_size + arch.intermediate_size + 4 * arch.hidden_size) * 4
    if hw.is_cpu:
        return int(compute), int(compute)
    per_gpu = compute + LLAMACPP_GPU_CONTEXT_BYTES
    return int(per_gpu * hw.gpu_count), int(per_gpu)


class _Memory(NamedTuple):
    weights: int
    kv_cache: int
    overhead: int
    total: int
    per_gpu: int  # on CPU: the total (RAM)


def _memory(model: Model, quant: Quantization, hw: Hardware, workload: Workload, adapters: AdapterMemory,
            in_flight: bool) -> _Memory:
    """What one replica holds. vLLM splits the weights, the adapters and the cache over its GPUs by tensor
    parallelism, llama.cpp by layers: either way each GPU holds 1/N of them, and its own runtime overhead."""
    weights = weights_bytes(model, quant, in_flight=in_flight)
    kv = kv_cache_bytes(model.arch, workload)
    overhead, overhead_per_gpu = _overhead_bytes(model, quant, hw)
    total = weights + adapters.device_bytes + kv + overhead
    per_gpu = total if hw.is_cpu else math.ceil((weights + adapters.device_bytes + kv) / hw.gpu_count) + overhead_per_gpu
    return _Memory(weights, kv, overhead, total, per_gpu)


class _Decode(NamedTuple):
    """One decode step of the running batch, and the rates CPU prefill is timed with."""

    step_seconds: float
    bandwidth: float  # bytes/s one device reads its weights at
    parallel: int  # devices sharing every token's work (vLLM's tensor parallelism), else 1
    prefill_flops_rate: float  # FLOP/s a prompt is processed at (CPU)
    allreduce_seconds: float  # tensor parallelism's all-reduces in one pass over the layers (else 0)


def _cpu_decode(quant: Quantization, hw: Hardware, step_bytes: float, step_flops: float) -> _Decode:
    """llama.cpp on CPU: the node's peak bandwidth at the calibrated share, its threads' FLOPs."""
    bandwidth = hw.cpu_bandwidth_gbps * 1e9 * CPU_BANDWIDTH_EFFICIENCY
    flops = cpu_flops_rate(quant, hw.cpu_cores)
    t_memory = step_bytes / bandwidth
    t_compute = step_flops / flops
    return _Decode(max(t_memory, t_compute), bandwidth, 1, flops, 0.0)


def _gpu_decode(model: Model, quant: Quantization, hw: Hardware, step_bytes: float, step_flops: float,
                active_parameters: float) -> _Decode:
    """On GPUs: the weight-streaming kernels' share of peak bandwidth (llama.cpp's capped) plus their fixed
    cost (llama.cpp: per layer; vLLM: per parameter), or the step's FLOPs, whichever is longer; vLLM splits both
    N ways and all-reduces."""
    gpu = hw.gpu
    assert gpu is not None
    sixteen = _is_16bit(quant, gpu)
    efficiency = DECODE_BANDWIDTH_EFFICIENCY_16BIT if sixteen else DECODE_BANDWIDTH_EFFICIENCY_QUANTIZED
    per_param = DECODE_SECONDS_PER_PARAMETER_16BIT if sixteen else DECODE_SECONDS_PER_PARAMETER_QUANTIZED
    bandwidth = gpu.memory_bandwidth_gbps * 1e9 * efficiency
    if quant.runtime == "llamacpp":
        cap = LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_16BIT if sixteen \
            else LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_QUANTIZED
        bandwidth = min(bandwidth, cap * 1e9)
    peak = gpu_tflops(gpu, quant) * 1e12
    n = max(1, hw.gpu_count)
    if quant.runtime == "vllm":
        parallel = n  # tensor parallel: the traffic and the FLOPs split N ways
        comm = 2 * model.arch.layers * ALLREDUCE_LATENCY_SECONDS.get(gpu.interconnect, 25e-6) if n > 1 else 0.0
    else:
        parallel = 1  # layer split: shards run one after another
        comm = 0.0
    if quant.runtime == "llamacpp":
        fixed = model.arch.layers * LLAMACPP_DECODE_SECONDS_PER_LAYER  # every layer once per step, on some GPU
    else:
        fixed = active_parameters * per_param / parallel
    t_memory = step_bytes / (bandwidth * parallel) + fixed
    t_compute = step_flops / (peak * DECODE_COMPUTE_EFFICIENCY * parallel)
    return _Decode(max(t_memory, t_compute) + comm, bandwidth, parallel, 0.0, comm)


def _vllm_gpu_memory_utilization(quant: Quantization, hw: Hardware, per_gpu: int) -> float | None:
    """vLLM's --gpu-memory-utilization: what the plan needs, plus 2% of the device for allocator
    fragmentation (None: not vLLM on GPUs)."""
    if quant.runtime != "vllm" or hw.gpu is None:
        return None
    return min(VLLM_MAX_GPU_MEMORY_UTILIZATION, per_gpu / hw.gpu.memory_bytes + 0.02)


def estimate(model: Model, quant: Quantization, hw: Hardware, workload: Workload, *,
             adapter_ranks: tuple[int, ...] = (), in_flight: bool = False) -> Estimate:
    """Memory and latency of one replica of `model` in `quant` on `hw` under `workload`, serving LoRA adapters of
    `adapter_ranks` (lora.adapter_memory: memory, and the adapter bytes each decode step reads), from a 16-bit
    checkpoint quantized as it loads when `in_flight` (a fine-tune).

    vLLM splits a model across GPUs by tensor parallelism (each GPU holds 1/N of every layer and
    works on every token, so bandwidth adds up); llama.cpp by layers (--split-mode layer: each GPU
    holds a contiguous block of layers and a token passes through them in turn, so memory adds up
    but one token's time does not shrink).
    """
    adapters = adapter_memory(model.arch, quant.runtime, adapter_ranks, gpus=hw.gpu_count, concurrency=workload.concurrency)
    memory = _memory(model, quant, hw, workload, adapters, in_flight)
    active = parameter_counts(model.arch).active_per_token
    # One decode step reads every weight, the running batch's adapters and the running sequences' KV cache,
    # and does 2 FLOPs per active parameter per sequence.
    step_bytes = memory.weights + adapters.read_per_step + kv_read_bytes_per_step(model.arch, workload)
    step_flops = 2 * active * workload.concurrency
    decode = _cpu_decode(quant, hw, step_bytes, step_flops) if hw.is_cpu \
        else _gpu_decode(model, quant, hw, step_bytes, step_flops, active)
    prompt = workload.prompt_tokens
    if hw.gpu is not None and quant.runtime == "vllm":
        # The planned concurrency arriving together is prefilled in one batch: each waits for all of them
        # (the queueing term). The first token comes from that pass: no decode step is added.
        prompts = [prompt] * max(1, workload.concurrency)
        prefill = vllm_prefill_seconds(model.arch, quant, prompts, memory.weights, active, hw.gpu, hw.gpu_count,
                                       decode.allreduce_seconds)
        prefilled = sum(prompts)
        ttft = VLLM_REQUEST_OVERHEAD_SECONDS + prefill
    else:
        if hw.gpu is not None:
            prefill = llamacpp_gpu_prefill_seconds(model.arch, quant, prompt, memory.weights, active, hw.gpu)
        else:
            prefill = cpu_prefill_seconds(model.arch, prompt, memory.weights, active, decode.prefill_flops_rate,
                                          decode.bandwidth)
        prefilled = prompt
        # llama-server decodes its other slots in the same loop: a new prompt waits one step of them.
        ttft = prefill + (decode.step_seconds if workload.concurrency > 1 else 0.0)
    return Estimate(
        weights_bytes=memory.weights,
        kv_cache_bytes=memory.kv_cache,
        overhead_bytes=memory.overhead,
        total_bytes=memory.total,
        per_gpu_bytes=memory.per_gpu,
        ttft_seconds=ttft,
        tpot_seconds=decode.step_seconds,
        decode_tokens_per_second=1.0 / decode.step_seconds,
        prefill_tokens_per_second=prefilled / prefill if prefill > 0 else math.inf,
        gpu_memory_utilization=_vllm_gpu_memory_utilization(quant, hw, memory.per_gpu),
        adapter_bytes=adapters.device_bytes,
        adapter_host_bytes=adapters.host_bytes,
    )
