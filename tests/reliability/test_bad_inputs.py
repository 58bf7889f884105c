"""Bad input: the corpus in bad_inputs/ (one malformed or contradictory LlamaDeployment per file, its
comment saying what is wrong and where it must be caught).

* Each file is refused where its comment says: by the generated CRD's OpenAPI schema (jsonschema), by one
  of its CEL rules (cel-python, after the API server's defaulting), or admitted by both.
* The operator's own reading refuses every file the comment says is invalid (whatever the CRD did),
  naming the field, and plans none of them.
* All of them at once in the emulator (which validates nothing) beside a valid LlamaDeployment: each
  gets phase Invalid (naming the field) or Unschedulable (with reasons) and exactly one Warning Event;
  the valid one converges; the operator does not crash, logs no error, creates no workload for any of
  them, and then writes nothing for them (no status patch, no Event) during 3 s of quiet.
"""
from __future__ import annotations

import time
from collections import Counter

import celpy
import jsonschema
import pytest
from crdkit import apply_defaults

from llama_operator.api import API_VERSION, KIND, SpecError
from llama_operator.crd import crd_manifest
from llama_operator.handlers import _parse_spec
from reliability_cases import CAUGHT_BY, SCENARIOS, BadInput, bad_input_answer, bad_inputs
from reliability_harness import chat_doc, wait_until, writes_by_port

CORPUS = bad_inputs()
IDS = [b.key for b in CORPUS]


@pytest.fixture(scope="module")
def spec_schema() -> dict:
    (version,) = crd_manifest()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def cel(spec_schema):
    rules = spec_schema["properties"]["spec"]["x-kubernetes-validations"]
    env = celpy.Environment()
    return [(r, env.program(env.compile(r["rule"]))) for r in rules]


def api_server_verdict(schema: dict, cel, obj: dict) -> tuple[str, list[str]]:
    """('schema', paths) | ('cel', fieldPaths) | ('admitted', []) for the generated CRD."""
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(obj))
    if errors:
        paths = []
        for e in errors:
            path = [str(p) for p in e.absolute_path]
            if e.validator == "required":  # reported at the parent: name the missing field
                path.append(e.message.split("'")[1])
            paths.append(".".join(path))
        return "schema", paths
    spec = apply_defaults(schema["properties"]["spec"], obj["spec"])
    refused = []
    for rule, program in cel:
        try:
            ok = bool(program.evaluate({"self": celpy.json_to_cel(spec)}))
        except celpy.CELEvalError:
            ok = False  # the API server refuses an object a rule cannot evaluate on
        if not ok:
            refused.append("spec" + rule["fieldPath"])
    return ("cel", refused) if refused else ("admitted", [])


# --- the corpus itself ----------------------------------------------------------------------------------


def test_corpus_is_large_and_covers_the_kinds_of_bad_input():
    assert len(CORPUS) >= 40
    assert len({b.name for b in CORPUS}) == len(CORPUS), "metadata.name must be unique across the corpus"
    for b in CORPUS:
        assert b.doc["kind"] == KIND and b.doc["apiVersion"] == API_VERSION, b.path.name
        assert b.caught_by in CAUGHT_BY, b.path.name
        assert b.field.startswith("spec"), b.path.name
        assert b.caught_by != "unschedulable" or b.says, f"{b.path.name}: say what the Unschedulable message holds"
    kinds = {  # what the issue asks the corpus to hold -> a file that does
        "unknown model id": "unknown-model", "wrong types": "wrong-type", "negative budget": "budget-negative",
        "zero budget": "budget-zero", "zero replicas": "replicas-zero", "negative replicas": "replicas-negative",
        "unparseable duration": "ttft-unparseable", "unparseable quantity": "budget-unparseable",
        "floor larger than the model": "floor-larger-than-model", "vision with a text floor": "vision-floor-is-text",
        "context beyond the model's maximum": "context-beyond-model",
        "quantizations the runtime cannot serve": "vllm-with-gguf-quantizations",
        "placement no node satisfies": "placement-no-node", "empty spec": "spec-empty", "huge numbers": "huge",
    }
    missing = [k for k, part in kinds.items() if not any(part in b.key for b in CORPUS)]
    assert not missing, missing
    assert {b.caught_by for b in CORPUS} == set(CAUGHT_BY)


@pytest.mark.parametrize("bad", CORPUS, ids=IDS)
def test_refused_where_its_comment_says(spec_schema, cel, bad: BadInput, results):
    verdict, where = api_server_verdict(spec_schema, cel, bad.doc)
    expected = {"schema": "schema", "cel": "cel"}.get(bad.caught_by, "admitted")
    assert verdict == expected, f"{bad.path.name}: the CRD says {verdict} {where}, the comment says {bad.caught_by}"
    if verdict == "schema" and bad.field != "spec":
        assert any(p.startswith(bad.field) for p in where), f"{bad.path.name}: schema errors at {where}"
    if verdict == "cel":
        assert bad.field in where, f"{bad.path.name}: CEL refused {where}, not {bad.field}"


