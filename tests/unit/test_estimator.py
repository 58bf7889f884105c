"""Estimator properties that follow from how inference works, not from its calibrated constants.

(test_estimator_calibration.py holds the comparisons with published measurements.)
"""
from __future__ import annotations

import pytest

from llama_operator.catalog import load_catalog
from llama_operator.estimate import Hardware, Workload, estimate, kv_cache_bytes, parameter_counts, weights_bytes

GiB = 2**30
CAT = load_catalog()


def model(mid):
    return CAT.model(mid)


def quant(qid):
    return CAT.quantizations[qid]


def gpu(name, n=1):
    return Hardware(gpu=CAT.find_gpu(name), gpu_count=n)


def cpu(cores=16, bandwidth=40.0):
    return Hardware(gpu=None, cpu_cores=cores, cpu_bandwidth_gbps=bandwidth)


def est(mid="llama-3.1-8b-instruct", qid="bf16", hw=None, **workload):
    workload.setdefault("context_length", 8192)
    return estimate(model(mid), quant(qid), hw or gpu("A100-80GB"), Workload(**workload))


# --- Parameters and weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("mid", list(CAT.models))
def test_parameter_count_from_architecture_matches_the_published_count(mid):
    m = model(mid)
    assert parameter_counts(m.arch).total == pytest.approx(m.published_parameters, rel=0.02)


def test_16bit_weights_are_two_bytes_per_parameter():
    # 8B: 8.03e9 parameters x 2 bytes = 16.06 GB
    assert est(qid="bf16").weights_bytes == pytest.approx(2 * 8.03e9, rel=0.01)
    # 90B Vision in bf16 is ~165 GiB: far more than a 24 GB L4
    w90 = est("llama-3.2-90b-vision-instruct", "bf16").weights_bytes
    assert w90 == pytest.approx(2 * 88.8e9, rel=0.01)
    assert 160 * GiB < w90 < 170 * GiB


def test_405b_fp8_is_sized_from_the_modules_its_checkpoint_converts():
    # meta-llama/Llama-3.1-405B-Instruct-FP8 (fbgemm_fp8) keeps layers 0 and 125, lm_head and every
    # self_attn in bf16: only the MLPs of layers 1..124 are FP8 (1 byte + an fp32 scale per output row).
    m = model("llama-3.1-405b-instruct")
    a = m.arch
    p = parameter_counts(a)
    mlp_layer = 3 * a.hidden_size * a.intermediate_size
    fp8 = mlp_layer * (a.layers - 2)
    rows = (a.layers - 2) * (2 * a.intermediate_size + a.hidden_size)
    expected = fp8 + 4 * rows + 2 * (p.total - fp8)
    assert weights_bytes(m, quant("fp8")) == pytest.approx(expected, rel=1e-9)
    assert weights_bytes(m, quant("fp8")) == pytest.approx(487.2e9, rel=0.001)
    # Other FP8 checkpoints (RedHatAI, all linear layers FP8) keep the all-linear formula.
    m70 = model("llama-3.1-70b-instruct")
    p70 = parameter_counts(m70.arch)
    assert weights_bytes(m70, quant("fp8")) == int(p70.linear + 2 * (p70.total - p70.linear))


@pytest.mark.parametrize("mid", ["llama-3.2-1b-instruct", "llama-3.1-8b-instruct", "llama-3.3-70b-instruct"])
def test_fewer_bits_fewer_weight_bytes(mid):
    m = model(mid)
    order = [q for q in ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"] if q in m.variants()]
    sizes = [weights_bytes(m, quant(q)) for q in order]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), dict(zip(order, sizes))
    vllm = [weights_bytes(m, quant(q)) for q in ["awq-int4", "fp8", "bf16"]]
    assert vllm == sorted(vllm)


