"""api.parse_spec / parse_object: what is accepted, and that every refusal names the field and the fix."""
from __future__ import annotations

import re
import time

import pytest
import yaml

from llama_operator import api, fields
from llama_operator.api import SpecError, parse_object, parse_spec
from llama_operator.units import parse_duration, parse_quantity

from kit.paths import ROOT


def problems_of(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.problems, "a SpecError must carry at least one problem"
    return info.value.problems


def the_problem(spec: dict, field: str) -> str:
    """The one message about `field` (a manifest path such as spec.slo.ttftP95)."""
    problems = problems_of(spec)
    mine = [p for p in problems if p.startswith(field + ":")]
    assert mine, f"no message names {field}: {problems}"
    return mine[0]


@pytest.mark.parametrize("field", ["ttftP95", "tpotP95"])
@pytest.mark.parametrize("good", ["500ms", "1.5s", "1m30s"])
def test_slo_durations_accepted(spec_dict, field, good):
    spec = parse_spec(spec_dict(slo={field: good}))
    seconds = spec.slo.ttft_seconds if field == "ttftP95" else spec.slo.tpot_seconds
    assert seconds == pytest.approx(parse_duration(good))


@pytest.mark.parametrize("field", ["ttftP95", "tpotP95"])
@pytest.mark.parametrize("bad, hint", [("500 ms", "not a duration"), ("fast", "not a duration"),
                                       ("0ms", "longer than zero"), ("0s", "longer than zero")])
def test_slo_bad_durations_name_the_field_and_the_fix(spec_dict, field, bad, hint):
    message = the_problem(spec_dict(slo={field: bad}), f"spec.slo.{field}")
    assert hint in message
    assert "500ms" in message  # an example of what to write instead


@pytest.mark.parametrize("good, n", [("48Gi", 48 * 2**30), ("80G", 80 * 10**9), (1024, 1024)])
def test_memory_budget_quantities_accepted(spec_dict, good, n):
    assert parse_spec(spec_dict(memoryBudget=good)).memory_budget_bytes == n


@pytest.mark.parametrize("bad, hint", [(-1, "larger than zero"), ("lots", "not a quantity"),
                                       (0, "larger than zero"), ("0Gi", "larger than zero"),
                                       ("48 GB", "not a quantity")])
def test_memory_budget_bad_quantities_name_the_field_and_the_fix(spec_dict, bad, hint):
    message = the_problem(spec_dict(memoryBudget=bad), "spec.memoryBudget")
    assert hint in message
    assert "48Gi" in message


def test_memory_budget_boolean_is_not_a_quantity(spec_dict):
    # `memoryBudget: true` (e.g. a YAML slip) is refused by the CRD (int-or-string) and by parse_quantity;
    # the operator must not read it as a budget of 1 byte.
    message = the_problem(spec_dict(memoryBudget=True), "spec.memoryBudget")
    assert "quantity" in message or "valid" in message


def test_cache_size_must_be_a_positive_quantity(spec_dict):
    assert parse_spec(spec_dict(source={"cache": {"size": "200Gi"}})).source.cache.size == "200Gi"
    assert "larger than zero" in the_problem(spec_dict(source={"cache": {"size": 0}}), "spec.source.cache.size")
    assert "not a quantity" in the_problem(spec_dict(source={"cache": {"size": "big"}}), "spec.source.cache.size")


# --- Field-level errors --------------------------------------------------------------------------------


def test_defaults_of_a_minimal_spec(spec_dict):
    spec = parse_spec(spec_dict())
    assert spec.contextLength == 8192
    assert spec.replicas == 1
    assert spec.runtime == "auto"
    assert spec.slo.promptTokens == 512 and spec.slo.concurrency == 1
    f = spec.fallback
    assert f.allowQuantization and f.allowSmallerModels and f.allowCPU and f.allowKVCacheQuantization
    assert f.minimumModel is None and f.quantizations is None


@pytest.mark.parametrize("drop, field", [("model", "spec.model"), ("slo", "spec.slo"),
                                         ("memoryBudget", "spec.memoryBudget")])
def test_missing_required_field_is_named(spec_dict, drop, field):
    spec = spec_dict()
    del spec[drop]
    assert "required" in the_problem(spec, field)


def test_missing_nested_required_field_is_named(spec_dict):
    spec = spec_dict()
    del spec["slo"]["tpotP95"]
    assert "required" in the_problem(spec, "spec.slo.tpotP95")


def test_unknown_model_lists_the_catalog(spec_dict):
    message = the_problem(spec_dict(model="llama-9b"), "spec.model")
    assert "llama-9b" in message and "llama-3.1-8b-instruct" in message


@pytest.mark.parametrize("path, overrides", [
    ("spec.modle", {"modle": "x"}),
    ("spec.slo.ttft", {"slo": {"ttft": "1s"}}),
    ("spec.fallback.allowCpu", {"fallback": {"allowCpu": True}}),
])
def test_misspelt_field_is_named_with_the_fix(spec_dict, path, overrides):
    assert "spelling" in the_problem(spec_dict(**overrides), path)


def test_list_items_are_named_by_index(spec_dict):
    message = the_problem(spec_dict(fallback={"quantizations": ["q4_k_m", "q9"]}), "spec.fallback.quantizations[1]")
    assert "'q9'" in message
    message = the_problem(spec_dict(placement={"tolerations": [{"operator": "Maybe"}]}),
                          "spec.placement.tolerations[0].operator")
    assert "Exists" in message


@pytest.mark.parametrize("overrides, path", [
    ({"replicas": 0}, "spec.replicas"),
    ({"contextLength": 100}, "spec.contextLength"),
    ({"contextLength": 200000}, "spec.contextLength"),
    ({"slo": {"concurrency": 0}}, "spec.slo.concurrency"),
    ({"slo": {"promptTokens": 0}}, "spec.slo.promptTokens"),
    ({"runtime": "tgi"}, "spec.runtime"),
])
def test_out_of_range_values_are_named(spec_dict, overrides, path):
    the_problem(spec_dict(**overrides), path)


def test_several_problems_are_all_reported(spec_dict):
    problems = problems_of(spec_dict(replicas=0, memoryBudget="lots", slo={"ttftP95": "fast"}))
    named = {p.split(":")[0] for p in problems}
    assert {"spec.replicas", "spec.memoryBudget", "spec.slo.ttftP95"} <= named


@pytest.mark.parametrize("spec", [None, {}, [], "model: x"])
def test_empty_or_non_mapping_spec(spec):
    (message,) = problems_of(spec)
    assert message.startswith("spec:") and "model" in message


# --- Cross-field checks --------------------------------------------------------------------------------


def test_vision_model_with_llamacpp_is_refused(spec_dict):
    message = the_problem(spec_dict(model="llama-3.2-11b-vision-instruct", runtime="llamacpp"), "spec.runtime")
    assert "llama.cpp" in message and "vllm" in message
    # the same model with vLLM or auto is fine
    parse_spec(spec_dict(model="llama-3.2-11b-vision-instruct", runtime="vllm"))
    parse_spec(spec_dict(model="llama-3.2-11b-vision-instruct"))


def test_minimum_model_of_another_capability_is_refused(spec_dict):
    message = the_problem(spec_dict(fallback={"minimumModel": "llama-3.2-11b-vision-instruct"}),
                          "spec.fallback.minimumModel")
    assert "vision" in message and "text" in message
    message = the_problem(spec_dict(model="llama-3.2-90b-vision-instruct",
                                    fallback={"minimumModel": "llama-3.2-1b-instruct"}), "spec.fallback.minimumModel")
    assert "pick a vision model" in message


def test_minimum_model_larger_than_the_model_is_refused(spec_dict):
    message = the_problem(spec_dict(fallback={"minimumModel": "llama-3.1-70b-instruct"}), "spec.fallback.minimumModel")
    assert "larger" in message


@pytest.mark.parametrize("model, floor", [
    ("llama-3.1-8b-instruct", "llama-3.1-8b-instruct"),        # the same model
    ("llama-3.1-70b-instruct", "llama-3.3-70b-instruct"),      # the same size
    ("llama-3.1-405b-instruct", "llama-3.2-1b-instruct"),
    ("llama-3.2-90b-vision-instruct", "llama-3.2-11b-vision-instruct"),
])
def test_minimum_model_same_size_or_smaller_and_same_capability_is_fine(spec_dict, model, floor):
    assert parse_spec(spec_dict(model=model, fallback={"minimumModel": floor})).fallback.minimumModel == floor


@pytest.mark.parametrize("prompt, context", [(8192, 8192), (9000, 8192), (4096, 4096)])
def test_prompt_tokens_must_leave_room_for_the_answer(spec_dict, prompt, context):
    message = the_problem(spec_dict(slo={"promptTokens": prompt}, contextLength=context), "spec.slo.promptTokens")
    assert "contextLength" in message


def test_default_prompt_tokens_against_a_short_context(spec_dict):
    # promptTokens defaults to 512; a 256-token context leaves no room for it
    message = the_problem(spec_dict(contextLength=256), "spec.slo.promptTokens")
    assert "512" in message
    parse_spec(spec_dict(contextLength=256, slo={"promptTokens": 128}))


def test_quantizations_not_servable_by_the_pinned_runtime(spec_dict):
    message = the_problem(spec_dict(runtime="vllm", fallback={"quantizations": ["q4_k_m", "q8_0"]}),
                          "spec.fallback.quantizations")
    assert "vllm" in message and "awq-int4" in message  # says what vLLM does serve
    message = the_problem(spec_dict(runtime="llamacpp", fallback={"quantizations": ["awq-int4"]}),
                          "spec.fallback.quantizations")
    assert "llamacpp" in message and "q4_k_m" in message
    # a mixed list is fine: the runtime uses what it can serve
    parse_spec(spec_dict(runtime="vllm", fallback={"quantizations": ["awq-int4", "q4_k_m"]}))
    # runtime auto may pick either
    parse_spec(spec_dict(fallback={"quantizations": ["q4_k_m"]}))


def test_empty_quantizations_list_is_refused(spec_dict):
    message = the_problem(spec_dict(fallback={"quantizations": []}), "spec.fallback.quantizations")
    assert "empty" in message and "leave the field out" in message


def test_quantizations_the_model_is_not_published_in(spec_dict):
    # the 90B vision model has no GPTQ checkpoint (and no GGUF at all)
    message = the_problem(spec_dict(model="llama-3.2-90b-vision-instruct", fallback={"quantizations": ["gptq-int4"]}),
                          "spec.fallback.quantizations")
    assert "not published" in message


def test_cross_field_problems_are_reported_together(spec_dict):
    problems = problems_of(spec_dict(model="llama-3.2-11b-vision-instruct", runtime="llamacpp",
                                     fallback={"minimumModel": "llama-3.2-90b-vision-instruct"},
                                     slo={"promptTokens": 9000}))
    named = {p.split(":")[0] for p in problems}
    assert {"spec.runtime", "spec.fallback.minimumModel", "spec.slo.promptTokens"} <= named


# --- Whole objects -------------------------------------------------------------------------------------


def test_parse_object_checks_kind_and_api_version(spec_dict):
    good = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}, "spec": spec_dict()}
    assert parse_object(good).model == "llama-3.1-8b-instruct"
    for bad in ({**good, "kind": "Deployment"}, {**good, "apiVersion": "llama-operator.dev/v1"}):
        with pytest.raises(SpecError) as info:
            parse_object(bad)
        assert "kind/apiVersion" in str(info.value) and api.API_VERSION in str(info.value)
    with pytest.raises(SpecError, match="not a mapping"):
        parse_object(["a", "list"])


