"""The CRD: committed copies are current, the schema admits the examples and refuses bad specs, and the
CEL rules the API server runs agree with the operator's own checks (api.parse_spec)."""
from __future__ import annotations

import re

import celpy
import jsonschema
import pytest
import yaml

from llama_operator import api, fields
from llama_operator.api import SpecError, parse_spec
from llama_operator.catalog import model_ids
from llama_operator.crd import render_crd

from kit.crd import apply_defaults, openapi_validator
from kit.paths import CRD_FILE, ROOT

CHART_CRD_FILE = ROOT / "charts" / "llama-operator" / "crds" / "llamadeployments.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


@pytest.fixture(scope="module")
def version(crd) -> dict:
    (v,) = crd["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def schema(version) -> dict:
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def spec_schema(schema) -> dict:
    return schema["properties"]["spec"]


def example_objects() -> list[tuple[str, dict]]:
    out = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == api.KIND:
                out.append((path.name, doc))
    return out


# --- Generated and committed copies --------------------------------------------------------------------


def test_committed_crd_is_not_stale():
    assert CRD_FILE.read_text(encoding="utf-8") == render_crd(), (
        "crds/llamadeployments.yaml differs from what api.py generates; run `llama-operator crd`")


def test_chart_crd_is_the_same_file():
    assert CHART_CRD_FILE.read_text(encoding="utf-8") == render_crd(), (
        "charts/llama-operator/crds/llamadeployments.yaml differs from the generated CRD; copy crds/llamadeployments.yaml")


def test_rendering_is_deterministic():
    assert render_crd() == render_crd()


# --- Names, columns, subresources ----------------------------------------------------------------------


def test_names_and_short_name(crd):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "llamadeployments.llama-operator.dev"
    names = crd["spec"]["names"]
    assert names["kind"] == "LlamaDeployment"
    assert names["plural"] == "llamadeployments" and names["singular"] == "llamadeployment"
    assert "llamad" in names["shortNames"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["group"] == "llama-operator.dev"


def test_served_storage_version_with_status_subresource(version):
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_point_at_fields_that_exist(version, schema):
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Model", "Variant", "Runtime", "Ready", "Phase", "Age"} <= set(columns)
    assert columns["Model"]["jsonPath"] == ".spec.model"
    assert columns["Age"]["type"] == "date" and columns["Age"]["jsonPath"] == ".metadata.creationTimestamp"
    for name, column in columns.items():
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            assert part in node.get("properties", {}), f"column {name}: {column['jsonPath']} is not in the schema"
            node = node["properties"][part]
        assert node.get("type") == column["type"], f"column {name} has type {column['type']}, field {node.get('type')}"


def test_kubectl_get_shows_how_many_adapters_are_served(version, schema):
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    adapters = columns["Adapters"]
    assert adapters["jsonPath"] == ".status.adapterCount" and adapters["type"] == "integer"
    assert adapters.get("priority", 0) == 0  # in the default view, not only with -o wide
    assert schema["properties"]["status"]["properties"]["adapters"]["maxItems"] == 16


# --- Structural schema and descriptions ----------------------------------------------------------------


def _walk(node: dict, path: str):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema):
    for path, node in _walk(schema, ""):
        assert "$ref" not in node and "$defs" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
            for member in node.get("anyOf", []):
                assert member.get("type") != "null", f"{path}: nullable union is not structural"
        if "properties" in node:
            assert node.get("additionalProperties") in (None,), f"{path}: additionalProperties beside properties"


def test_every_spec_property_has_a_description(spec_schema):
    assert spec_schema.get("description")
    missing = [path for path, node in _walk(spec_schema, "spec")
               if path != "spec" and not path.endswith(("[]", "{}")) and not node.get("description")]
    assert not missing, f"kubectl explain would show nothing for: {missing}"


def test_enums_follow_the_catalog(spec_schema):
    props = spec_schema["properties"]
    assert props["model"]["enum"] == model_ids()
    assert props["fallback"]["properties"]["minimumModel"]["enum"] == model_ids()
    assert props["fallback"]["properties"]["quantizations"]["items"]["enum"] == api.QUANTIZATIONS
    assert props["runtime"]["enum"] == ["auto", "vllm", "llamacpp"]


def test_required_fields(spec_schema, schema):
    assert set(spec_schema["required"]) == {"model", "slo", "memoryBudget"}
    assert set(spec_schema["properties"]["slo"]["required"]) == {"ttftP95", "tpotP95"}
    assert schema["required"] == ["spec"]


def test_defaults_match_the_python_defaults(spec_schema, spec_dict):
    parsed = parse_spec(spec_dict())
    props = spec_schema["properties"]
    assert props["contextLength"]["default"] == parsed.contextLength
    assert props["replicas"]["default"] == parsed.replicas
    assert props["runtime"]["default"] == parsed.runtime
    assert props["slo"]["properties"]["promptTokens"]["default"] == parsed.slo.promptTokens
    assert props["slo"]["properties"]["concurrency"]["default"] == parsed.slo.concurrency
    for key, value in props["fallback"]["properties"].items():
        if "default" in value:
            assert value["default"] == getattr(parsed.fallback, key), key


# --- jsonschema: the examples and bad specs ------------------------------------------------------------


def validator(schema: dict) -> jsonschema.Draft7Validator:
    # x-kubernetes-* keywords are unknown to JSON Schema and ignored; int-or-string is already spelt
    # anyOf [integer, string] beside the marker, and `pattern` applies to strings only, as in Kubernetes
    # (read as RE2 reads it, as the API server does).
    return openapi_validator(schema)


@pytest.mark.parametrize("name, obj", example_objects(), ids=[n for n, _ in example_objects()])
def test_examples_validate_against_the_schema(schema, name, obj):
    errors = sorted(validator(schema).iter_errors(obj), key=str)
    assert not errors, f"{name}: " + "; ".join(e.message for e in errors)


BAD_FOR_SCHEMA = [
    ("memoryBudget", {"memoryBudget": "lots"}),
    ("memoryBudget", {"memoryBudget": "48 GB"}),
    ("slo.ttftP95", {"slo": {"ttftP95": "500 ms"}}),
    ("slo.tpotP95", {"slo": {"tpotP95": "fast"}}),
    ("model", {"model": "llama-9b"}),
    ("replicas", {"replicas": 0}),
    ("contextLength", {"contextLength": 100}),
    ("runtime", {"runtime": "tgi"}),
    ("fallback.quantizations", {"fallback": {"quantizations": []}}),
    ("fallback.quantizations", {"fallback": {"quantizations": ["q9"]}}),
    ("placement.tolerations", {"placement": {"tolerations": [{"operator": "Maybe"}]}}),
]


@pytest.mark.parametrize("field, overrides", BAD_FOR_SCHEMA, ids=[f"{f}={o}" for f, o in BAD_FOR_SCHEMA])
def test_schema_and_parse_spec_both_refuse_bad_fields(spec_schema, spec_dict, field, overrides):
    _both_refuse(spec_schema, spec_dict(**overrides), field, str(overrides))


def _both_refuse(spec_schema, bad: dict, field: str, shown: str) -> None:
    """The CRD schema refuses `bad`, and parse_spec refuses it naming spec.<field>."""
    assert list(validator(spec_schema).iter_errors(bad)), f"the CRD schema admits {shown}"
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    assert any(p.startswith(f"spec.{field}") for p in info.value.problems), info.value.problems


def test_int_or_string_accepts_both_forms(spec_schema, spec_dict):
    for budget in (1024, "48Gi", "80G"):
        assert not list(validator(spec_schema).iter_errors(spec_dict(memoryBudget=budget)))


# --- CEL rules ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules(spec_schema) -> list[dict]:
    return spec_schema["x-kubernetes-validations"]


@pytest.fixture(scope="module")
def programs(rules):
    env = celpy.Environment()
    return [env.program(env.compile(r["rule"])) for r in rules]


def cel_verdicts(programs, spec: dict) -> list[bool]:
    out = []
    for prog in programs:
        result = prog.evaluate({"self": celpy.json_to_cel(spec)})
        assert isinstance(result, celpy.celtypes.BoolType), f"rule did not evaluate to a bool: {result!r}"
        out.append(bool(result))
    return out


def test_every_rule_has_message_field_path_and_reason(rules):
    assert len(rules) >= 6
    for r in rules:
        assert r["message"] and r["fieldPath"].startswith(".") and r["reason"] == "FieldValueInvalid"


@pytest.mark.parametrize("defaults", [False, True], ids=["as-written", "defaulted"])
@pytest.mark.parametrize("name, obj", example_objects(), ids=[n for n, _ in example_objects()])
def test_examples_pass_every_cel_rule(programs, spec_schema, name, obj, defaults):
    spec = apply_defaults(spec_schema, obj["spec"]) if defaults else obj["spec"]
    assert all(cel_verdicts(programs, spec)), name


GOOD_FOR_CEL = [
    {"model": "llama-3.2-11b-vision-instruct", "runtime": "vllm"},
    {"runtime": "llamacpp", "fallback": {"quantizations": ["q4_k_m", "awq-int4"]}},
    {"runtime": "vllm", "fallback": {"quantizations": ["awq-int4"]}},
    {"fallback": {"minimumModel": "llama-3.2-1b-instruct"}},
    {"model": "llama-3.1-70b-instruct", "fallback": {"minimumModel": "llama-3.3-70b-instruct"}},
    {"model": "llama-3.2-90b-vision-instruct", "fallback": {"minimumModel": "llama-3.2-11b-vision-instruct"}},
    {"slo": {"promptTokens": 8191}},
    {"contextLength": 1024, "slo": {"promptTokens": 1000}},
    {"adapters": [{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 64}]},
    {"runtime": "llamacpp", "adapters": [{"name": "a", "source": "pvc://loras/a-F16.gguf", "rank": 4}]},
    {"weights": {"source": "hf://acme/ft", "gguf": "hf://acme/ft-gguf/ft-Q4_K_M.gguf"}},
    {"runtime": "llamacpp", "weights": {"gguf": "pvc://models/ft.gguf", "ggufQuantization": "q8_0"}},
]


@pytest.mark.parametrize("defaults", [False, True], ids=["as-written", "defaulted"])
@pytest.mark.parametrize("overrides", GOOD_FOR_CEL, ids=[str(o) for o in GOOD_FOR_CEL])
def test_valid_specs_pass_every_rule_and_parse(programs, spec_schema, spec_dict, overrides, defaults):
    spec = spec_dict(**overrides)
    parse_spec(spec)
    assert all(cel_verdicts(programs, apply_defaults(spec_schema, spec) if defaults else spec))


# Each bad spec, and the fieldPath of the rule that must refuse it.
BAD_FOR_CEL = [
    (".runtime", {"model": "llama-3.2-11b-vision-instruct", "runtime": "llamacpp"}),
    (".runtime", {"model": "llama-3.2-90b-vision-instruct", "runtime": "llamacpp"}),
    (".fallback.minimumModel", {"fallback": {"minimumModel": "llama-3.2-11b-vision-instruct"}}),
    (".fallback.minimumModel", {"model": "llama-3.2-11b-vision-instruct",
                                "fallback": {"minimumModel": "llama-3.2-1b-instruct"}}),
    (".fallback.minimumModel", {"fallback": {"minimumModel": "llama-3.1-70b-instruct"}}),
    (".fallback.minimumModel", {"model": "llama-3.2-11b-vision-instruct",
                                "fallback": {"minimumModel": "llama-3.2-90b-vision-instruct"}}),
    (".slo.promptTokens", {"slo": {"promptTokens": 8192}}),  # against the default context of 8192
    (".slo.promptTokens", {"contextLength": 2048, "slo": {"promptTokens": 4096}}),
    (".maxReplicas", {"replicas": 3, "maxReplicas": 2}),
    (".maxReplicas", {"replicas": 2, "maxReplicas": 1}),
    (".fallback.quantizations", {"runtime": "vllm", "fallback": {"quantizations": ["q4_k_m"]}}),
    (".fallback.quantizations", {"runtime": "llamacpp", "fallback": {"quantizations": ["awq-int4", "fp8"]}}),
    (".adapters", {"adapters": [{"name": "a", "source": "hf://acme/a"}, {"name": "a", "source": "hf://acme/b"}]}),
    (".adapters", {"model": "llama-3.2-11b-vision-instruct", "adapters": [{"name": "a", "source": "hf://acme/a"}]}),
    (".runtime", {"runtime": "llamacpp", "adapters": [{"name": "a", "source": "hf://acme/a"}]}),
    (".adapters", {"adapters": [{"name": "a", "source": "hf://acme/a/a.gguf"}, {"name": "b", "source": "hf://acme/b"}]}),
    (".adapters", {"adapters": [{"name": "a", "source": "hf://acme/a", "rank": 4}]}),
    (".weights", {"weights": {}}),
    (".runtime", {"runtime": "llamacpp", "weights": {"source": "hf://acme/ft"}}),
    (".runtime", {"runtime": "vllm", "weights": {"gguf": "hf://acme/ft/ft-Q4_K_M.gguf"}}),
    (".speculative.draftModel", {"speculative": {"draftModel": "llama-3.1-70b-instruct"}}),  # larger than the target
    (".speculative.draftModel", {"model": "llama-3.2-1b-instruct", "speculative": {"draftModel": "llama-3.2-1b-instruct"}}),
    (".speculative.draftModel", {"speculative": {"draftModel": "llama-3.2-11b-vision-instruct"}}),
    (".speculative.draftModel", {"model": "llama-3.2-11b-vision-instruct",
                                 "speculative": {"draftModel": "llama-3.2-1b-instruct"}}),
    (".speculative.mode", {"model": "llama-3.2-1b-instruct", "speculative": {"mode": "On"}}),
    (".speculative.mode", {"model": "llama-3.2-90b-vision-instruct", "speculative": {"mode": "On"}}),
]


@pytest.mark.parametrize("field_path, overrides", BAD_FOR_CEL, ids=[f"{p}:{o}" for p, o in BAD_FOR_CEL])
def test_cel_and_parse_spec_refuse_the_same_bad_spec(programs, rules, spec_dict, field_path, overrides):
    bad = spec_dict(**overrides)
    verdicts = cel_verdicts(programs, bad)
    refusing = {rules[i]["fieldPath"] for i, ok in enumerate(verdicts) if not ok}
    assert field_path in refusing, f"no CEL rule on {field_path} refuses {overrides}"
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    # the operator may name the item or field inside the rule's field: spec.adapters[1].name
    named = re.compile(re.escape("spec" + field_path) + r"(\[\d+\])?(\.\w+)?:")
    assert any(named.match(p) for p in info.value.problems), info.value.problems


def test_every_cel_rule_refuses_at_least_one_bad_spec(programs, rules, spec_dict):
    refused_by = [set() for _ in rules]
    for _, overrides in BAD_FOR_CEL:
        for i, ok in enumerate(cel_verdicts(programs, spec_dict(**overrides))):
            if not ok:
                refused_by[i].add(str(overrides))
    idle = [rules[i]["message"] for i, s in enumerate(refused_by) if not s]
    assert not idle, f"rules no bad spec exercises: {idle}"


def test_defaulted_prompt_tokens_is_checked_by_both(programs, rules, spec_schema, spec_dict):
    # promptTokens left out defaults to 512, which a 256-token context cannot hold: the API server
    # applies the default before CEL runs, and the operator refuses the same spec.
    bad = spec_dict(contextLength=256)
    defaulted = apply_defaults(spec_schema, bad)
    assert defaulted["slo"]["promptTokens"] == 512
    refusing = {rules[i]["fieldPath"] for i, ok in enumerate(cel_verdicts(programs, defaulted)) if not ok}
    assert ".slo.promptTokens" in refusing
    with pytest.raises(SpecError, match="spec.slo.promptTokens"):
        parse_spec(bad)


# --- Bounds and Kubernetes syntax -----------------------------------------------------------------------

from kit.crd import cel_refusals  # noqa: E402


def _whole(spec: dict, name: str = "chat") -> dict:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": "default"},
            "spec": spec}