def test_gguf_weights_near_their_bits_per_weight():
    # q8_0 is 8.5 bits per weight, q4_k_m about 4.5-5 (protected tensors in Q6_K); f16 16
    params = parameter_counts(model("llama-3.1-8b-instruct").arch).total
    bpw = {q: est(qid=q).weights_bytes * 8 / params for q in ["q4_k_m", "q8_0", "f16"]}
    assert 4.5 <= bpw["q4_k_m"] <= 5.2
    assert bpw["q8_0"] == pytest.approx(8.5, abs=0.1)
    assert bpw["f16"] == pytest.approx(16, abs=0.1)


def test_bigger_model_more_weights():
    sizes = [est(m, "bf16").weights_bytes for m in
             ["llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "llama-3.1-8b-instruct", "llama-3.1-70b-instruct",
              "llama-3.1-405b-instruct"]]
    assert sizes == sorted(sizes)


# --- KV cache ------------------------------------------------------------------------------------------


def test_kv_cache_of_llama_3_1_8b():
    # 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token; 8192 tokens = 1 GiB
    assert est(context_length=8192).kv_cache_bytes == GiB
    assert est(context_length=8192, concurrency=4).kv_cache_bytes == 4 * GiB


def test_longer_context_and_more_concurrency_mean_more_kv_and_memory():
    short, long_ = est(context_length=4096), est(context_length=32768)
    assert long_.kv_cache_bytes == 8 * short.kv_cache_bytes
    assert long_.total_bytes > short.total_bytes
    assert est(concurrency=8).kv_cache_bytes > est(concurrency=2).kv_cache_bytes
    assert long_.weights_bytes == short.weights_bytes


def test_fp8_kv_cache_halves_the_cache():
    auto = est(context_length=32768, concurrency=2)
    fp8 = est(context_length=32768, concurrency=2, kv_cache_dtype="fp8")
    assert fp8.kv_cache_bytes * 2 == auto.kv_cache_bytes
    assert fp8.weights_bytes == auto.weights_bytes
    assert fp8.total_bytes < auto.total_bytes


def test_fp8_kv_cache_halves_the_vision_cache_too():
    auto = est("llama-3.2-11b-vision-instruct", context_length=8192)
    fp8 = est("llama-3.2-11b-vision-instruct", context_length=8192, kv_cache_dtype="fp8")
    assert fp8.kv_cache_bytes * 2 == auto.kv_cache_bytes


def test_q8_0_kv_cache_is_8_5_bits_per_element():
    f16 = est(qid="q4_k_m", context_length=16384)
    q8 = est(qid="q4_k_m", context_length=16384, kv_cache_dtype="q8_0")
    assert q8.kv_cache_bytes == pytest.approx(f16.kv_cache_bytes * 8.5 / 16, rel=1e-9)


def test_vision_models_add_the_cross_attention_cache():
    # Llama 3.2 11B Vision has 32 self-attention layers with Llama 3.1 8B's KV shape, plus 8
    # cross-attention layers holding one image's encoder tokens per sequence.
    vision = model("llama-3.2-11b-vision-instruct").arch
    text = model("llama-3.1-8b-instruct").arch
    assert vision.self_attention_layers == text.layers == 32
    for concurrency in (1, 4):
        w = Workload(context_length=8192, concurrency=concurrency)
        cross_per_image = 2 * vision.cross_attention_layers * vision.kv_heads * vision.head_dim * 2 * \
            vision.vision.image_tokens
        assert kv_cache_bytes(vision, w) - kv_cache_bytes(text, w) == cross_per_image * concurrency
    # the image part does not grow with the context
    a = kv_cache_bytes(vision, Workload(context_length=4096)) - kv_cache_bytes(text, Workload(4096))
    b = kv_cache_bytes(vision, Workload(context_length=65536)) - kv_cache_bytes(text, Workload(65536))
    assert a == b > 0


# --- Totals and splitting ------------------------------------------------------------------------------