def test_parse_object_reports_spec_errors_with_paths(spec_dict):
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "spec": spec_dict(slo={"tpotP95": "soon"})}
    with pytest.raises(SpecError) as info:
        parse_object(obj)
    assert any(p.startswith("spec.slo.tpotP95:") for p in info.value.problems)
    with pytest.raises(SpecError, match="^spec: empty"):
        parse_object({"apiVersion": api.API_VERSION, "kind": api.KIND})


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployments = [d for d in docs if d.get("kind") == api.KIND]
    assert deployments, f"{path.name} holds no LlamaDeployment"
    for doc in deployments:
        parse_object(doc)


# --- Names and the syntax of what ends up in rendered objects -------------------------------------------


def _object(name, spec: dict) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("name", ["chat", "a", "chat-8b", "x" * 63, "l40s-2"])
def test_names_the_service_can_take_are_accepted(spec_dict, name):
    assert fields.name_problems(name) == []
    parse_object(_object(name, spec_dict()))


@pytest.mark.parametrize("name, why", [
    ("my.chat", "dots: a valid custom resource name, not a Service name"),
    ("Chat", "upper case"),
    ("8b-chat", "starts with a digit"),
    ("chat-", "ends with '-'"),
    ("x" * 64, "64 characters"),
    ("x" * 253, "the longest custom resource name"),
    ("chat_8b", "underscore"),
    ("", "empty"),
    (5, "not a string"),
])
def test_names_the_service_cannot_take_are_refused_naming_metadata_name(spec_dict, name, why):
    with pytest.raises(SpecError) as info:
        parse_object(_object(name, spec_dict()))
    (problem,) = [p for p in info.value.problems if p.startswith("metadata.name:")]
    assert len(problem) < 400, why
    if isinstance(name, str) and name:
        assert "lowercase" in problem and "63" in problem, why