def api_server_refusals(schema: dict, obj: dict) -> list[str]:
    """Where the generated CRD refuses `obj`: the paths of its OpenAPI errors, then (when it passes those)
    of the CEL rules that refuse it after defaulting."""
    errors = list(validator(schema).iter_errors(obj))
    if errors:
        return [".".join(str(p) for p in e.absolute_path) for e in errors]
    obj = {**obj, "spec": apply_defaults(schema["properties"]["spec"], obj["spec"])}
    return [path for path, _ in cel_refusals(schema, obj)]


def test_every_string_list_and_map_of_the_spec_is_bounded(spec_schema):
    unbounded = []
    for path, node in _walk(spec_schema, "spec"):
        t = node.get("type")
        if node.get("x-kubernetes-int-or-string"):
            if "maxLength" not in node or "maximum" not in node:
                unbounded.append(path)
        elif t == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        elif t == "array" and "maxItems" not in node:
            unbounded.append(path)
        elif t == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
    assert not unbounded, f"no maxLength / maxItems / maxProperties: {unbounded}"


def test_the_bounds_are_the_api_models_bounds(spec_schema):
    props = spec_schema["properties"]
    placement = props["placement"]["properties"]
    assert placement["tolerations"]["maxItems"] == fields.MAX_TOLERATIONS == 32
    assert placement["nodeSelector"]["maxProperties"] == fields.MAX_NODE_SELECTOR_ENTRIES == 32
    assert placement["gpuProducts"]["maxItems"] == fields.MAX_GPU_PRODUCTS == 32
    assert props["fallback"]["properties"]["quantizations"]["maxItems"] == len(api.QUANTIZATIONS)
    assert placement["tolerations"]["items"]["properties"]["key"]["maxLength"] == 253 + 1 + 63
    assert placement["nodeSelector"]["additionalProperties"]["maxLength"] == 63
    for quantity in (props["memoryBudget"], props["source"]["properties"]["cache"]["properties"]["size"]):
        assert quantity["maxLength"] == api.MAX_QUANTITY_LENGTH and quantity["maximum"] == 2**63 - 1
    assert props["slo"]["properties"]["ttftP95"]["maxLength"] == api.MAX_DURATION_LENGTH


