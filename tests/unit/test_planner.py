"""The planner: the fallback ladder, the hard limits, the support matrix, placement, cost order, and the
example scenarios of the issue."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from llama_operator.api import parse_object
from llama_operator.catalog import load_catalog
from llama_operator.inventory import Inventory
from llama_operator.placement import (
    DEFAULT_FORBIDDEN_TOLERATIONS,
    effective_tolerations,
    pod_tolerations,
    reserve_plan,
    with_pod_tolerations,
)
from llama_operator.planner import check_choice, ladder_models, plan

from kit import examples

GiB = 2**30
LOOSE = {"ttftP95": "30s", "tpotP95": "2s"}


def example_spec(name: str):
    return parse_object(examples.example(name))


def example_cluster(name: str) -> Inventory:
    docs = examples.cluster_nodes(name)
    return Inventory.from_manifests([d for d in docs if d.get("kind") == "Node"])


def chosen(p):
    assert p.feasible and p.chosen is not None, p.fallback_reason or p.notes
    return p.chosen


def only_stand_ins(p, *hardware: str) -> bool:
    """Every candidate is a variant no node could run: rejected, with reasons, on a stand-in pool (no
    hardware of the cluster, nothing estimated)."""
    return bool(p.candidates) and all(
        c.verdict == "rejected" and c.reasons and c.hardware in hardware and c.estimate is None
        for c in p.candidates)


def reasons_text(p, **match) -> str:
    """All reasons of the candidates whose attributes match (model=..., quant=..., runtime=...)."""
    out = []
    for c in p.candidates:
        if all(getattr(c, k) == v or getattr(getattr(c, k), "id", None) == v for k, v in match.items()):
            out.extend(c.reasons)
    return "\n".join(out)


# --- The examples of the issue -------------------------------------------------------------------------


def test_90b_vision_on_l4s_falls_back_to_the_11b_vision_model():
    p = plan(example_spec("vision-90b-on-l4.yaml"), example_cluster("l4-pool.yaml"))
    c = chosen(p)
    assert c.model.id == "llama-3.2-11b-vision-instruct"  # vision falls back to vision, not to a text model
    assert c.runtime == "vllm"
    assert p.fallback
    assert all(x.model.capability == "vision" for x in p.candidates)
    # 90B bf16 weights alone are ~165 GiB: a single 24 GB L4 cannot hold them; status says so
    assert "llama-3.2-90b-vision-instruct" in p.fallback_reason
    assert "per GPU" in p.fallback_reason or "memory budget" in p.fallback_reason
    d = p.to_dict()
    assert d["fallback"] is True and d["requestedModel"] == "llama-3.2-90b-vision-instruct"
    assert d["fallbackReason"] == p.fallback_reason and d["chosen"]["model"] == "llama-3.2-11b-vision-instruct"


def test_70b_tight_tpot_on_a100s_runs_bf16_with_tensor_parallelism():
    p = plan(example_spec("70b-tight-tpot.yaml"), example_cluster("a100.yaml"))
    c = chosen(p)
    assert (c.model.id, c.quant.id, c.runtime) == ("llama-3.3-70b-instruct", "bf16", "vllm")
    assert c.gpus_per_replica > 1  # ~131 GiB of weights cannot sit on one 80 GB A100
    assert not p.fallback and p.fallback_reason == ""
    spec = example_spec("70b-tight-tpot.yaml")
    assert c.estimate.tpot_seconds <= spec.slo.tpot_seconds
    assert c.estimate.ttft_seconds <= spec.slo.ttft_seconds


def test_70b_tight_tpot_on_the_mixed_cluster_falls_back_to_a_quantization():
    p = plan(example_spec("70b-tight-tpot.yaml"), example_cluster("mixed.yaml"))
    c = chosen(p)
    # no bf16 70B fits (L40S x2 = 90 GiB, A10G x4 = 90 GiB < ~131 GiB of weights): a quantized 70B instead
    assert c.model.id == "llama-3.3-70b-instruct"
    assert c.quant.bits < 16
    assert p.fallback and p.fallback_reason


def test_1b_on_cpu_nodes_runs_llamacpp_on_cpu():
    p = plan(example_spec("tiny-cpu.yaml"), example_cluster("cpu-only.yaml"))
    c = chosen(p)
    assert c.model.id == "llama-3.2-1b-instruct"
    assert c.runtime == "llamacpp" and c.pool.gpu is None
    assert p.to_dict()["chosen"]["gpuProduct"] is None


def test_impossible_is_infeasible_with_reasons_for_every_candidate():
    spec = example_spec("impossible.yaml")
    for cluster in ("h100-8x.yaml", "a100.yaml", "mixed.yaml"):
        p = plan(spec, example_cluster(cluster))
        assert not p.feasible and p.chosen is None and not p.fallback
        assert p.candidates and all(c.verdict == "rejected" and c.reasons for c in p.candidates)
        assert {c.model.id for c in p.candidates} == {"llama-3.1-405b-instruct"}  # allowSmallerModels: false
        assert "memory budget" in reasons_text(p)
        assert p.fallback_reason


# --- The ladder ----------------------------------------------------------------------------------------


def test_best_precision_first_when_it_fits(make_spec, make_inventory, make_node):
    p = plan(make_spec(), make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1)))
    c = chosen(p)
    assert c.quant.bits == 16 and c.model.id == "llama-3.1-8b-instruct"
    assert not p.fallback


def test_8bit_before_4bit(make_spec, make_inventory, make_node):
    # 70B: bf16 (~131 GiB) does not fit 2x L40S (2 x 45 GiB); FP8 (~66 GiB) does, and L40S (Ada 8.9) runs FP8
    p = plan(make_spec(model="llama-3.3-70b-instruct"), make_inventory(make_node("l40s", "NVIDIA-L40S", 2)))
    c = chosen(p)
    assert c.quant.bits == 8 and c.model.id == "llama-3.3-70b-instruct"
    assert c.gpus_per_replica == 2
    assert p.fallback
    assert all(x.quant.bits >= 8 for x in p.candidates)  # nothing below the rung that worked was tried


def test_down_to_4bit_before_a_smaller_model(make_spec, make_inventory, make_node):
    # One 48 GB RTX A6000. 70B q8_0 ~70 GiB, FP8 ~66 GiB, q6_k ~54 GiB, q5_k_m ~47 GiB do not fit 45.6 GiB
    # usable; a 4-bit 70B (~37-40 GiB) does, and is preferred to the 8B.
    p = plan(make_spec(model="llama-3.3-70b-instruct"), make_inventory(make_node("w", "NVIDIA-RTX-A6000", 1)))
    c = chosen(p)
    assert c.model.id == "llama-3.3-70b-instruct" and c.quant.bits == 4
    fp8 = [x for x in p.candidates if x.quant.id == "fp8"]
    assert fp8 and "per GPU" in fp8[0].reasons[0]  # FP8 runs on Ampere (weight-only); it does not fit


def test_below_4bit_only_when_listed(make_spec, make_inventory, make_node):
    # A 32 GB V100 cannot hold a 4-bit 70B (~40 GiB); only a 2-bit one (~25 GiB) fits.
    inv = make_inventory(make_node("v", "Tesla-V100-SXM2-32GB", 1))
    p = plan(make_spec(model="llama-3.3-70b-instruct", fallback={"allowSmallerModels": False}), inv)
    assert not p.feasible
    assert {c.quant.bits for c in p.candidates} >= {4} and min(c.quant.bits for c in p.candidates) == 4
    p = plan(make_spec(model="llama-3.3-70b-instruct",
                       fallback={"allowSmallerModels": False, "quantizations": ["q4_k_m", "q3_k_m", "q2_k"]}), inv)
    c = chosen(p)
    assert c.quant.id in ("q3_k_m", "q2_k") and c.runtime == "llamacpp"
    assert {x.quant.id for x in p.candidates} <= {"q4_k_m", "q3_k_m", "q2_k"}


def test_listed_quantizations_restrict_the_ladder(make_spec, make_inventory, make_node):
    p = plan(make_spec(fallback={"quantizations": ["awq-int4", "q4_k_m"]}),
             make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1)))
    assert chosen(p).quant.id in ("awq-int4", "q4_k_m")
    assert {c.quant.id for c in p.candidates} <= {"awq-int4", "q4_k_m"}


def test_allow_quantization_false_allows_only_16bit(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("l", "NVIDIA-L4", 1))
    # 8B 16-bit (~15 GiB weights) + 8 GiB of 16-bit KV (concurrency 8) does not fit a 24 GB L4; the 3B does
    no_kv8 = {"allowKVCacheQuantization": False}
    p = plan(make_spec(slo={"concurrency": 8}, fallback={"allowQuantization": False, **no_kv8}), inv)
    assert all(c.quant.bits == 16 for c in p.candidates)
    c = chosen(p)
    assert c.quant.bits == 16 and c.model.id != "llama-3.1-8b-instruct"
    # with quantization allowed the 8B stays, quantized (FP8: ~8.5 GiB of weights)
    p = plan(make_spec(slo={"concurrency": 8}, fallback=no_kv8), inv)
    assert chosen(p).model.id == "llama-3.1-8b-instruct" and chosen(p).quant.bits < 16


def test_kv_cache_rung_before_a_smaller_model(make_spec, make_inventory, make_node):
    # A 64k context: 8 GiB of 16-bit KV cache for the 8B, against a 12 GiB budget. No 8B variant fits with a
    # 16-bit cache (even 4-bit weights ~4.6 GiB + 8 GiB > 12 GiB); with an 8-bit cache (4 GiB) one does.
    inv = make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1))
    spec = make_spec(memoryBudget="12Gi", contextLength=65536)
    p = plan(spec, inv)
    c = chosen(p)
    assert c.model.id == "llama-3.1-8b-instruct"
    assert c.kv_cache_dtype == ("fp8" if c.runtime == "vllm" else "q8_0")
    assert c.estimate.total_bytes <= 12 * GiB
    same_with_16bit_kv = [x for x in p.candidates if x.quant is c.quant and x.kv_cache_dtype == "auto"]
    assert same_with_16bit_kv and "memory budget" in same_with_16bit_kv[0].reasons[0]
    assert p.fallback
    # every 16-bit-KV rung of the 8B was tried before the 8-bit-KV rungs
    first_8bit = next(i for i, x in enumerate(p.candidates) if x.kv_cache_dtype != "auto")
    assert all(x.kv_cache_dtype == "auto" for x in p.candidates[:first_8bit])
    assert {x.quant.id for x in p.candidates[:first_8bit]} >= {"bf16", "fp8", "q4_k_m", "q4_0"}


def test_kv_cache_rung_needs_allow_kv_cache_quantization(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1))
    p = plan(make_spec(memoryBudget="12Gi", contextLength=65536, fallback={"allowKVCacheQuantization": False}), inv)
    c = chosen(p)
    assert c.model.id != "llama-3.1-8b-instruct"  # a smaller model instead
    assert c.model.capability == "text"
    assert all(x.kv_cache_dtype == "auto" for x in p.candidates)


def test_kv_cache_rung_is_skipped_when_the_cache_is_not_the_problem(make_spec, make_inventory, make_node):
    # short context: the 8B's weights are what does not fit a 6 GiB budget, not its 0.25 GiB of cache
    p = plan(make_spec(memoryBudget="6Gi", contextLength=2048), make_inventory(make_node("a", "NVIDIA-L4", 1)))
    assert p.feasible
    assert all(x.kv_cache_dtype == "auto" for x in p.candidates)


def test_smaller_model_of_the_same_capability(make_spec, make_inventory, make_node):
    # 70B needs ~37 GiB even at 4 bits: one 24 GB L4 cannot hold it, the 8B can
    p = plan(make_spec(model="llama-3.3-70b-instruct"), make_inventory(make_node("l", "NVIDIA-L4", 1)))
    c = chosen(p)
    assert c.model.id == "llama-3.1-8b-instruct"
    assert p.fallback and "llama-3.3-70b-instruct" in p.fallback_reason
    assert all(x.model.capability == "text" for x in p.candidates)


def test_allow_smaller_models_false_stops_the_ladder(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.3-70b-instruct", fallback={"allowSmallerModels": False}),
             make_inventory(make_node("l", "NVIDIA-L4", 1)))
    assert not p.feasible
    assert {c.model.id for c in p.candidates} == {"llama-3.3-70b-instruct"}


def test_never_below_the_minimum_model(make_spec, make_inventory, make_node):
    # A 3 GiB budget: no 70B and no 8B variant fits (even 4-bit 8B weights are ~4.4 GiB). The floor is
    # the 8B, so the 3B and 1B are never offered.
    inv = make_inventory(make_node("l", "NVIDIA-L4", 1))
    spec = make_spec(model="llama-3.3-70b-instruct", memoryBudget="3Gi",
                     fallback={"minimumModel": "llama-3.1-8b-instruct"})
    p = plan(spec, inv)
    assert not p.feasible
    assert {c.model.id for c in p.candidates} == {"llama-3.3-70b-instruct", "llama-3.1-8b-instruct"}
    # without the floor the ladder reaches the 1B, which fits 3 GiB at 4 bits
    p = plan(make_spec(model="llama-3.3-70b-instruct", memoryBudget="3Gi"), inv)
    assert chosen(p).model.id in ("llama-3.2-1b-instruct", "llama-3.2-3b-instruct")


def test_ladder_models_order():
    from llama_operator.api import parse_spec

    def ids(**kw):
        base = {"model": "llama-3.1-405b-instruct", "slo": LOOSE, "memoryBudget": "1Ti"}
        base.update(kw)
        return [m.id for m in ladder_models(parse_spec(base))]

    # largest first; one model per size (the newest 70B); nothing of the other capability
    assert ids() == ["llama-3.1-405b-instruct", "llama-3.3-70b-instruct", "llama-3.1-8b-instruct",
                     "llama-3.2-3b-instruct", "llama-3.2-1b-instruct"]
    # the 3.1 70B falls back to smaller models, not sideways to the 3.3 70B
    assert ids(model="llama-3.1-70b-instruct")[:2] == ["llama-3.1-70b-instruct", "llama-3.1-8b-instruct"]
    assert ids(model="llama-3.2-90b-vision-instruct") == ["llama-3.2-90b-vision-instruct",
                                                          "llama-3.2-11b-vision-instruct"]
    assert ids(model="llama-3.2-11b-vision-instruct") == ["llama-3.2-11b-vision-instruct"]
    assert ids(fallback={"minimumModel": "llama-3.1-8b-instruct"})[-1] == "llama-3.1-8b-instruct"
    assert ids(fallback={"allowSmallerModels": False}) == ["llama-3.1-405b-instruct"]


def test_allow_cpu_false_excludes_cpu_nodes(make_spec, make_inventory, make_node):
    tiny = dict(model="llama-3.2-1b-instruct", runtime="llamacpp", contextLength=4096,
                slo={"ttftP95": "3s", "tpotP95": "100ms", "promptTokens": 256})
    cpu_only = make_inventory(make_node("c1", cpu="32", memory="128Gi"))
    assert chosen(plan(make_spec(**tiny), cpu_only)).pool.gpu is None
    p = plan(make_spec(**tiny, fallback={"allowCPU": False}), cpu_only)
    assert not p.feasible and only_stand_ins(p, "no GPU node")
    assert all("fallback.allowCPU is false" in " ".join(c.reasons) for c in p.candidates)
    with_gpu = make_inventory(make_node("c1", cpu="32", memory="128Gi"), make_node("g", "NVIDIA-L4", 1))
    c = chosen(plan(make_spec(**tiny, fallback={"allowCPU": False}), with_gpu))
    assert c.pool.gpu is not None
    assert all(x.pool.gpu is not None for x in plan(make_spec(**tiny, fallback={"allowCPU": False}), with_gpu).candidates)


@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_pinned_runtime_restricts_candidates(make_spec, make_inventory, make_node, runtime):
    inv = make_inventory(make_node("g", "NVIDIA-L4", 1), make_node("c", cpu="32", memory="128Gi"))
    p = plan(make_spec(runtime=runtime, slo={"concurrency": 8}), inv)
    assert p.candidates and all(c.runtime == runtime for c in p.candidates)
    assert chosen(p).runtime == runtime


# --- Cost order among equals ---------------------------------------------------------------------------


def test_cpu_before_gpu_when_it_meets_the_slo(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("g", "NVIDIA-L4", 1), make_node("c", cpu="32", memory="128Gi"))
    tiny = dict(model="llama-3.2-1b-instruct", contextLength=4096)
    c = chosen(plan(make_spec(**tiny, slo={"ttftP95": "3s", "tpotP95": "200ms", "promptTokens": 256}), inv))
    assert c.pool.gpu is None and c.runtime == "llamacpp"
    # a TPOT the CPU cannot stream (1B f16 is ~2.5 GB read per token at 40 GB/s: ~60 ms) goes to the GPU
    p = plan(make_spec(**tiny, slo={"ttftP95": "3s", "tpotP95": "20ms", "promptTokens": 256}), inv)
    c = chosen(p)
    assert c.pool.gpu is not None
    cpu_tries = [x for x in p.candidates if x.pool.gpu is None and x.rung == c.rung]
    assert cpu_tries and all("TPOT" in " ".join(x.reasons) for x in cpu_tries)


def test_fewest_gpus_that_work(make_spec, make_inventory, make_node):
    # 70B bf16 needs at least 2 A100-80GB (~131 GiB of weights); the node has 8, the plan takes 2
    p = plan(make_spec(model="llama-3.3-70b-instruct", memoryBudget="400Gi"),
             make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 8)))
    c = chosen(p)
    assert c.quant.id == "bf16" and c.gpus_per_replica == 2


def test_smaller_gpu_when_both_work(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("big", "NVIDIA-A100-SXM4-80GB", 1), make_node("small", "NVIDIA-L40S", 1))
    c = chosen(plan(make_spec(), inv))
    assert c.pool.gpu.product == "NVIDIA-L40S" and c.quant.bits == 16
    assert [x.verdict for x in plan(make_spec(), inv).candidates].count("chosen") == 1


def test_one_gpu_before_two_smaller_ones(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("one", "NVIDIA-A100-SXM4-80GB", 1), make_node("pair", "NVIDIA-L4", 2))
    # vLLM, 8B bf16 with 4 GiB of cache and ~3 GiB of runtime overhead (> 21.4 GiB usable on an L4):
    # one A100 holds it; on L4s it takes two
    c = chosen(plan(make_spec(runtime="vllm", slo={"concurrency": 4}), inv))
    assert c.gpus_per_replica == 1 and c.pool.gpu.product == "NVIDIA-A100-SXM4-80GB"


# --- Hard limits ---------------------------------------------------------------------------------------


def test_memory_budget_is_a_hard_limit(make_spec, make_inventory, make_node):
    p = plan(make_spec(memoryBudget="4Gi", fallback={"allowSmallerModels": False}),
             make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1)))
    assert not p.feasible
    assert all("memory budget 4.0 GiB" in " ".join(c.reasons) for c in p.candidates if c.estimate)


def test_budget_caps_memory_summed_over_gpus(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.3-70b-instruct", memoryBudget="48Gi"),
             make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 8)))
    c = chosen(p)
    assert c.estimate.total_bytes <= 48 * GiB


def test_gpu_memory_is_a_hard_limit(make_spec, make_inventory, make_node):
    # 90B bf16 (~165 GiB of weights) on one 24 GB L4
    p = plan(make_spec(model="llama-3.2-90b-vision-instruct", memoryBudget="1Ti",
                       fallback={"allowSmallerModels": False}), make_inventory(make_node("l", "NVIDIA-L4", 1)))
    assert not p.feasible
    assert "usable on NVIDIA-L4" in reasons_text(p, quant="bf16")


def test_gpus_held_by_bound_pods_are_not_free(make_spec, make_inventory, make_node, make_pod):
    node = make_node("a", "NVIDIA-A100-SXM4-80GB", 1)
    assert plan(make_spec(), make_inventory(node)).feasible
    p = plan(make_spec(), make_inventory(node, pods=[make_pod("a", gpus=1)]))
    assert not p.feasible
    assert "free" in reasons_text(p)
    # a finished pod holds nothing
    assert plan(make_spec(), make_inventory(node, pods=[make_pod("a", gpus=1, phase="Succeeded")])).feasible


def test_tensor_parallel_needs_free_gpus_on_one_node(make_spec, make_inventory, make_node, make_pod):
    # 70B bf16 needs >= 2 A100s on one node; 6 of 8 taken leaves 2 here, 7 taken leaves 1
    spec = make_spec(model="llama-3.3-70b-instruct", memoryBudget="400Gi", fallback={"allowQuantization": False,
                                                                                      "allowSmallerModels": False})
    node = make_node("a", "NVIDIA-A100-SXM4-80GB", 8)
    assert chosen(plan(spec, make_inventory(node, pods=[make_pod("a", gpus=6)]))).gpus_per_replica == 2
    p = plan(spec, make_inventory(node, pods=[make_pod("a", gpus=7)]))
    assert not p.feasible
    # split over two nodes does not count: two nodes with one free GPU each are no better
    p = plan(spec, make_inventory(node, make_node("b", "NVIDIA-A100-SXM4-80GB", 8),
                                  pods=[make_pod("a", gpus=7), make_pod("b", gpus=7, name="b")]))
    assert not p.feasible


def test_replicas_need_a_placement_each(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1), make_node("b", "NVIDIA-L4", 1))
    assert chosen(plan(make_spec(replicas=2, fallback={"allowCPU": False}), inv))
    p = plan(make_spec(replicas=3), inv)
    assert not p.feasible
    assert "3 replica(s)" in reasons_text(p)


def test_reserved_gpus_are_not_free(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1))
    taken = inv.reserve(lambda n: n.shape.gpu is not None and n.shape.gpu.product == "NVIDIA-L4", 1, 1)
    assert plan(make_spec(), inv).feasible
    assert not plan(make_spec(), taken).feasible


def test_ttft_slo_is_a_hard_limit(make_spec, make_inventory, make_node):
    # prefilling 512 tokens through 8B parameters is 2 x 8e9 x 512 = 8.2 TFLOP: over 8 ms on one H100 even
    # at its full 989 TFLOPS, and longer on a CPU
    p = plan(make_spec(slo={"ttftP95": "5ms", "tpotP95": "1s"}, fallback={"allowSmallerModels": False}),
             make_inventory(make_node("a", "NVIDIA-H100-80GB-HBM3", 1), make_node("c")))
    assert not p.feasible
    assert all("TTFT" in " ".join(c.reasons) for c in p.candidates if c.estimate)


def test_tpot_slo_is_a_hard_limit(make_spec, make_inventory, make_node):
    # one token reads every weight: even 4-bit 8B (~5 GB) takes > 1.5 ms at an H100's 3.35 TB/s
    p = plan(make_spec(slo={"ttftP95": "10s", "tpotP95": "1ms"}, fallback={"allowSmallerModels": False}),
             make_inventory(make_node("a", "NVIDIA-H100-80GB-HBM3", 1), make_node("c")))
    assert not p.feasible
    assert all("TPOT" in " ".join(c.reasons) for c in p.candidates if c.estimate)


def test_tighter_tpot_moves_to_faster_hardware(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("l4", "NVIDIA-L4", 1), make_node("h", "NVIDIA-H100-80GB-HBM3", 1))
    c = chosen(plan(make_spec(slo={"ttftP95": "10s", "tpotP95": "15ms"}, fallback={"allowSmallerModels": False}),
                    inv))
    assert c.pool.gpu.product == "NVIDIA-H100-80GB-HBM3"
    assert c.estimate.tpot_seconds <= 0.015


# --- The support matrix --------------------------------------------------------------------------------


def test_vision_models_are_never_planned_on_llamacpp(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("l", "NVIDIA-L4", 1), make_node("c", cpu="64", memory="256Gi"))
    p = plan(make_spec(model="llama-3.2-11b-vision-instruct"), inv)
    assert p.candidates and all(c.runtime == "vllm" for c in p.candidates)
    assert all(c.pool.gpu is not None for c in p.candidates)


@pytest.mark.parametrize("model, product, marlin_floor", [
    ("llama-3.2-11b-vision-instruct", "Tesla-T4", "8.0"),  # vLLM 0.10.2 (Mllama): Fp8Config needs 8.0
    ("llama-3.2-11b-vision-instruct", "Tesla-V100-SXM2-32GB", "8.0"),
])
def test_fp8_needs_the_marlin_floor_of_its_release(make_spec, make_inventory, make_node, model, product, marlin_floor):
    p = plan(make_spec(model=model, runtime="vllm", fallback={"quantizations": ["fp8"], "allowSmallerModels": False}),
             make_inventory(make_node("g", product, 1)))
    assert not p.feasible
    (c,) = p.candidates
    (reason,) = c.reasons
    cc = load_catalog().find_gpu(product).compute_capability
    assert reason.startswith(f"vLLM {c.engine.removeprefix('vllm-')}: fp8 cannot run")
    assert "fp8-w8a8 needs compute capability >= 8.9" in reason
    assert f"fp8-marlin-w8a16 needs compute capability >= {marlin_floor}" in reason and reason.endswith(f"has {cc}")
    assert c.estimate is None


def test_fp8_runs_weight_only_on_a_t4_with_the_current_vllm(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.2-3b-instruct", runtime="vllm", fallback={"quantizations": ["fp8"]}),
             make_inventory(make_node("t", "Tesla-T4", 1)))
    assert (chosen(p).quant.id, chosen(p).kernel, chosen(p).engine) == ("fp8", "fp8-marlin-w8a16", "vllm-0.34.0")


@pytest.mark.parametrize("product", ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S"])
def test_fp8_runs_w8a8_on_ada_and_hopper(make_spec, make_inventory, make_node, product):
    p = plan(make_spec(runtime="vllm", fallback={"quantizations": ["fp8"]}), make_inventory(make_node("g", product, 1)))
    assert chosen(p).quant.id == "fp8" and chosen(p).kernel == "fp8-w8a8"


@pytest.mark.parametrize("product", ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A10G", "NVIDIA-RTX-A6000"])
def test_fp8_runs_weight_only_on_ampere(make_spec, make_inventory, make_node, product):
    p = plan(make_spec(runtime="vllm", fallback={"quantizations": ["fp8"]}), make_inventory(make_node("g", product, 1)))
    assert chosen(p).quant.id == "fp8" and chosen(p).kernel == "fp8-marlin-w8a16"


def test_a100_gets_fp8_before_4bit_when_16bit_does_not_fit(make_spec, make_inventory, make_node):
    # 70B: bf16 (~131 GiB) needs two A100-80GB; with one, FP8 (~66 GiB) fits, weight-only on Ampere.
    p = plan(make_spec(model="llama-3.3-70b-instruct", runtime="vllm", fallback={"allowSmallerModels": False}),
             make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1)))
    c = chosen(p)
    assert (c.quant.id, c.kernel) == ("fp8", "fp8-marlin-w8a16")
    assert [x.quant.id for x in p.candidates][0] == "bf16"


def test_fp8_weight_only_decodes_like_a_quantized_kernel():
    # FP8 weights on an A100 (no FP8 tensor cores) run weight-only: the step reads the 8-bit weights at the
    # quantized kernels' bandwidth share and pays their per-parameter dequantisation cost; on an H100 they
    # run W8A8 with the 16-bit kernels' costs.
    from llama_operator import estimate as est
    from llama_operator.catalog import load_catalog

    catalog = load_catalog()
    model, fp8 = catalog.model("llama-3.1-8b-instruct"), catalog.quantizations["fp8"]
    workload = est.Workload(4096)
    active = est.parameter_counts(model.arch).active_per_token
    kv_read = est.kv_read_bytes_per_step(model.arch, workload)
    for product, efficiency, per_parameter in (
            ("NVIDIA-A100-SXM4-80GB", est.DECODE_BANDWIDTH_EFFICIENCY_QUANTIZED, est.DECODE_SECONDS_PER_PARAMETER_QUANTIZED),
            ("NVIDIA-H100-80GB-HBM3", est.DECODE_BANDWIDTH_EFFICIENCY_16BIT, est.DECODE_SECONDS_PER_PARAMETER_16BIT)):
        gpu = catalog.find_gpu(product)
        e = est.estimate(model, fp8, est.Hardware(gpu), workload)
        expected = (e.weights_bytes + kv_read) / (gpu.memory_bandwidth_gbps * 1e9 * efficiency) + active * per_parameter
        assert e.tpot_seconds == pytest.approx(expected), product


@pytest.mark.parametrize("model, product", [
    ("llama-3.2-3b-instruct", "Tesla-T4"),  # vLLM 0.34.0
    ("llama-3.2-11b-vision-instruct", "Tesla-V100-SXM2-32GB"),  # vLLM 0.10.2, whose image still has 7.0 kernels
])
def test_16bit_weights_run_as_fp16_below_compute_capability_8_0(make_spec, make_inventory, make_node, model, product):
    # A bf16 checkpoint runs with --dtype half where the GPU has no bf16: what every T4 user of vLLM does.
    p = plan(make_spec(model=model, runtime="vllm", memoryBudget="32Gi", fallback={"allowSmallerModels": False}),
             make_inventory(make_node("g", product, 1)))
    c = chosen(p)
    assert (c.quant.id, c.kernel, c.runtime) == ("bf16", "fp16-cast", "vllm")
    assert not p.fallback


def test_the_new_user_on_one_t4_gets_16bit_not_awq(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.2-3b-instruct", runtime="vllm", memoryBudget="16Gi"),
             make_inventory(make_node("t", "Tesla-T4", 1)))
    assert chosen(p).quant.id == "bf16" and not p.fallback


def test_compressed_tensors_w4a16_floor_follows_the_release(make_spec, make_inventory, make_node):
    # RedHatAI's w4a16 checkpoints are compressed-tensors (CompressedTensorsWNA16), not GPTQ layout: vLLM
    # 0.10.2 (the vision models' release) needs 8.0 for them, 0.34.0 (text) 7.5.
    t4 = make_inventory(make_node("t", "Tesla-T4", 8))
    vision = make_spec(model="llama-3.2-11b-vision-instruct", fallback={"quantizations": ["gptq-int4"]})
    p = plan(vision, t4)
    assert not p.feasible
    assert all(c.reasons[0].startswith("vLLM 0.10.2:") and "compressed-tensors-w4a16 needs compute capability >= 8.0"
               in c.reasons[0] for c in p.candidates)
    assert chosen(plan(vision, make_inventory(make_node("a", "NVIDIA-A10G", 1)))).kernel == "compressed-tensors-w4a16"
    text = make_spec(model="llama-3.3-70b-instruct", fallback={"quantizations": ["gptq-int4"]})
    c = chosen(plan(text, t4))
    assert (c.engine, c.kernel) == ("vllm-0.34.0", "compressed-tensors-w4a16")


def test_no_quantized_kv_cache_below_compute_capability_8_0(make_spec, make_inventory, make_node):
    # A long context that needs the 8-bit KV cache on a T4: vLLM refuses it there, llama.cpp's q8_0 runs.
    p = plan(make_spec(model="llama-3.2-3b-instruct", memoryBudget="14Gi", contextLength=131072,
                       fallback={"allowSmallerModels": False}),
             make_inventory(make_node("t", "Tesla-T4", 1)))
    refused = [c for c in p.candidates if c.quant.id == "bf16" and c.kv_cache_dtype == "fp8"]
    assert refused and all("no quantized KV cache below compute capability 8.0" in c.reasons[0] for c in refused)
    assert all(c.estimate is None for c in refused)
    c = chosen(p)
    assert c.runtime == "llamacpp" and c.kv_cache_dtype == "q8_0"


def test_the_current_vllm_image_has_no_volta_kernels(make_spec, make_inventory, make_node):
    # vLLM 0.34.0's image is compiled for 7.5 and up: text models on a V100 go to llama.cpp, with why.
    p = plan(make_spec(fallback={"allowSmallerModels": False}), make_inventory(make_node("v", "Tesla-V100-SXM2-16GB", 1)))
    refused = [c for c in p.candidates if c.runtime == "vllm"]
    assert refused and all(c.reasons == ["vLLM 0.34.0: its image has no kernels below compute capability 7.5; "
                                         "Tesla-V100-SXM2-16GB has 7.0"] for c in refused)
    assert chosen(p).runtime == "llamacpp"


def test_awq_needs_turing_but_gptq_runs_from_pascal(make_spec, make_inventory, make_node):
    # vLLM 0.34.0 on a T4: AutoAWQConfig (7.5) and AutoGPTQConfig (6.0) both run, as their Marlin kernels.
    p = plan(make_spec(runtime="vllm", fallback={"quantizations": ["awq-int4", "gptq-int4"]}),
             make_inventory(make_node("t", "Tesla-T4", 1)))
    assert {(c.quant.id, c.kernel) for c in p.candidates if c.feasible} == {("awq-int4", "awq_marlin"),
                                                                           ("gptq-int4", "gptq_marlin")}
    from llama_operator.engines import kernel_for, release
    gptq = load_catalog().quantizations["gptq-int4"]
    pascal = replace(load_catalog().find_gpu("Tesla-T4"), compute_capability="6.1")
    awq = load_catalog().quantizations["awq-int4"]
    model = load_catalog().model("llama-3.1-8b-instruct")
    assert kernel_for(release("vllm-0.34.0"), model, gptq, pascal).id == "gptq_marlin"
    assert kernel_for(release("vllm-0.34.0"), model, awq, pascal) is None


def test_vision_models_have_no_vllm_image_for_amd(make_spec, make_inventory, make_node):
    # vLLM 0.10.2 (the last with Mllama) published no ROCm image: nothing is planned on an MI300X.
    node = make_node("mi", labels={"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"})
    node["status"]["allocatable"]["amd.com/gpu"] = "8"
    p = plan(make_spec(model="llama-3.2-11b-vision-instruct"), make_inventory(node))
    assert not p.feasible
    assert all("vLLM 0.10.2: no pinned image for amd" in c.reasons[0] for c in p.candidates) and p.candidates


def test_vision_models_run_on_the_newest_vllm_that_serves_mllama(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("l", "NVIDIA-L40S", 1))
    vision = chosen(plan(make_spec(model="llama-3.2-11b-vision-instruct"), inv))
    text = chosen(plan(make_spec(model="llama-3.1-8b-instruct"), inv))
    from llama_operator.engines import release

    assert "MllamaForConditionalGeneration" in release(vision.engine).architectures
    assert "MllamaForConditionalGeneration" not in release(text.engine).architectures
    assert vision.engine != text.engine


def test_vllm_is_never_offered_cpu_nodes(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.2-11b-vision-instruct"), make_inventory(make_node("c", cpu="64", memory="256Gi")))
    assert not p.feasible and only_stand_ins(p, "no GPU node")  # listed, never on the CPU pool
    assert "GPU" in p.fallback_reason


def test_every_variant_the_ladder_considers_is_a_candidate_even_without_hardware_for_its_runtime():
    # The issue: a vision model on a CPU-only cluster answered with no candidates while its reasons named
    # three variants. Each vLLM variant is now a rejected candidate on "no GPU node", saying why.
    p = plan(example_spec("chat-11b-vision.yaml"), example_cluster("cpu-only.yaml"))
    assert not p.feasible
    assert [(c.model.id, c.quant.id) for c in p.candidates] == [
        ("llama-3.2-11b-vision-instruct", q) for q in ("bf16", "fp8", "gptq-int4")]
    for c in p.candidates:
        assert c.verdict == "rejected" and c.hardware == "no GPU node" and c.estimate is None
        assert c.reasons == [f"vLLM {c.engine.removeprefix('vllm-')} needs a GPU",
                             "no ready GPU node matches the placement"]
        assert c.to_dict()["gpuProduct"] is None and c.to_dict()["predicted"] is None
    # the reason names the same variants the candidates list, rung by rung
    assert p.fallback_reason.count("no GPU node: vLLM 0.10.2 needs a GPU") == 3
    assert len(p.rejected) == 3


def test_status_rejected_lists_the_variants_no_node_can_run():
    from llama_operator.reconcile import _rejected

    p = plan(example_spec("chat-11b-vision.yaml"), example_cluster("cpu-only.yaml"))
    rejected = _rejected(p)
    assert [(r.quantization, r.hardware) for r in rejected] == [
        ("bf16", "no GPU node"), ("fp8", "no GPU node"), ("gptq-int4", "no GPU node")]
    assert all("needs a GPU" in r.reasons[0] for r in rejected)


def test_a_vllm_variant_without_a_gpu_node_is_listed_after_the_cpu_candidates(make_spec, make_inventory, make_node):
    # 1B on CPU: the bf16 variant (vLLM) shares the first rung with f16 (llama.cpp); f16 runs on the CPU
    # node and is chosen, bf16 is listed after it, rejected, on no GPU node.
    tiny = dict(model="llama-3.2-1b-instruct", contextLength=4096,
                slo={"ttftP95": "3s", "tpotP95": "200ms", "promptTokens": 256})
    p = plan(make_spec(**tiny), make_inventory(make_node("c", cpu="32", memory="128Gi")))
    c = chosen(p)
    assert c.pool.gpu is None and c.runtime == "llamacpp" and c.rung == 0
    first_rung = [x for x in p.candidates if x.rung == 0]
    assert first_rung[0] is c
    stand_in = [x for x in first_rung if x.hardware == "no GPU node"]
    assert [x.quant.id for x in stand_in] == ["bf16"] and first_rung[-1] is stand_in[0]
    assert not p.fallback and p.fallback_reason == ""


def test_no_stand_in_candidate_when_some_pool_can_run_the_variant():
    # Plans are otherwise unchanged: with a GPU pool, no vLLM variant is listed on "no GPU node", and a
    # CPU pool never gets a vLLM attempt.
    for example, cluster in (("chat-11b-vision.yaml", "l4-pool.yaml"), ("70b-tight-tpot.yaml", "mixed.yaml"),
                             ("tiny-cpu.yaml", "mixed.yaml"), ("impossible.yaml", "h100-8x.yaml")):
        p = plan(example_spec(example), example_cluster(cluster))
        assert p.candidates and not any(c.pool.label for c in p.candidates), (example, cluster)
        assert not any(c.pool.gpu is None and c.runtime == "vllm" for c in p.candidates)


def test_no_node_matching_the_placement_lists_every_variant_with_why(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1, labels={"pool": "batch"}), make_node("c"))
    p = plan(make_spec(model="llama-3.2-1b-instruct", placement={"nodeSelector": {"pool": "nowhere"}}), inv)
    assert not p.feasible and only_stand_ins(p, "no GPU node", "no matching node")
    vllm = [c for c in p.candidates if c.runtime == "vllm"]
    llamacpp = [c for c in p.candidates if c.runtime == "llamacpp"]
    assert vllm and all(c.hardware == "no GPU node" for c in vllm)
    assert llamacpp and all(c.reasons == ["no ready node matches the placement"] for c in llamacpp)
    # each rung the reason names has its candidates
    assert {c.rung for c in p.candidates} == set(range(max(c.rung for c in p.candidates) + 1))


# --- Placement -----------------------------------------------------------------------------------------


def test_node_selector(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 1, labels={"pool": "batch"}),
                         make_node("b", "NVIDIA-L4", 1, labels={"pool": "serving"}))
    c = chosen(plan(make_spec(placement={"nodeSelector": {"pool": "serving"}}), inv))
    assert c.pool.gpu.product == "NVIDIA-L4"
    p = plan(make_spec(placement={"nodeSelector": {"pool": "nowhere"}}), inv)
    assert not p.feasible and any("placement" in n for n in p.notes)


def test_node_selector_on_the_hostname_label(make_spec, make_inventory, make_node):
    # Every node carries kubernetes.io/hostname; pinning a deployment to a node with it is ordinary
    # Kubernetes (a pod with this nodeSelector schedules onto node "b").
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1), make_node("b", "NVIDIA-L4", 1))
    p = plan(make_spec(placement={"nodeSelector": {"kubernetes.io/hostname": "b"}}), inv)
    assert p.feasible, p.notes


def test_taints_need_tolerations(make_spec, make_inventory, make_node):
    dedicated = {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}
    inv = make_inventory(make_node("tainted", "NVIDIA-H100-80GB-HBM3", 1, taints=[dedicated]),
                         make_node("open", "NVIDIA-L4", 1))
    # the nvidia.com/gpu taint on both GPU nodes is tolerated by the operator itself
    assert chosen(plan(make_spec(), inv)).pool.gpu.product == "NVIDIA-L4"
    for toleration in ({"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
                       {"key": "dedicated", "operator": "Exists"},
                       {"operator": "Exists"}):
        p = plan(make_spec(placement={"tolerations": [toleration], "gpuProducts": ["H100"]}), inv)
        assert chosen(p).pool.gpu.product == "NVIDIA-H100-80GB-HBM3", toleration
    for wrong in ({"key": "dedicated", "value": "other"}, {"key": "other", "operator": "Exists"},
                  {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}):
        assert not plan(make_spec(placement={"tolerations": [wrong], "gpuProducts": ["H100"]}), inv).feasible, wrong


def test_prefer_no_schedule_taints_do_not_exclude(make_spec, make_inventory, make_node):
    soft = {"key": "spot", "value": "true", "effect": "PreferNoSchedule"}
    assert plan(make_spec(), make_inventory(make_node("a", "NVIDIA-L4", 1, taints=[soft]))).feasible


def test_cpu_node_taints(make_spec, make_inventory, make_node):
    tiny = dict(model="llama-3.2-1b-instruct", contextLength=4096,
                slo={"ttftP95": "5s", "tpotP95": "500ms", "promptTokens": 256})
    tainted = make_inventory(make_node("c", taints=[{"key": "batch", "value": "x", "effect": "NoExecute"}]))
    assert not plan(make_spec(**tiny), tainted).feasible
    ok = make_spec(**tiny, placement={"tolerations": [{"key": "batch", "operator": "Equal", "value": "x"}]})
    assert chosen(plan(ok, tainted)).pool.gpu is None


CONTROL_PLANE = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
MASTER = {"key": "node-role.kubernetes.io/master", "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}
TINY = dict(model="llama-3.2-1b-instruct", contextLength=4096,
            slo={"ttftP95": "5s", "tpotP95": "500ms", "promptTokens": 256})


def test_effective_tolerations_drop_forbidden_keys_and_spell_out_a_keyless_one():
    forbidden = DEFAULT_FORBIDDEN_TOLERATIONS
    assert forbidden == {"node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"}
    keys = ["dedicated", "node-role.kubernetes.io/control-plane", "nvidia.com/gpu"]
    assert effective_tolerations([{"operator": "Exists"}], forbidden, keys) == [
        {"key": "dedicated", "operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists"}]
    # effect and tolerationSeconds are kept; a toleration naming a forbidden key is dropped
    assert effective_tolerations(
        [{"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
         {"key": "node-role.kubernetes.io/master", "operator": "Exists"},
         {"key": "dedicated", "operator": "Equal", "value": "llm"}], forbidden, keys) == [
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "dedicated", "operator": "Equal", "value": "llm"}]
    # no taint to spell it out over: nothing is left of a key-less toleration
    assert effective_tolerations([{"operator": "Exists"}], forbidden, ["node-role.kubernetes.io/master"]) == []
    # nothing forbidden: unchanged; duplicates collapse
    assert effective_tolerations([{"operator": "Exists"}], frozenset(), keys) == [{"operator": "Exists"}]
    assert effective_tolerations([{"operator": "Exists"}, {"key": "dedicated", "operator": "Exists"}],
                                 forbidden, ["dedicated"]) == [{"key": "dedicated", "operator": "Exists"}]


@pytest.mark.parametrize("taint", [CONTROL_PLANE, MASTER])
@pytest.mark.parametrize("toleration", [{"operator": "Exists"}, {"operator": "Exists", "effect": "NoSchedule"},
                                        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
                                        {"key": "node-role.kubernetes.io/master", "operator": "Exists"}])
def test_tolerations_do_not_reach_control_plane_nodes(make_spec, make_inventory, make_node, taint, toleration):
    inv = make_inventory(make_node("cp", cpu="64", memory="256Gi", taints=[taint]))
    spec = make_spec(**TINY, placement={"tolerations": [toleration]})
    p = plan(spec, inv)
    assert not p.feasible and not [c for c in p.candidates if c.pool.label == ""]
    if toleration.get("key") in (None, taint["key"]):
        assert any(f"do not count for the taint(s) {taint['key']} (1 node(s))" in n for n in p.notes), p.notes
    # the operator may be told to allow it (run --forbid-toleration=, an empty list)
    if toleration.get("key") in (None, taint["key"]):
        assert chosen(plan(spec, inv, forbidden_tolerations=frozenset())).pool.gpu is None


def test_a_keyless_toleration_still_counts_for_the_other_taints(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("cp", cpu="64", memory="256Gi", taints=[CONTROL_PLANE]),
                         make_node("gpu", "NVIDIA-L4", 1, taints=[DEDICATED]))
    spec = make_spec(**TINY, placement={"tolerations": [{"operator": "Exists"}]})
    c = chosen(plan(spec, inv))
    assert c.pool.gpu is not None and c.pool.gpu.product == "NVIDIA-L4"  # not the roomier control-plane node
    assert plan(spec, inv).notes == [
        "placement.tolerations do not count for the taint(s) node-role.kubernetes.io/control-plane (1 node(s)): the "
        "operator does not let LlamaDeployments tolerate them (llama-operator run --forbid-toleration)",
        "placement excluded 1 node(s)"]
    # the pods carry what the planner counted: the wildcard spelt out over the L4 node's taints
    chosen_plan = c.to_chosen_plan()
    assert pod_tolerations(spec, inv, chosen_plan) == [{"key": "dedicated", "operator": "Exists"},
                                                      {"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod_tolerations(spec, inv, chosen_plan, frozenset()) == [{"operator": "Exists"}]
    rendered = with_pod_tolerations(spec, inv, chosen_plan)
    assert [t.model_dump(exclude_none=True) for t in rendered.placement.tolerations] == \
        pod_tolerations(spec, inv, chosen_plan)
    assert rendered.model_dump(exclude={"placement"}) == spec.model_dump(exclude={"placement"})
    plain = make_spec(**TINY, placement={"tolerations": [{"key": "dedicated", "operator": "Exists"}]})
    assert with_pod_tolerations(plain, inv, chosen_plan) is plain  # nothing to change: the same spec


def test_reserve_and_check_choice_follow_the_same_rule(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("cp", cpu="64", memory="256Gi", taints=[CONTROL_PLANE]),
                         make_node("worker", cpu="64", memory="256Gi", taints=[DEDICATED]))
    spec = make_spec(**TINY, placement={"tolerations": [{"operator": "Exists"}]})
    c = chosen(plan(spec, inv, forbidden_tolerations=frozenset()))
    taken = reserve_plan(inv, spec, c.to_chosen_plan(), 1)
    assert taken.free["cp"] == inv.free["cp"] and taken.free["worker"] != inv.free["worker"]
    assert check_choice(spec, inv, c.to_chosen_plan()) == []
    only_cp = make_inventory(make_node("cp", cpu="64", memory="256Gi", taints=[CONTROL_PLANE]))
    assert check_choice(spec, only_cp, c.to_chosen_plan()) != []
    assert check_choice(spec, only_cp, c.to_chosen_plan(), forbidden_tolerations=frozenset()) == []


@pytest.mark.parametrize("allowed", [["L4"], ["NVIDIA-L4"], ["l4"]])
def test_gpu_products_with_aliases(make_spec, make_inventory, make_node, allowed):
    inv = make_inventory(make_node("h", "NVIDIA-H100-80GB-HBM3", 1), make_node("l", "NVIDIA-L4", 1),
                         make_node("c"))
    p = plan(make_spec(placement={"gpuProducts": allowed}), inv)
    assert {c.pool.gpu.product for c in p.candidates if c.pool.gpu} == {"NVIDIA-L4"}
    assert chosen(p).pool.gpu is None or chosen(p).pool.gpu.product == "NVIDIA-L4"


def test_gpu_products_alias_matches_an_old_driver_label(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("old", "A100-SXM4-40GB", 1))
    assert chosen(plan(make_spec(placement={"gpuProducts": ["NVIDIA-A100-SXM4-40GB"]}), inv))
    assert chosen(plan(make_spec(placement={"gpuProducts": ["A100-40GB"]}), inv))


def test_not_ready_and_cordoned_nodes_are_excluded(make_spec, make_inventory, make_node):
    inv = make_inventory(make_node("down", "NVIDIA-H100-80GB-HBM3", 1, ready=False),
                         make_node("cordoned", "NVIDIA-A100-SXM4-80GB", 1, unschedulable=True),
                         make_node("ok", "NVIDIA-L4", 1))
    p = plan(make_spec(), inv)
    assert {c.pool.gpu.product for c in p.candidates} == {"NVIDIA-L4"}
    p = plan(make_spec(), make_inventory(make_node("down", "NVIDIA-H100-80GB-HBM3", 1, ready=False)))
    assert not p.feasible and only_stand_ins(p, "no GPU node", "no matching node")


def test_unknown_gpu_product_plans_from_its_memory_label_with_a_note(make_spec, make_inventory, make_node):
    big = make_inventory(make_node("z", "NVIDIA-Z9000", 1, memory_mib=96 * 1024, compute="9.0"))
    p = plan(make_spec(), big)
    c = chosen(p)
    assert c.pool.gpu.product == "NVIDIA-Z9000"
    assert any("NVIDIA-Z9000" in n and "not in the catalog" in n for n in p.notes)
    assert p.to_dict()["notes"] == p.notes
    # an 8 GiB card of the same unknown product cannot hold the 8B in 16 bits (~15 GiB of weights)
    small = make_inventory(make_node("z", "NVIDIA-Z9000", 1, memory_mib=8 * 1024, compute="9.0"))
    p = plan(make_spec(fallback={"allowSmallerModels": False}), small)
    assert "usable on NVIDIA-Z9000" in reasons_text(p, quant="bf16")


# --- Infeasible plans and determinism ------------------------------------------------------------------


def test_infeasible_plan_keeps_a_reason_for_each_rejection(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.1-405b-instruct", memoryBudget="16Gi", fallback={"allowSmallerModels": False}),
             make_inventory(make_node("l", "NVIDIA-L4", 1), make_node("c")))
    assert not p.feasible and p.chosen is None
    d = p.to_dict()
    assert d["feasible"] is False and d["chosen"] is None
    assert d["candidates"] and all(c["verdict"] == "rejected" and c["reasons"] for c in d["candidates"])
    assert p.summary().startswith("no feasible plan")


def test_feasible_plan_has_one_chosen_candidate(make_spec):
    p = plan(make_spec(), example_cluster("mixed.yaml"))
    verdicts = [c.verdict for c in p.candidates]
    assert verdicts.count("chosen") == 1
    assert all(c.feasible for c in p.candidates if c.verdict in ("chosen", "feasible"))
    assert all(c.reasons for c in p.candidates if c.verdict == "rejected")


@pytest.mark.parametrize("example, cluster", [
    ("70b-tight-tpot.yaml", "mixed.yaml"), ("vision-90b-on-l4.yaml", "l4-pool.yaml"),
    ("chat.yaml", "cpu-only.yaml"), ("impossible.yaml", "h100-8x.yaml"),
])
def test_same_input_same_plan(example, cluster):
    spec = example_spec(example)
    assert plan(spec, example_cluster(cluster)).to_dict() == plan(spec, example_cluster(cluster)).to_dict()


def test_node_order_does_not_change_the_plan():
    spec = example_spec("70b-tight-tpot.yaml")
    docs = examples.cluster_nodes("mixed.yaml")
    expected = plan(spec, Inventory.from_manifests(docs)).to_dict()
    for seed in range(3):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        assert plan(spec, Inventory.from_manifests(shuffled)).to_dict() == expected


def test_plan_to_dict_shape(make_spec):
    d = plan(make_spec(), example_cluster("a100.yaml")).to_dict()
    assert {"feasible", "fallback", "chosen", "candidates", "notes", "requestedModel", "fallbackReason"} <= set(d)
    ch = d["chosen"]
    assert {"model", "quantization", "runtime", "gpuProduct", "gpusPerReplica", "predicted", "weightsSource"} <= set(ch)
    assert set(ch["predicted"]) >= {"memoryBytes", "ttftSeconds", "tpotSeconds"}
    assert ch["runtime"] == "vllm" and ch["gpuProduct"] == "NVIDIA-A100-SXM4-80GB"
    assert ch["weightsSource"] == load_catalog().model(ch["model"]).vllm_repos[ch["quantization"]]


def test_a_pool_is_sized_by_its_smallest_gpu(make_spec, make_inventory, make_node):
    # Two A100-80GB nodes, one of them reporting 40 GiB (a MIG slice): a replica may land on either, so the
    # 70B in FP8 (~66 GiB) does not fit the pool; it would on the full-size node alone.
    spec = make_spec(model="llama-3.3-70b-instruct", runtime="vllm",
                     fallback={"quantizations": ["fp8"], "allowSmallerModels": False})
    full = make_node("a", "NVIDIA-A100-SXM4-80GB", 1)
    assert plan(spec, make_inventory(full)).feasible
    p = plan(spec, make_inventory(full, make_node("b", "NVIDIA-A100-SXM4-80GB", 1, memory_mib=40960)))
    assert not p.feasible
    assert any("per GPU" in r and "usable on NVIDIA-A100-SXM4-80GB" in r for r in p.candidates[0].reasons)