def test_a_bad_name_and_a_bad_spec_are_reported_together(spec_dict):
    with pytest.raises(SpecError) as info:
        parse_object(_object("My.Chat", spec_dict(replicas=0)))
    assert {p.split(":")[0] for p in info.value.problems} == {"metadata.name", "spec.replicas"}


def test_every_name_the_service_can_take_gives_valid_object_names(spec_dict):
    """The name rule is the strictest of the names the operator derives: with it, the claim
    NAME-model-cache is a valid PersistentVolumeClaim name (a DNS-1123 subdomain of at most 253) and NAME a
    valid label value, for the longest name and every character class."""
    for name in ("a" * 63, "a" + "-" * 61 + "9", "z9", "a"):
        assert fields.name_problems(name) == []
        claim = f"{name}-model-cache"
        assert len(claim) <= 253 and re.fullmatch(fields.DNS1123_SUBDOMAIN_PATTERN, claim)
        assert fields.label_value_problem(name) is None


GOOD_PLACEMENTS = [
    {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]},
    {"tolerations": [{"key": "example.com/gpu-pool", "operator": "Exists"}]},
    {"tolerations": [{"operator": "Exists"}]},  # every taint
    {"tolerations": [{"operator": "Exists", "effect": "NoSchedule", "value": ""}]},
    {"tolerations": [{"key": "spot", "value": "true"}]},  # operator Equal by default
    {"tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 300}]},
    {"tolerations": [{"key": "k" * 63, "operator": "Exists"}]},
    {"tolerations": [{"key": "p" * 253 + "/" + "k" * 63, "operator": "Exists"}]},
    {"nodeSelector": {"pool": "llm", "kubernetes.io/hostname": "node-1", "tier": "", "a.b/c_d.e": "A-b_c.9"}},
    {"nodeSelector": {f"key-{i}": "v" for i in range(32)}},
    {"gpuProducts": ["L4", "NVIDIA-H100-80GB-HBM3", "AMD_Instinct_MI300X", "x" * 63]},
]