def test_metadata_declares_only_the_name(schema):
    # A structural schema may restrict only metadata.name and metadata.generateName; name is declared so the
    # root rule's fieldPath refers to a field of the schema.
    assert schema["properties"]["metadata"] == {"type": "object", "properties": {"name": {"type": "string"}}}


def _all_rules(node: dict, path: str = ""):
    for where, sub in _walk(node, path):
        for rule in sub.get("x-kubernetes-validations") or []:
            yield where, sub, rule


def test_every_field_path_names_a_field_of_the_schema(schema):
    """The API server refuses a CRD whose rule has a fieldPath that does not name a property of the schema the
    rule sits on (apiextensions' ValidFieldPath): .metadata.name needs metadata.properties.name."""
    rules = list(_all_rules(schema))
    assert len(rules) >= 11
    for path, node, rule in rules:
        assert rule["message"] and rule["reason"] == "FieldValueInvalid", (path, rule)
        field_path = rule.get("fieldPath")
        if field_path is None:
            continue
        target = node
        for part in field_path.lstrip(".").split("."):
            assert part in (target.get("properties") or {}), f"{path}: fieldPath {field_path} is not in the schema"
            target = target["properties"][part]


def test_the_name_rule_is_at_the_root_and_reads_only_metadata_name(schema):
    name_rule, adapter_rule = schema["x-kubernetes-validations"]
    assert name_rule["fieldPath"] == ".metadata.name" and "self.metadata.name" in name_rule["rule"]
    assert "self.spec" not in name_rule["rule"]
    # the other root rule: no adapter may take the deployment's name (the base model's)
    assert adapter_rule["fieldPath"] == ".spec.adapters" and "self.metadata.name" in adapter_rule["rule"]


