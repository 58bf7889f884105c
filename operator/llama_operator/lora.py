"""Memory for LoRA adapters: what each pinned engine allocates for them, from the shapes in its source.

Pure. The facts (flags, allowed ranks, the modules adapted, where the tensors live) are in
catalog/engines.yaml `lora`, each cited; docs/estimator.md ("LoRA adapters") gives the formulas.

vLLM pre-allocates: at start-up, on every GPU, a stacked A and B buffer per adapted layer for `max_loras`
slots of `max_lora_rank`, whether or not an adapter is ever loaded. They are made inside the model's load
and so count as weights, before the KV cache is sized from what `gpu_memory_utilization` leaves
(vllm/v1/worker/gpu/model_runner.py:410-440): every byte here is a byte less of KV cache.

llama.cpp allocates nothing ahead: each adapter given with --lora is read whole from its GGUF file into the
buffer of the base tensor it adapts (VRAM for offloaded layers), so its cost is the adapter's own size.
"""
from __future__ import annotations

from dataclasses import dataclass

from .catalog import ModelArch
from .engines import release

#: The release whose allocation `vllm_lora_reservation_bytes` reproduces.
VLLM_RELEASE = "vllm-0.34.0"
#: llama.cpp's release (engines.yaml), for its list of tensors an adapter may adapt.
LLAMACPP_RELEASE = "llamacpp-b11434"
#: LogitsProcessorWithLoRA refuses larger vocabularies: "When using LoRA, vocab size must be <= 258048"
#: (vllm 0.34.0 vllm/lora/layers/logits_processor.py:90-92).
VLLM_MAX_LORA_VOCAB = 258048
#: A Llama GGUF's linear tensors in a decoder layer (PEFT's q/k/v/o/gate/up/down_proj).
LLAMACPP_LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def vllm_allowed_ranks() -> tuple[int, ...]:
    """--max-lora-rank's choices in vLLM 0.34.0 (vllm/config/lora.py:26, from the catalog)."""
    rel = release(VLLM_RELEASE)
    assert rel is not None and rel.lora is not None
    return rel.lora.rank_choices


def _divide(n: int, tp: int, what: str) -> int:
    """vLLM's `divide` asserts an exact split (vllm/distributed/utils.py); so does this."""
    if n % tp:
        raise ValueError(f"vLLM 0.34.0: {what} ({n}) is not divisible by tensor parallel size {tp}")
    return n // tp


