"""LoRA memory (llama_operator.lora): what vLLM 0.34.0 pre-allocates per GPU and what a llama.cpp adapter
costs, checked against hand computations written out from the architectures (catalog/models.yaml).

Llama 3.1 8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, vocab 128256.
Llama 3.1 70B: hidden 8192, 80 layers, 64 heads, 8 KV heads, head_dim 128, intermediate 28672, vocab 128256.
"""
from __future__ import annotations

import pytest

from llama_operator.catalog import load_catalog
from llama_operator.lora import LLAMACPP_LAYER_TENSORS, llamacpp_adapter_bytes, vllm_allowed_ranks, \
    vllm_lora_reservation_bytes


def _arch(model_id: str):
    return load_catalog().model(model_id).arch


def test_the_architectures_are_the_ones_written_out_above():
    a8, a70 = _arch("llama-3.1-8b-instruct"), _arch("llama-3.1-70b-instruct")
    assert (a8.hidden_size, a8.layers, a8.heads, a8.kv_heads, a8.head_dim, a8.intermediate_size, a8.vocab_size) \
        == (4096, 32, 32, 8, 128, 14336, 128256)
    assert (a70.hidden_size, a70.layers, a70.heads, a70.kv_heads, a70.head_dim, a70.intermediate_size,
            a70.vocab_size) == (8192, 80, 64, 8, 128, 28672, 128256)


# 8B, one GPU, per unit of rank and per slot (lora_a elements + lora_b elements):
#   qkv_proj      a: 3 x 4096 = 12288             b: 4096 + 1024 + 1024 = 6144
#   o_proj        a: 4096                         b: 4096
#   gate_up_proj  a: 2 x 4096 = 8192              b: 2 x 14336 = 28672
#   down_proj     a: 14336                        b: 4096
#   a layer: 12288 + 6144 + 4096 + 4096 + 8192 + 28672 + 14336 + 4096 = 81920; x 32 layers = 2621440
#   embed_tokens 128256 + 4096, lm_head 4096 + 128256: 264704
#   total 2621440 + 264704 = 2886144 elements per rank per slot
PER_RANK_8B = 2886144
# 70B, one GPU:
#   qkv 3 x 8192 = 24576 + (8192 + 1024 + 1024) = 10240; o 8192 + 8192; gate_up 16384 + 57344; down 28672 + 8192
#   a layer: 24576 + 10240 + 8192 + 8192 + 16384 + 57344 + 28672 + 8192 = 161792; x 80 = 12943360
#   embed_tokens + lm_head: 2 x (128256 + 8192) = 272896; total 13216256
PER_RANK_70B = 13216256


@pytest.mark.parametrize("model_id,per_rank", [("llama-3.1-8b-instruct", PER_RANK_8B),
                                               ("llama-3.1-70b-instruct", PER_RANK_70B)])
@pytest.mark.parametrize("rank", [16, 64])
def test_vllm_reservation_is_the_hand_computation(model_id, per_rank, rank):
    got = vllm_lora_reservation_bytes(_arch(model_id), max_loras=1, max_lora_rank=rank, dtype_bytes=2)
    assert got == per_rank * rank * 2
    # ... and max_loras slots of it.
    assert vllm_lora_reservation_bytes(_arch(model_id), max_loras=4, max_lora_rank=rank, dtype_bytes=2) == 4 * got


def test_the_numbers():
    # 8B rank 16: 46178304 elements, 92356608 bytes (88 MiB) of bf16 per slot; 70B rank 64: 1.58 GiB per slot.
    assert vllm_lora_reservation_bytes(_arch("llama-3.1-8b-instruct"), max_loras=1, max_lora_rank=16,
                                       dtype_bytes=2) == 92356608
    assert vllm_lora_reservation_bytes(_arch("llama-3.1-70b-instruct"), max_loras=1, max_lora_rank=64,
                                       dtype_bytes=2) == 1691680768