# Strings and what Kubernetes says of them, for the differential tests below.
SYNTAX_CORPUS = ["a", "A", "pool", "gpu-pool", "gpu_pool", "gpu.pool", "9", "a9", "-a", "a-", "_a", "a_", ".a",
                 "a.", "a b", "a/b", "example.com/pool", "Example.com/pool", "example.com/", "/pool", "a/b/c",
                 "x" * 63, "x" * 64, "p" * 253 + "/k", "p" * 254 + "/k", "p" * 253 + "/" + "k" * 63,
                 "a" + "." * 2 + "b", "a..b/c", "ünïcode", "tab\t", "new\nline", "", "..", ".", "..a", ".a.",
                 "a\n", "x" * 254]


@pytest.mark.parametrize("text", SYNTAX_CORPUS, ids=range(len(SYNTAX_CORPUS)))
def test_the_crd_and_the_operator_agree_on_every_syntax(schema, spec_dict, text):
    """Each string, in each field with a syntax, is refused by the generated CRD (OpenAPI schema or CEL) exactly
    when the operator's own check refuses it."""
    cases = {
        "spec.placement.nodeSelector": {"placement": {"nodeSelector": {"pool": text}}},
        "spec.placement.nodeSelector ": {"placement": {"nodeSelector": {text: "v"}}},
        "spec.placement.tolerations": {"placement": {"tolerations": [{"key": text, "operator": "Exists"}]}},
        "spec.placement.tolerations ": {"placement": {"tolerations": [{"key": "k", "value": text}]}},
        "spec.placement.gpuProducts": {"placement": {"gpuProducts": [text]}},
        "spec.source.hfTokenSecretRef": {"source": {"hfTokenSecretRef": {"name": text}}},
        "spec.source.hfTokenSecretRef ": {"source": {"hfTokenSecretRef": {"name": "hf", "key": text}}},
        "spec.source.cache": {"source": {"cache": {"size": "1Gi", "storageClassName": text}}},
        "spec.source.cache ": {"source": {"cache": {"existingClaim": text}}},
    }
    for field, overrides in cases.items():
        field = field.strip()
        spec = spec_dict(**overrides)
        crd_refuses = bool(api_server_refusals(schema, _whole(spec)))
        try:
            parse_spec(spec)
            operator_refuses = False
        except SpecError as e:
            operator_refuses = True
            assert all(p.startswith(field) for p in e.problems), e.problems
        assert crd_refuses == operator_refuses, f"{field} = {text!r}: CRD {crd_refuses}, operator {operator_refuses}"
    name_refused_by_crd = bool(api_server_refusals(schema, _whole(spec_dict(), name=text)))
    assert name_refused_by_crd == bool(fields.name_problems(text)), f"metadata.name = {text!r}"


