"""Fine-tuned models (issue 13): the rules of spec.adapters and spec.weights, and how the planner treats them:
the base model pinned, the adapters' memory counted, a runtime only for adapters it can load, a fine-tune's
own rungs (its 16-bit checkpoint, vLLM's in-flight FP8, its GGUF file). docs/adapters.md."""
from __future__ import annotations

import pytest

from llama_operator.api import SpecError, parse_spec
from llama_operator.catalog import load_catalog
from llama_operator.engines import release
from llama_operator.finetune import gguf_quantization_in_name, parse_source
from llama_operator.lora import peft_adapter_bytes, vllm_lora_reservation_bytes, vllm_lora_settings
from llama_operator.planner import check_choice, plan

GiB = 2**30
MiB = 2**20
PEFT = "hf://acme/llama-3.1-8b-support@v3"
GGUF = "hf://acme/llama-3.1-8b-support-gguf@v3/support-F16.gguf"


def problems(spec: dict, name: str = "chat") -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec, name)
    return info.value.problems


def the_problem(spec: dict, field: str, name: str = "chat") -> str:
    found = [p for p in problems(spec, name) if p.startswith(field)]
    assert found, problems(spec, name)
    return found[0]


# --- Sources -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, scheme, location, revision, path", [
    ("hf://acme/lora", "hf", "acme/lora", None, ""),
    ("hf://acme/lora@v2", "hf", "acme/lora", "v2", ""),
    ("hf://acme/lora@0123abc/sub/adapter-F16.gguf", "hf", "acme/lora", "0123abc", "sub/adapter-F16.gguf"),
    ("pvc://loras/support/en", "pvc", "loras", None, "support/en"),
    ("pvc://loras", "pvc", "loras", None, ""),
])
def test_sources_parse_into_repository_revision_and_path(text, scheme, location, revision, path):
    s = parse_source(text)
    assert (s.scheme, s.location, s.revision, s.path) == (scheme, location, revision, path)


@pytest.mark.parametrize("source, says", [
    ("s3://bucket/lora", "no source scheme"),
    ("acme/lora", "no source scheme"),
    ("hf://acme", "not a valid hf:// source"),
    ("hf://acme/lora/../../etc", "not a valid hf:// source"),
    ("hf://acme/lora/.hidden", "not a valid hf:// source"),
    ("hf://acme/lora@", "not a valid hf:// source"),
    ("hf://acme/lora@v2@v3", "not a valid hf:// source"),
    ("pvc://Bad_Claim/x", "not a valid pvc:// source"),
    ("", "empty"),
])
def test_a_bad_source_is_refused_naming_the_field_and_the_forms_that_work(spec_dict, source, says):
    message = the_problem(spec_dict(adapters=[{"name": "a", "source": source}]), "spec.adapters[0].source")
    assert says in message and len(message) < 400


@pytest.mark.parametrize("name, quant", [
    ("legal-8b-Q4_K_M.gguf", "q4_k_m"), ("Model.Q8_0.gguf", "q8_0"), ("m-f16.gguf", "f16"),
    ("x_q4_0.gguf", "q4_0"), ("model.gguf", None), ("bf16-model.gguf", None),
])
def test_a_gguf_files_quantization_is_read_from_its_name(name, quant):
    gguf = [q.id for q in load_catalog().quantizations.values() if q.runtime == "llamacpp"]
    assert gguf_quantization_in_name(name, gguf) == quant


# --- Rules across the spec -------------------------------------------------------------------------------


def test_two_adapters_with_one_name_are_refused(spec_dict):
    spec = spec_dict(adapters=[{"name": "a", "source": PEFT}, {"name": "a", "source": PEFT + "-2"}])
    assert "names two adapters" in the_problem(spec, "spec.adapters[1].name")


def test_an_adapter_may_not_take_the_deployments_own_name(spec_dict):
    spec = spec_dict(adapters=[{"name": "chat", "source": PEFT}])
    assert "LlamaDeployment's own name" in the_problem(spec, "spec.adapters[0].name", name="chat")
    parse_spec(spec, "other")  # any other name is fine


@pytest.mark.parametrize("name", ["a=b", "a,b", "a b", "-a", "a:b", "x" * 64])
def test_adapter_names_that_would_break_the_engines_command_line_are_refused(spec_dict, name):
    message = the_problem(spec_dict(adapters=[{"name": name, "source": PEFT}]), "spec.adapters[0].name")
    assert "not a valid adapter name" in message or "more than the 63 allowed" in message