@pytest.mark.parametrize("mid, qid, hw", [
    ("llama-3.1-8b-instruct", "bf16", gpu("L4")),
    ("llama-3.3-70b-instruct", "bf16", gpu("A100-80GB", 4)),
    ("llama-3.3-70b-instruct", "q4_k_m", gpu("A100-80GB", 2)),
    ("llama-3.2-1b-instruct", "q8_0", cpu()),
    ("llama-3.2-11b-vision-instruct", "fp8", gpu("L4")),
])
def test_total_is_weights_plus_kv_plus_overhead(mid, qid, hw):
    e = est(mid, qid, hw, concurrency=2)
    assert e.total_bytes == e.weights_bytes + e.kv_cache_bytes + e.overhead_bytes
    assert e.weights_bytes > 0 and e.kv_cache_bytes > 0 and e.overhead_bytes > 0
    assert e.decode_tokens_per_second == pytest.approx(1 / e.tpot_seconds)
    assert e.ttft_seconds > e.tpot_seconds > 0  # a prompt's prefill outlasts one decode step
    if hw.is_cpu:
        assert e.per_gpu_bytes == e.total_bytes
    else:
        assert e.per_gpu_bytes * hw.gpu_count >= e.weights_bytes + e.kv_cache_bytes


def test_vllm_tensor_parallel_splits_memory_and_speeds_decode():
    m = "llama-3.3-70b-instruct"
    by_n = {n: est(m, "bf16", gpu("A100-80GB", n)) for n in (1, 2, 4, 8)}
    for a, b in [(1, 2), (2, 4), (4, 8)]:
        assert by_n[b].per_gpu_bytes < by_n[a].per_gpu_bytes
        assert by_n[b].tpot_seconds < by_n[a].tpot_seconds
        assert by_n[b].weights_bytes == by_n[a].weights_bytes
    # each of 4 GPUs holds a quarter of the weights and cache, plus its own share of the runtime's overhead
    e = by_n[4]
    assert e.per_gpu_bytes - e.overhead_bytes / 4 == pytest.approx((e.weights_bytes + e.kv_cache_bytes) / 4, rel=1e-3)


def test_llamacpp_layer_split_spreads_memory_but_does_not_speed_one_token():
    one = est("llama-3.3-70b-instruct", "q4_k_m", gpu("A100-80GB", 1))
    two = est("llama-3.3-70b-instruct", "q4_k_m", gpu("A100-80GB", 2))
    assert two.per_gpu_bytes < one.per_gpu_bytes
    assert two.tpot_seconds >= one.tpot_seconds  # layers run one after another


def test_faster_memory_decodes_faster():
    a100 = est(hw=gpu("A100-80GB"))
    h100 = est(hw=gpu("H100"))
    l4 = est(hw=gpu("L4", 1))
    assert h100.tpot_seconds < a100.tpot_seconds < l4.tpot_seconds
    slow_cpu = est("llama-3.2-1b-instruct", "q8_0", cpu(bandwidth=40))
    fast_cpu = est("llama-3.2-1b-instruct", "q8_0", cpu(bandwidth=120))
    assert fast_cpu.tpot_seconds < slow_cpu.tpot_seconds


def test_fewer_weight_bytes_decode_faster_on_the_same_gpu():
    tpots = [est(qid=q, hw=gpu("L40S")).tpot_seconds for q in ("bf16", "fp8", "awq-int4")]
    assert tpots == sorted(tpots, reverse=True)


def test_longer_prompt_takes_longer_to_first_token():
    assert est(prompt_tokens=4096).ttft_seconds > est(prompt_tokens=512).ttft_seconds


def test_higher_concurrency_is_not_faster_per_token():
    assert est(concurrency=32).tpot_seconds >= est(concurrency=1).tpot_seconds


def test_cpu_prefill_is_much_slower_than_a_gpu():
    on_cpu = est("llama-3.1-8b-instruct", "q4_k_m", cpu())
    on_gpu = est("llama-3.1-8b-instruct", "q4_k_m", gpu("L4"))
    assert on_cpu.ttft_seconds > 5 * on_gpu.ttft_seconds


def test_estimates_are_pure():
    assert est(concurrency=3).to_dict() == est(concurrency=3).to_dict()
    keys = set(est().to_dict())
    assert {"weightsBytes", "kvCacheBytes", "overheadBytes", "totalBytes", "perGpuBytes", "ttftSeconds",
            "tpotSeconds", "decodeTokensPerSecond"} <= keys