BAD_FOR_SCHEMA_SYNTAX = [
    ("placement.tolerations", {"placement": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}}),
    ("placement.tolerations", {"placement": {"tolerations": [{"key": "k", "operator": "Exists"}] * 33}}),
    ("placement.tolerations", {"placement": {"tolerations": [{"key": "k", "value": "v" * 64}]}}),
    ("placement.nodeSelector", {"placement": {"nodeSelector": {"pool": "two words"}}}),
    ("placement.nodeSelector", {"placement": {"nodeSelector": {f"k{i}": "v" for i in range(33)}}}),
    ("placement.gpuProducts", {"placement": {"gpuProducts": ["L4"] * 33}}),
    ("placement.gpuProducts", {"placement": {"gpuProducts": ["NVIDIA L4"]}}),
    ("source.hfTokenSecretRef.name", {"source": {"hfTokenSecretRef": {"name": "HF_Token"}}}),
    ("source.hfTokenSecretRef.key", {"source": {"hfTokenSecretRef": {"name": "hf", "key": ".."}}}),
    ("source.cache.storageClassName", {"source": {"cache": {"size": "1Gi", "storageClassName": "Fast SSD"}}}),
    ("source.cache.existingClaim", {"source": {"cache": {"existingClaim": "my_claim"}}}),
    ("source.cache.size", {"source": {"cache": {"size": "9" * 400 + "E"}}}),
    ("memoryBudget", {"memoryBudget": "9" * 400 + "E"}),
    ("memoryBudget", {"memoryBudget": 2**63}),
    ("slo.ttftP95", {"slo": {"ttftP95": "1" * 40 + "s"}}),
]