def test_a_rank_vllm_refuses_is_refused_with_the_next_one_up(spec_dict):
    message = the_problem(spec_dict(adapters=[{"name": "a", "source": PEFT, "rank": 24}]), "spec.adapters[0].rank")
    assert "8, 16, 32" in message and "give 32" in message


def test_llama_cpp_takes_any_rank_of_a_gguf_adapter(spec_dict):
    parse_spec(spec_dict(runtime="llamacpp", adapters=[{"name": "a", "source": GGUF, "rank": 24}]))


def test_vision_models_take_no_adapters_in_the_engines_own_words(spec_dict):
    message = the_problem(spec_dict(model="llama-3.2-11b-vision-instruct", adapters=[{"name": "a", "source": PEFT}]),
                          "spec.adapters")
    assert "vLLM 0.10.2" in message and "encoder/decoder" in message


def test_a_pinned_runtime_that_cannot_load_the_adapters_is_refused(spec_dict):
    assert "GGUF adapters only" in the_problem(
        spec_dict(runtime="llamacpp", adapters=[{"name": "a", "source": PEFT}]), "spec.runtime")
    assert "PEFT adapter directories" in the_problem(
        spec_dict(runtime="vllm", adapters=[{"name": "a", "source": GGUF}]), "spec.runtime")


def test_adapters_in_two_formats_are_refused_when_no_runtime_loads_both(spec_dict):
    message = the_problem(spec_dict(adapters=[{"name": "a", "source": PEFT}, {"name": "b", "source": GGUF}]),
                          "spec.adapters")
    assert "vLLM loads PEFT" in message and "llama.cpp loads GGUF" in message


def test_custom_weights_need_a_source_for_the_runtime(spec_dict):
    assert "give source" in the_problem(spec_dict(weights={}), "spec.weights")
    assert "GGUF file" in the_problem(spec_dict(runtime="llamacpp", weights={"source": "hf://acme/ft"}),
                                      "spec.runtime")
    assert "is a GGUF file" in the_problem(spec_dict(weights={"source": "hf://acme/ft/ft-Q4_K_M.gguf"}),
                                           "spec.weights.source")
    assert "not a .gguf file" in the_problem(spec_dict(weights={"gguf": "hf://acme/ft"}), "spec.weights.gguf")


def test_a_gguf_fine_tune_whose_name_hides_its_type_asks_for_it(spec_dict):
    assert "ggufQuantization" in the_problem(spec_dict(weights={"gguf": "hf://acme/ft/ft.gguf"}), "spec.weights.gguf")
    parse_spec(spec_dict(weights={"gguf": "hf://acme/ft/ft.gguf", "ggufQuantization": "q5_k_m"}))


def test_listed_quantizations_must_include_one_the_fine_tune_comes_in(spec_dict):
    message = the_problem(spec_dict(weights={"source": "hf://acme/ft"}, fallback={"quantizations": ["awq-int4"]}),
                          "spec.fallback.quantizations")
    assert "bf16, fp8" in message
    message = the_problem(spec_dict(runtime="llamacpp", weights={"gguf": "hf://acme/ft/ft-Q4_K_M.gguf"},
                                    fallback={"allowQuantization": False}), "spec.fallback.allowQuantization")
    assert "q4_k_m only for llamacpp" in message


def test_a_fine_tunes_gguf_file_below_4_bits_is_served_as_given(make_spec, make_inventory, make_node):
    # below 4 bits the ladder goes only when fallback.quantizations lists it; a fine-tune's only file is chosen
    p = plan(make_spec(runtime="llamacpp", weights={"gguf": "pvc://models/ft-Q3_K_M.gguf"}),
             make_inventory(make_node("cpu", cpu="32")))
    assert p.chosen is not None and p.chosen.quant.id == "q3_k_m"


# --- Memory -----------------------------------------------------------------------------------------------


def test_vllm_sizes_its_slots_from_the_adapters_and_the_concurrency():
    s = vllm_lora_settings((16, 64, 8), concurrency=2)
    assert (s.max_loras, s.max_lora_rank, s.max_cpu_loras) == (2, 64, 3)
    assert vllm_lora_settings((24,), concurrency=8).max_lora_rank == 32