def vllm_lora_reservation_bytes(arch: ModelArch, *, max_loras: int, max_lora_rank: int, dtype_bytes: int,
                                tensor_parallel: int = 1) -> int:
    """Bytes vLLM 0.34.0 allocates on each GPU for LoRA on a Llama model (LlamaForCausalLM), as the default
    (not fully sharded) LoRA layers create them. With n = max_loras, r = max_lora_rank, t = tensor_parallel:

    per decoder layer, lora_a [n, 1, r, in] and lora_b [n, 1, out, r] per slice
    (vllm/lora/layers/base_linear.py:104-155, column_parallel_linear.py:207-245):
      qkv_proj (MergedQKVParallelLinearWithLoRA, 3 slices): a: 3 x r x hidden (column parallel: the full
        input); b: r x (heads/t + 2 x kv_heads_per_rank) x head_dim, kv_heads_per_rank = kv_heads/t, or 1
        when t >= kv_heads (the KV heads are replicated, vllm/model_executor/layers/linear.py:1113-1119;
        slices: column_parallel_linear.py:482-493)
      o_proj (RowParallelLinearWithLoRA): a: r x heads x head_dim / t (input_size_per_partition,
        row_parallel_linear.py:27-28); b: hidden x r (the full output)
      gate_up_proj (MergedColumnParallelLinearWithLoRA, 2 slices): a: 2 x r x hidden; b: 2 x intermediate/t x r
      down_proj (RowParallelLinearWithLoRA): a: r x intermediate/t; b: hidden x r
    and once, not divided by tensor parallelism:
      embed_tokens (VocabParallelEmbeddingWithLoRA): a [n, vocab, r], b [n, 1, hidden, r]
        (vocab_parallel_embedding.py:25-49)
      lm_head (LogitsProcessorWithLoRA): a [n, 1, r, hidden], b [n, 1, vocab, r] (logits_processor.py:84-112)
    all in lora_dtype (`dtype_bytes`: 2 for float16/bfloat16, its choices; `auto` is the model's dtype).

    Every one of these layers is wrapped at start-up whatever an adapter targets (vllm/lora/model_manager.py:
    476-637; embed_tokens and lm_head are LlamaForCausalLM's embedding_modules, models/llama.py:479-482), so
    the reservation does not depend on the adapters. Not counted: the Punica index tensors (int64, sized by
    max_num_batched_tokens, a few MB) and, with t > 1, lm_head's int64 vocabulary map (logits_processor.py:
    114-117), nor the transient buffers of the LoRA kernels, which vLLM's profiling run (with max_loras dummy
    adapters) puts in the activation peak. Pipeline parallelism is not modelled.
    """
    rel = release(VLLM_RELEASE)
    assert rel is not None and rel.lora is not None
    allowed = rel.lora.rank_choices
    if max_lora_rank not in allowed:
        raise ValueError(f"{rel.title}: --max-lora-rank {max_lora_rank} is not one of "
                         f"{', '.join(map(str, allowed))} (vllm/config/lora.py:26)")
    if max_loras < 1:
        raise ValueError(f"{rel.title}: --max-loras must be >= 1, not {max_loras} (vllm/config/lora.py:35)")
    if tensor_parallel < 1:
        raise ValueError(f"tensor parallel size must be >= 1, not {tensor_parallel}")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, not {dtype_bytes}")
    if arch.vision is not None or arch.cross_attention_layers:
        raise ValueError(f"{rel.title} does not serve Llama 3.2 Vision (Mllama), and vLLM 0.10.2, which does, "
                         "refuses LoRA for it: 'LoRA is not currently supported with encoder/decoder models.'")
    if arch.vocab_size > VLLM_MAX_LORA_VOCAB:
        raise ValueError(f"{rel.title}: with LoRA the vocabulary must be <= {VLLM_MAX_LORA_VOCAB} "
                         f"(vllm/lora/layers/logits_processor.py:90-92); this model has {arch.vocab_size}")
    n, r, t, h = max_loras, max_lora_rank, tensor_parallel, arch.hidden_size
    heads = _divide(arch.heads, t, "the number of attention heads")
    if t >= arch.kv_heads:
        _divide(t, arch.kv_heads, "tensor parallel size over KV heads")  # num_kv_head_replicas = divide(t, kv)
        kv_heads = 1
    else:
        kv_heads = _divide(arch.kv_heads, t, "the number of KV heads")
    intermediate = _divide(arch.intermediate_size, t, "the intermediate size")
    o_in = _divide(arch.heads * arch.head_dim, t, "o_proj's input size")
    qkv = 3 * r * h + r * (heads + 2 * kv_heads) * arch.head_dim
    o_proj = r * o_in + h * r
    gate_up = 2 * r * h + 2 * intermediate * r
    down = r * intermediate + h * r
    embed_tokens = arch.vocab_size * r + h * r
    lm_head = r * h + arch.vocab_size * r
    elements = n * (arch.layers * (qkv + o_proj + gate_up + down) + embed_tokens + lm_head)
    return elements * dtype_bytes


def _llamacpp_shape(arch: ModelArch, tensor: str) -> tuple[int, int]:
    """(in, out) of one of a Llama GGUF's adaptable tensors."""
    h, q, kv = arch.hidden_size, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return {
        "attn_q": (h, q), "attn_k": (h, kv), "attn_v": (h, kv), "attn_output": (q, h),
        "ffn_gate": (h, arch.intermediate_size), "ffn_up": (h, arch.intermediate_size),
        "ffn_down": (arch.intermediate_size, h),
        "token_embd": (arch.vocab_size, h), "output": (h, arch.vocab_size),
    }[tensor]


def llamacpp_adapter_bytes(arch: ModelArch, *, rank: int, dtype_bytes: int,
                           tensors: tuple[str, ...] = LLAMACPP_LAYER_TENSORS) -> int:
    """Bytes of one LoRA adapter in llama.cpp b11434: rank x (in + out) x dtype_bytes per adapted matrix,
    `tensors` (GGUF names) in every decoder layer, token_embd and output once.

    Why this is the whole cost: llama.cpp reserves nothing for adapters; it reads each A/B pair from the
    adapter's GGUF into a tensor of the file's own type and size (ggml_dup_tensor and ggml_nbytes of the
    file's tensors, src/llama-adapter.cpp:374-378, 397-416), placed in the buffer of the base tensor it
    adapts (:337-355: VRAM for an offloaded layer, host memory otherwise). A is rank x in, B is out x rank
    (the shape checks, :357-372). The type is the adapter file's, whatever the base's quantization:
    convert_lora_to_gguf.py writes f32 (4 bytes, its default) or f16/bf16 (2); q8_0 adapters (block format)
    are not covered here. `dtype_bytes` must be 2 or 4.
    """
    rel = release(LLAMACPP_RELEASE)
    assert rel is not None and rel.lora is not None
    if rank < 1:
        raise ValueError(f"the adapter's rank must be >= 1, not {rank}")
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (f16/bf16) or 4 (f32), not {dtype_bytes}")
    if arch.vision is not None or arch.cross_attention_layers:
        raise ValueError(f"{rel.title} does not serve Llama 3.2 Vision (Mllama)")
    unknown = [t for t in tensors if t not in rel.lora.adapted_modules]
    if unknown:
        raise ValueError(f"{rel.title}: no LoRA on {', '.join(unknown)} "
                         f"(adaptable: {', '.join(rel.lora.adapted_modules)})")
    total = 0
    for tensor in tensors:
        fan_in, fan_out = _llamacpp_shape(arch, tensor)
        per_matrix = rank * (fan_in + fan_out)
        total += per_matrix if tensor in ("token_embd", "output") else arch.layers * per_matrix
    return total * dtype_bytes