@pytest.mark.parametrize("field, overrides", BAD_FOR_SCHEMA_SYNTAX, ids=[f for f, _ in BAD_FOR_SCHEMA_SYNTAX])
def test_schema_and_parse_spec_both_refuse_bad_syntax_and_sizes(spec_schema, spec_dict, field, overrides):
    _both_refuse(spec_schema, spec_dict(**overrides), field, str(overrides)[:200])


# Each bad object the schema admits, and the field the CEL rule that must refuse it names.
BAD_FOR_NESTED_CEL = [
    ("metadata.name", "my.chat", {}),
    ("metadata.name", "x" * 64, {}),
    ("metadata.name", "Chat", {}),
    ("spec.placement.tolerations[0].value", "chat", {"placement": {"tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "yes"}]}}),
    ("spec.placement.tolerations[1].operator", "chat", {"placement": {"tolerations": [
        {"key": "gpu", "operator": "Exists"}, {"value": "x"}]}}),
    ("spec.placement.tolerations[0].effect", "chat", {"placement": {"tolerations": [
        {"key": "gpu", "operator": "Exists", "tolerationSeconds": 10}]}}),
    ("spec.placement.tolerations[0].key", "chat", {"placement": {"tolerations": [
        {"key": "p" * 254 + "/k", "operator": "Exists"}]}}),
    ("spec.placement.nodeSelector", "chat", {"placement": {"nodeSelector": {"bad key": "v"}}}),
    ("spec.placement.nodeSelector", "chat", {"placement": {"nodeSelector": {"p" * 254 + "/k": "v"}}}),
]


@pytest.mark.parametrize("field, name, overrides", BAD_FOR_NESTED_CEL, ids=[f"{f}:{n[:10]}" for f, n, _ in BAD_FOR_NESTED_CEL])
def test_nested_cel_and_the_operator_refuse_the_same_object(schema, spec_dict, field, name, overrides):
    obj = _whole(spec_dict(**overrides), name=name)
    assert not list(validator(schema).iter_errors(obj)), "meant for CEL: the OpenAPI schema already refuses it"
    assert field in api_server_refusals(schema, obj)
    with pytest.raises(SpecError) as info:
        api.parse_object(obj)
    assert any(p.startswith(field) for p in info.value.problems), info.value.problems


def test_every_nested_rule_refuses_at_least_one_bad_object(schema, spec_dict):
    fired = set()
    for _, name, overrides in BAD_FOR_NESTED_CEL:
        obj = _whole(spec_dict(**overrides), name=name)
        fired |= {rule["rule"] for _, rule in cel_refusals(schema, obj)}
    nested = {rule["rule"] for path, _, rule in _all_rules(schema) if path not in ("", ".spec")}
    assert nested <= fired, f"rules no bad object exercises: {nested - fired}"


@pytest.mark.parametrize("name, obj", example_objects(), ids=[n for n, _ in example_objects()])
def test_examples_pass_every_rule_of_the_crd(schema, name, obj):
    assert api_server_refusals(schema, obj) == [], name
