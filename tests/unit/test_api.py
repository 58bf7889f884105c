"""api.parse_spec / parse_object: what is accepted, and that every refusal names the field and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llama_operator import api
from llama_operator.api import SpecError, parse_duration, parse_object, parse_quantity, parse_spec


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


# --- Durations and quantities --------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("1.5s", 1.5), ("1m30s", 90.0), ("2m", 120.0), ("30ms", 0.03), ("1s500ms", 1.5),
])
def test_parse_duration_accepts_go_style_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["500 ms", "fast", "", "1h", "-1s", "1.s", "ms"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value, n", [
    ("48Gi", 48 * 2**30), ("80G", 80 * 10**9), (1024, 1024), ("1024", 1024), ("1.5Gi", 3 * 2**29),
    ("512Mi", 512 * 2**20), ("2Ti", 2 * 2**40), ("100k", 100_000),
])
def test_parse_quantity_accepts_kubernetes_quantities(value, n):
    assert parse_quantity(value) == n


@pytest.mark.parametrize("value", ["lots", "48 GB", "48GiB", "-1Gi", "", True, 1.5, None])
def test_parse_quantity_refuses_what_is_not_a_quantity(value):
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(value)


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


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployments = [d for d in docs if d.get("kind") == api.KIND]
    assert deployments, f"{path.name} holds no LlamaDeployment"
    for doc in deployments:
        parse_object(doc)