# --- What a replica serving adapters holds ----------------------------------------------------------------

#: vLLM's --lora-dtype is `auto`: the base model's dtype, 16-bit for every Llama the catalog serves.
VLLM_LORA_DTYPE_BYTES = 2
#: A PEFT adapter as published (safetensors) is 16-bit; llama.cpp's converter writes f32 unless told otherwise
#: (convert_lora_to_gguf.py --outtype, default f32): the larger is assumed for a GGUF adapter of unknown type.
PEFT_DTYPE_BYTES = 2
GGUF_ADAPTER_DTYPE_BYTES = 4


@dataclass(frozen=True)
class VllmLoraSettings:
    """vLLM's LoRA flags for a set of adapters: --max-loras, --max-lora-rank, --max-cpu-loras."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int


def vllm_lora_settings(ranks: tuple[int, ...], concurrency: int) -> VllmLoraSettings:
    """GPU slots for as many adapters as one batch can mix (no more than the adapters, nor than the requests
    running at once), the smallest allowed rank that holds the largest adapter, and every adapter kept in host
    memory (the cache of loaded adapters; an adapter dropped from it is read from disk again on its next
    request)."""
    allowed = vllm_allowed_ranks()
    top = max(ranks)
    rank = next((r for r in allowed if r >= top), None)
    if rank is None:
        raise ValueError(f"vLLM 0.34.0: no --max-lora-rank holds rank {top} (allowed: {', '.join(map(str, allowed))})")
    slots = max(1, min(len(ranks), concurrency))
    return VllmLoraSettings(max_loras=slots, max_lora_rank=rank, max_cpu_loras=max(slots, len(ranks)))


def peft_adapter_bytes(arch: ModelArch, rank: int, dtype_bytes: int = PEFT_DTYPE_BYTES) -> int:
    """One adapter's own size with every linear projection of every layer adapted (PEFT target_modules
    all-linear, the largest usual choice): rank x (in + out) x dtype_bytes per matrix."""
    total = 0
    for tensor in LLAMACPP_LAYER_TENSORS:
        fan_in, fan_out = _llamacpp_shape(arch, tensor)
        total += rank * (fan_in + fan_out)
    return arch.layers * total * dtype_bytes


@dataclass(frozen=True)
class AdapterMemory:
    """What a replica's adapters take: `device_bytes` in accelerator memory (RAM on CPU) over all its GPUs,
    `host_bytes` more in the pod's RAM (vLLM's cache of loaded adapters), and `read_per_step` the adapter
    bytes one decode step reads (the adapters of the running batch)."""

    device_bytes: int
    host_bytes: int
    read_per_step: int


def adapter_memory(arch: ModelArch, runtime: str, ranks: tuple[int, ...], *, gpus: int,
                   concurrency: int) -> AdapterMemory:
    """vLLM: its reservation on each of `gpus` GPUs (vllm_lora_reservation_bytes, tensor parallel over them)
    and every adapter in host memory; a step reads the slots the running requests may use. llama.cpp: every
    adapter given with --lora, read whole into the memory of the layers it adapts; a batch runs one set of
    adapters (slots batch together only with equal adapters), so a step reads the largest one."""
    if not ranks:
        return AdapterMemory(0, 0, 0)
    if runtime == "vllm":
        s = vllm_lora_settings(ranks, concurrency)
        per_gpu = vllm_lora_reservation_bytes(arch, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank,
                                              dtype_bytes=VLLM_LORA_DTYPE_BYTES, tensor_parallel=max(1, gpus))
        device = per_gpu * max(1, gpus)
        host = sum(peft_adapter_bytes(arch, r) for r in ranks)
        # every slot may be in use: there are no more slots than requests running at once
        return AdapterMemory(device, host, device)
    sizes = [llamacpp_adapter_bytes(arch, rank=r, dtype_bytes=GGUF_ADAPTER_DTYPE_BYTES) for r in ranks]
    return AdapterMemory(sum(sizes), 0, max(sizes))