@pytest.mark.parametrize("bad", CORPUS, ids=IDS)
def test_the_operator_reads_it_as_the_comment_says(bad: BadInput):
    if bad.caught_by == "unschedulable":
        _parse_spec(bad.doc["spec"])  # a valid spec: the planner is what refuses it
        return
    with pytest.raises(SpecError) as info:
        _parse_spec(bad.doc.get("spec"))
    assert any(p.startswith(bad.field) for p in info.value.problems), info.value.problems


# --- all of them against the running operator ------------------------------------------------------------


def test_the_operator_refuses_each_once_and_keeps_serving(cluster, operator_logs, results):
    ns = "bad"
    operator = cluster.operator()
    cluster.create(chat_doc("good"), ns)
    for b in CORPUS:
        cluster.create(b.doc, ns)

    def settled() -> bool:
        items = {o["metadata"]["name"]: o for o in cluster.list(API_VERSION, KIND, ns)}
        for b in CORPUS:
            st = items[b.name].get("status") or {}
            if st.get("phase") != b.expected_phase:
                return False
        return (items["good"].get("status") or {}).get("phase") == "Ready"
    wait_until(settled, 60, "every bad input Invalid or Unschedulable, and the good one Ready")
    # The Events of the last status writes may still be on their way.
    wait_until(lambda: len([e for e in cluster.events(ns) if e["type"] == "Warning"]) >= len(CORPUS), 10,
               "a Warning Event per bad input")

    items = {o["metadata"]["name"]: o for o in cluster.list(API_VERSION, KIND, ns)}
    events = cluster.events(ns)
    problems: dict[str, list[str]] = {b.key: [] for b in CORPUS}
    for b in CORPUS:
        st = items[b.name]["status"]
        if st.get("observedGeneration") != items[b.name]["metadata"]["generation"]:
            problems[b.key].append("status is not for the current generation")
        mine = [e for e in events if e["involvedObject"]["name"] == b.name and e["type"] == "Warning"]
        reasons = Counter(e["reason"] for e in mine)
        if b.expected_phase == "Invalid":
            if b.field not in st.get("message", ""):
                problems[b.key].append(f"message does not name {b.field}: {st.get('message')!r}")
            if reasons != Counter({"InvalidSpec": 1}) or b.field not in mine[0]["message"]:
                problems[b.key].append(f"Warning Events: {[(e['reason'], e['message']) for e in mine]}")
        else:
            if b.says not in st.get("message", ""):
                problems[b.key].append(f"message lacks {b.says!r}: {st.get('message')!r}")
            if reasons != Counter({"Unschedulable": 1}):
                problems[b.key].append(f"Warning Events: {[(e['reason'], e['message']) for e in mine]}")
    workloads = [d["metadata"]["name"] for d in cluster.list("apps/v1", "Deployment", ns)]
    if workloads != ["good"]:
        problems["workloads"] = [f"Deployments in the namespace: {workloads}"]

    # Quiet: nothing changes, so the operator must write nothing (a hot loop would show here).
    seen = len(cluster.server.requests())
    time.sleep(3)
    writes = writes_by_port(cluster, cluster.operator_port, seen)
    errors = [f"{r.name}: {r.getMessage()}" for r in operator_logs.records
              if r.levelname in ("ERROR", "CRITICAL") and r.name.startswith("llama_operator")]
    quiet_problems = []
    if writes:
        quiet_problems.append(f"{len(writes)} writes in 3 s of quiet: {Counter(writes).most_common(5)}")
    if errors:
        quiet_problems.append(f"errors logged: {errors[:3]}")
    if not operator.alive:
        quiet_problems.append(f"the operator died: {operator.error!r}")

    for b in CORPUS:
        results.add("bad-input", b.key, input=f"`{b.path.name}`", wrong=b.wrong, caught_by=CAUGHT_BY[b.caught_by],
                    operator=bad_input_answer(b) if not problems[b.key] else "FAILED: " + "; ".join(problems[b.key]))
    scenario, green = SCENARIOS["bad-inputs-quiet"]
    bad_problems = [f"{k}: {v}" for k, v in problems.items() if v] + quiet_problems
    results.add("outage-restarts", "bad-inputs-quiet", scenario=scenario,
                outcome=green if not bad_problems else "FAILED: " + "; ".join(bad_problems)[:300])
    assert not bad_problems, "\n".join(bad_problems)