def test_adapter_memory_is_in_the_prediction_and_counts_against_the_budget(make_spec, make_inventory, make_node):
    eight_b = load_catalog().model("llama-3.1-8b-instruct").arch
    adapters = [{"name": "en", "source": PEFT, "rank": 16}, {"name": "de", "source": PEFT + "-de", "rank": 64}]
    inventory = make_inventory(make_node("big", "NVIDIA-L40S", 1))
    without = plan(make_spec(runtime="vllm", fallback={"allowQuantization": False}), inventory).chosen
    with_adapters = plan(make_spec(runtime="vllm", fallback={"allowQuantization": False}, adapters=adapters),
                         inventory).chosen
    reservation = vllm_lora_reservation_bytes(eight_b, max_loras=1, max_lora_rank=64, dtype_bytes=2)
    assert with_adapters.estimate.adapter_bytes == reservation  # concurrency 1: one slot at rank 64
    assert with_adapters.estimate.total_bytes == without.estimate.total_bytes + reservation
    assert with_adapters.estimate.adapter_host_bytes == peft_adapter_bytes(eight_b, 16) + peft_adapter_bytes(eight_b, 64)
    assert with_adapters.to_dict()["predicted"]["adapterBytes"] == reservation
    assert with_adapters.to_chosen_plan().predicted.adapterBytes == reservation
    # a budget between the two: the adapters are what does not fit, and the reason says so
    budget = (without.estimate.total_bytes + reservation // 2) / GiB
    p = plan(make_spec(runtime="vllm", memoryBudget=f"{budget:.3f}Gi", fallback={"allowQuantization": False},
                       adapters=adapters), inventory)
    assert not p.feasible and "adapters 352 MiB" in "\n".join(p.candidates[0].reasons)


# --- Planning ---------------------------------------------------------------------------------------------


def test_adapters_pin_the_base_model_and_say_so(make_spec, make_inventory, make_node):
    # one T4 holds no 70B, not even at 4 bits: without adapters the planner falls back to the 8B
    inventory = make_inventory(make_node("t4", "Tesla-T4", 1))
    free = plan(make_spec(model="llama-3.3-70b-instruct"), inventory)
    assert free.chosen is not None and free.chosen.model.id != "llama-3.3-70b-instruct"
    pinned = plan(make_spec(model="llama-3.3-70b-instruct", adapters=[{"name": "a", "source": PEFT}]), inventory)
    assert not pinned.feasible
    assert {c.model.id for c in pinned.candidates} == {"llama-3.3-70b-instruct"}
    assert "llama-3.3-70b-instruct is pinned: spec.adapters (a) are trained on it" in pinned.fallback_reason
    assert any("pinned" in n for n in pinned.notes)


def test_adapters_keep_quantized_rungs_of_the_base(make_spec, make_inventory, make_node):
    p = plan(make_spec(memoryBudget="14Gi", adapters=[{"name": "a", "source": PEFT}]),
             make_inventory(make_node("l4", "NVIDIA-L4", 1)))
    c = p.chosen
    assert c is not None and c.model.id == "llama-3.1-8b-instruct" and c.quant.bits < 16 and c.runtime == "vllm"


def test_llama_cpp_is_no_candidate_for_peft_adapters_and_says_why(make_spec, make_inventory, make_node):
    p = plan(make_spec(adapters=[{"name": "a", "source": PEFT}]), make_inventory(make_node("cpu", cpu="32")))
    assert not p.feasible
    llama = [c for c in p.candidates if c.runtime == "llamacpp"]
    assert llama and all("GGUF adapters only: spec.adapters[0].source" in c.reasons[0] for c in llama)


def test_gguf_adapters_run_on_llama_cpp_on_cpu(make_spec, make_inventory, make_node):
    p = plan(make_spec(model="llama-3.2-1b-instruct", adapters=[{"name": "a", "source": GGUF, "rank": 8}]),
             make_inventory(make_node("cpu", cpu="32")))
    c = p.chosen
    assert c is not None and c.runtime == "llamacpp" and c.pool.gpu is None and c.estimate.adapter_bytes > 0


def test_a_fine_tune_runs_its_own_checkpoint(make_spec, make_inventory, make_node):
    p = plan(make_spec(weights={"source": "hf://acme/legal@v2"}), make_inventory(make_node("l40s", "NVIDIA-L40S", 1)))
    c = p.chosen
    assert c.quant.id == "bf16" and c.weights_source() == "hf://acme/legal@v2"
    assert c.to_chosen_plan().weightsSource == "hf://acme/legal@v2"


def test_a_fine_tune_falls_back_to_in_flight_fp8_only_and_never_to_published_checkpoints(
        make_spec, make_inventory, make_node):
    inventory = make_inventory(make_node("l4", "NVIDIA-L4", 1))
    p = plan(make_spec(memoryBudget="14Gi", weights={"source": "hf://acme/legal@v2"}), inventory)
    c = p.chosen
    assert c.quant.id == "fp8" and c.weights_source() == "hf://acme/legal@v2" and p.fallback
    assert {x.quant.id for x in p.candidates} == {"bf16", "fp8"}  # no AWQ, GPTQ or published GGUF
    # too small even for FP8: infeasible, pinned, never the 3B
    tight = plan(make_spec(memoryBudget="6Gi", weights={"source": "hf://acme/legal@v2"}), inventory)
    assert not tight.feasible and "spec.weights is a fine-tune of it" in tight.fallback_reason
    assert {x.model.id for x in tight.candidates} == {"llama-3.1-8b-instruct"}


def test_in_flight_fp8_keeps_every_linear_layer_converted(make_spec, make_inventory, make_node):
    # Meta's published 405B FP8 keeps modules in bf16 (models.yaml `unconverted`); vLLM's in-flight FP8
    # converts every linear layer, so the fine-tune is smaller than the published checkpoint
    inventory = make_inventory(make_node("h", "NVIDIA-H200", 8))
    spec = {"model": "llama-3.1-405b-instruct", "memoryBudget": "2000Gi", "fallback": {"quantizations": ["fp8"]}}
    published = plan(make_spec(**spec), inventory).candidates[0].estimate.weights_bytes
    fine_tune = plan(make_spec(**spec, weights={"source": "hf://acme/405b-ft"}), inventory).candidates[0]
    assert fine_tune.estimate.weights_bytes < published


def test_in_flight_quantization_below_the_releases_floor_is_refused(make_spec, make_inventory, make_node):
    floor = release("vllm-0.34.0").in_flight["fp8"].min_compute_capability
    p = plan(make_spec(memoryBudget="14Gi", weights={"source": "hf://acme/legal"}, fallback={"quantizations": ["fp8"]}),
             make_inventory(make_node("v100", "Tesla-V100-SXM2-32GB", 1)))
    assert not p.feasible
    assert any(f"compute capability {floor}" in r or "no kernels below" in r for c in p.candidates for r in c.reasons)


def test_a_gguf_fine_tune_runs_on_llama_cpp(make_spec, make_inventory, make_node):
    p = plan(make_spec(runtime="llamacpp", weights={"gguf": "pvc://models/legal-Q4_K_M.gguf"}),
             make_inventory(make_node("cpu", cpu="32")))
    c = p.chosen
    assert c.quant.id == "q4_k_m" and c.weights_source() == "pvc://models/legal-Q4_K_M.gguf"
    assert [x.quant.id for x in p.candidates] == ["q4_k_m"]


def test_hf_sources_need_a_fetch_command_in_the_releases_image(make_spec, make_inventory, make_node):
    # vLLM 0.10.2 (the vision models' release): no fetch command was read from its image
    inventory = make_inventory(make_node("l40s", "NVIDIA-L40S", 1))
    hf = plan(make_spec(model="llama-3.2-11b-vision-instruct", weights={"source": "hf://acme/vision-ft"}), inventory)
    assert not hf.feasible and "give them as pvc://" in "\n".join(hf.candidates[0].reasons)
    pvc = plan(make_spec(model="llama-3.2-11b-vision-instruct", weights={"source": "pvc://models/vision-ft"}),
               inventory)
    assert pvc.feasible


def test_a_plan_in_force_is_checked_with_its_adapters(make_spec, make_inventory, make_node):
    inventory = make_inventory(make_node("l40s", "NVIDIA-L40S", 1))
    spec = make_spec(runtime="vllm", fallback={"allowQuantization": False}, adapters=[{"name": "a", "source": PEFT}])
    in_force = plan(spec, inventory).chosen.to_chosen_plan()
    assert check_choice(spec, inventory, in_force) == []
    # the same plan with adapters of a much higher rank no longer fits the budget it was planned under
    tight = make_spec(runtime="vllm", fallback={"allowQuantization": False},
                      memoryBudget=f"{in_force.predicted.memoryBytes / GiB:.3f}Gi",
                      adapters=[{"name": "a", "source": PEFT, "rank": 512}])
    assert any("adapters" in r for r in check_choice(tight, inventory, in_force))