def test_tensor_parallel_divides_the_sharded_sides_only():
    # 70B over 4 GPUs: column-parallel outputs and row-parallel inputs are divided; the inputs of qkv and
    # gate_up, the outputs of o and down, and embed_tokens / lm_head are not.
    #   qkv a 24576, b (64/4 + 2 x 8/4) x 128 = 2560; o a 8192/4 = 2048, b 8192;
    #   gate_up a 16384, b 2 x 28672/4 = 14336; down a 7168, b 8192
    #   a layer: 24576 + 2560 + 2048 + 8192 + 16384 + 14336 + 7168 + 8192 = 83456; x 80 = 6676480
    #   + 272896 = 6949376 per rank per slot
    arch = _arch("llama-3.1-70b-instruct")
    assert vllm_lora_reservation_bytes(arch, max_loras=4, max_lora_rank=16, dtype_bytes=2, tensor_parallel=4) \
        == 6949376 * 16 * 4 * 2
    # 8B over 8 GPUs: 8 KV heads / 8 = 1 each; over 16 the KV heads are replicated, still 1 per GPU.
    #   qkv a 12288, b (32/8 + 2) x 128 = 768; o a 512, b 4096; gate_up a 8192, b 2 x 1792 = 3584;
    #   down a 1792, b 4096: a layer 35328, x 32 = 1130496, + 264704 = 1395200
    arch8 = _arch("llama-3.1-8b-instruct")
    assert vllm_lora_reservation_bytes(arch8, max_loras=1, max_lora_rank=8, dtype_bytes=2, tensor_parallel=8) \
        == 1395200 * 8 * 2
    one = vllm_lora_reservation_bytes(arch8, max_loras=1, max_lora_rank=8, dtype_bytes=2)
    assert 3 * one / 8 < 1395200 * 8 * 2 < one / 2  # far above one / 8: the unsharded sides stay whole


def test_vllm_refuses_what_the_release_refuses():
    arch = _arch("llama-3.1-8b-instruct")
    assert vllm_allowed_ranks() == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for rank in vllm_allowed_ranks():
        assert vllm_lora_reservation_bytes(arch, max_loras=1, max_lora_rank=rank, dtype_bytes=2) > 0
    for rank in (0, 4, 24, 100, 1024):
        with pytest.raises(ValueError, match=r"--max-lora-rank .* is not one of 1, 8, 16, 32, 64, 128, 256, 320, 512"):
            vllm_lora_reservation_bytes(arch, max_loras=1, max_lora_rank=rank, dtype_bytes=2)
    with pytest.raises(ValueError, match="max-loras must be >= 1"):
        vllm_lora_reservation_bytes(arch, max_loras=0, max_lora_rank=16, dtype_bytes=2)
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 3"):
        vllm_lora_reservation_bytes(arch, max_loras=1, max_lora_rank=16, dtype_bytes=2, tensor_parallel=3)
    with pytest.raises(ValueError, match="encoder/decoder"):
        vllm_lora_reservation_bytes(_arch("llama-3.2-11b-vision-instruct"), max_loras=1, max_lora_rank=16,
                                    dtype_bytes=2)


def test_llamacpp_adapter_is_rank_times_in_plus_out_per_matrix():
    arch = _arch("llama-3.1-8b-instruct")
    # 8B, rank 16, f16, the seven projections of every layer:
    #   q 4096 + 4096, k 4096 + 1024, v 4096 + 1024, o 4096 + 4096, gate 4096 + 14336, up 4096 + 14336,
    #   down 14336 + 4096: 8192 + 5120 + 5120 + 8192 + 18432 + 18432 + 18432 = 81920 per rank per layer
    #   x 32 layers x 16 x 2 bytes = 83886080 (80 MiB)
    assert llamacpp_adapter_bytes(arch, rank=16, dtype_bytes=2) == 81920 * 32 * 16 * 2 == 83886080
    assert llamacpp_adapter_bytes(arch, rank=16, dtype_bytes=4) == 2 * 83886080  # f32, the converter's default
    # attention only (q, v), rank 8: (8192 + 5120) x 32 x 8 x 2
    assert llamacpp_adapter_bytes(arch, rank=8, dtype_bytes=2, tensors=("attn_q", "attn_v")) == 13312 * 32 * 8 * 2
    # With token_embd and output, one full-rank adapter is what vLLM reserves for one slot of that rank.
    every = LLAMACPP_LAYER_TENSORS + ("token_embd", "output")
    assert llamacpp_adapter_bytes(arch, rank=16, dtype_bytes=2, tensors=every) == \
        vllm_lora_reservation_bytes(arch, max_loras=1, max_lora_rank=16, dtype_bytes=2)
    with pytest.raises(ValueError, match="no LoRA on attn_norm"):
        llamacpp_adapter_bytes(arch, rank=16, dtype_bytes=2, tensors=("attn_norm",))
    with pytest.raises(ValueError, match="2 .* or 4"):
        llamacpp_adapter_bytes(arch, rank=16, dtype_bytes=1)
    with pytest.raises(ValueError, match="Mllama"):
        llamacpp_adapter_bytes(_arch("llama-3.2-11b-vision-instruct"), rank=16, dtype_bytes=2)