@pytest.mark.parametrize("placement", GOOD_PLACEMENTS, ids=[str(p)[:60] for p in GOOD_PLACEMENTS])
def test_placements_kubernetes_accepts_are_accepted(spec_dict, placement):
    parse_spec(spec_dict(placement=placement))


BAD_PLACEMENTS = [  # (overrides, the field named, what the message says)
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
     "spec.placement.tolerations[0].value", "Exists"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "spec.placement.tolerations[0].operator", "key"),
    ({"tolerations": [{}]}, "spec.placement.tolerations[0].operator", "Exists"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]},
     "spec.placement.tolerations[0].effect", "NoExecute"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "Sometimes"}]},
     "spec.placement.tolerations[0].effect", "NoSchedule"),
    ({"tolerations": [{"key": "bad key", "operator": "Exists"}]}, "spec.placement.tolerations[0].key", "label key"),
    ({"tolerations": [{"key": "Example.com/gpu", "operator": "Exists"}]},
     "spec.placement.tolerations[0].key", "label key"),
    ({"tolerations": [{"key": "k" * 64, "operator": "Exists"}]}, "spec.placement.tolerations[0].key", "label key"),
    ({"tolerations": [{"key": "p" * 254 + "/k", "operator": "Exists"}]},
     "spec.placement.tolerations[0].key", "253"),
    ({"tolerations": [{"key": "gpu", "value": "two words"}]}, "spec.placement.tolerations[0].value", "label value"),
    ({"tolerations": [{"key": "gpu", "value": "v" * 64}]}, "spec.placement.tolerations[0].value", "63"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -1}]},
     "spec.placement.tolerations[0].tolerationSeconds", "0"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists"}] * 33}, "spec.placement.tolerations", "32"),
    ({"nodeSelector": {"bad key": "v"}}, "spec.placement.nodeSelector", "label key"),
    ({"nodeSelector": {"-pool": "v"}}, "spec.placement.nodeSelector", "label key"),
    ({"nodeSelector": {"pool": "two words"}}, "spec.placement.nodeSelector.pool", "label value"),
    ({"nodeSelector": {"pool": "-edge"}}, "spec.placement.nodeSelector.pool", "label value"),
    ({"nodeSelector": {"pool": "v" * 64}}, "spec.placement.nodeSelector.pool", "63"),
    ({"nodeSelector": {f"k{i}": "v" for i in range(33)}}, "spec.placement.nodeSelector", "32"),
    ({"gpuProducts": ["NVIDIA L4"]}, "spec.placement.gpuProducts[0]", "label value"),
    ({"gpuProducts": [""]}, "spec.placement.gpuProducts[0]", "at least 1"),
    ({"gpuProducts": ["L4"] * 33}, "spec.placement.gpuProducts", "32"),
]


@pytest.mark.parametrize("placement, field, says", BAD_PLACEMENTS, ids=[f for _, f, _ in BAD_PLACEMENTS])
def test_placements_kubernetes_refuses_are_refused_naming_the_field(spec_dict, placement, field, says):
    message = the_problem(spec_dict(placement=placement), field)
    assert says in message and len(message) < 400


@pytest.mark.parametrize("source", [
    {"hfTokenSecretRef": {"name": "hf-token"}},
    {"hfTokenSecretRef": {"name": "hf.token.v2", "key": "token.json"}},
    {"hfTokenSecretRef": {"name": "s" * 253, "key": ".hidden_KEY-1"}},
    {"cache": {"size": "200Gi", "storageClassName": "fast-ssd"}},
    {"cache": {"size": "200Gi", "storageClassName": ""}},  # empty: the cluster's default class
    {"cache": {"existingClaim": "shared-models"}},
    {"cache": {"existingClaim": "", "size": "10Gi"}},
])
def test_object_names_kubernetes_accepts_are_accepted(spec_dict, source):
    parse_spec(spec_dict(source=source))


@pytest.mark.parametrize("source, field", [
    ({"hfTokenSecretRef": {"name": "HF_Token"}}, "spec.source.hfTokenSecretRef.name"),
    ({"hfTokenSecretRef": {"name": "hf token"}}, "spec.source.hfTokenSecretRef.name"),
    ({"hfTokenSecretRef": {"name": "s" * 254}}, "spec.source.hfTokenSecretRef.name"),
    ({"hfTokenSecretRef": {"name": ""}}, "spec.source.hfTokenSecretRef.name"),
    ({"hfTokenSecretRef": {"name": "hf", "key": "HF TOKEN"}}, "spec.source.hfTokenSecretRef.key"),
    ({"hfTokenSecretRef": {"name": "hf", "key": ".."}}, "spec.source.hfTokenSecretRef.key"),
    ({"hfTokenSecretRef": {"name": "hf", "key": "..token"}}, "spec.source.hfTokenSecretRef.key"),
    ({"hfTokenSecretRef": {"name": "hf", "key": "k" * 254}}, "spec.source.hfTokenSecretRef.key"),
    ({"cache": {"size": "1Gi", "storageClassName": "Fast_SSD"}}, "spec.source.cache.storageClassName"),
    ({"cache": {"size": "1Gi", "storageClassName": "s" * 254}}, "spec.source.cache.storageClassName"),
    ({"cache": {"existingClaim": "My Claim"}}, "spec.source.cache.existingClaim"),
    ({"cache": {"existingClaim": "-claim"}}, "spec.source.cache.existingClaim"),
])
def test_object_names_kubernetes_refuses_are_refused_naming_the_field(spec_dict, source, field):
    message = the_problem(spec_dict(source=source), field)
    assert len(message) < 400


# --- Bounds: no field holds more than a few hundred characters ---------------------------------------


MEGABYTE = "9" * 2**20


@pytest.mark.parametrize("overrides, field", [
    ({"slo": {"ttftP95": MEGABYTE + "s"}}, "spec.slo.ttftP95"),
    ({"memoryBudget": MEGABYTE + "Gi"}, "spec.memoryBudget"),
    ({"source": {"cache": {"size": MEGABYTE}}}, "spec.source.cache.size"),
    ({"placement": {"gpuProducts": [MEGABYTE]}}, "spec.placement.gpuProducts[0]"),
    ({"placement": {"nodeSelector": {"pool": MEGABYTE}}}, "spec.placement.nodeSelector.pool"),
    ({"placement": {"nodeSelector": {MEGABYTE: "v"}}}, "spec.placement.nodeSelector"),
    ({"placement": {"tolerations": [{"key": MEGABYTE, "operator": "Exists"}]}}, "spec.placement.tolerations[0].key"),
    ({"placement": {"tolerations": [{"key": "k", "value": MEGABYTE}]}}, "spec.placement.tolerations[0].value"),
    ({"placement": {"tolerations": [{"key": "k", "operator": "Exists"}] * 100_000}}, "spec.placement.tolerations"),
    ({"placement": {"nodeSelector": {str(i): "v" for i in range(100_000)}}}, "spec.placement.nodeSelector"),
    ({"source": {"hfTokenSecretRef": {"name": MEGABYTE}}}, "spec.source.hfTokenSecretRef.name"),
    ({"model": MEGABYTE}, "spec.model"),
])
def test_megabyte_values_are_refused_with_a_short_message(spec_dict, overrides, field):
    started = time.monotonic()
    message = the_problem(spec_dict(**overrides), field)
    assert len(message) < 500, message[:500]
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("value, says", [
    ("9" * 400 + "E", "too long"),
    ("99999999999E", "too large"),
    ("9223372036854775808", "too large"),  # 2**63
    (10**400, "too large"),
    (2**63, "too large"),
])
@pytest.mark.parametrize("field", ["memoryBudget", "source.cache.size"])
def test_huge_quantities_are_refused_naming_the_field(spec_dict, field, value, says):
    overrides = {"memoryBudget": value} if field == "memoryBudget" else {"source": {"cache": {"size": value}}}
    message = the_problem(spec_dict(**overrides), f"spec.{field}")
    assert says in message and "48Gi" in message and len(message) < 300


def test_the_largest_quantity_is_accepted(spec_dict):
    assert parse_spec(spec_dict(memoryBudget=api.MAX_QUANTITY_BYTES)).memory_budget_bytes == 2**63 - 1
    assert parse_quantity("7Ei") == 7 * 2**60
