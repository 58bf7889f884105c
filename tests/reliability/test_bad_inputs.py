"""Bad input: the corpus in bad_inputs/ (one malformed or contradictory LlamaDeployment per file, its
comment saying what is wrong and where it must be caught).

* Each file is refused where its comment says: by the generated CRD's OpenAPI schema (jsonschema, patterns
  read as RE2), by one of its CEL rules (cel-python, after the API server's defaulting; at the root for
  metadata.name, on each toleration, on the nodeSelector map), or admitted by both.
* The operator's own reading refuses every file the comment says is invalid (whatever the CRD did),
  naming the field, and plans none of them.
* `llama-operator plan` and `render` given hostile or huge files (an alias bomb, odd YAML, huge numbers,
  megabyte strings, names no Service can take, oversized files, malformed Nodes, a 10,000-node cluster): exit 1
  with a short message naming the file or field (never a traceback), in bounded time and memory; the large
  cluster plans.
* All of them at once in the emulator (which validates nothing) beside a valid LlamaDeployment: each
  gets phase Invalid (naming the field) or Unschedulable (with reasons) and exactly one Warning Event;
  the valid one converges; the operator does not crash, logs no error, creates no workload for any of
  them, and then writes nothing for them (no status patch, no Event) during 3 s of quiet.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from llama_operator.api import API_VERSION, KIND, SpecError, parse_object
from llama_operator.loading import _load_documents
from llama_operator.crd import crd_manifest
from llama_operator.passes import _parse_spec

from kit.crd import apply_defaults, cel_refusals, openapi_validator
from kit.paths import CLUSTERS, EXAMPLES
from kit.poll import wait_until
from reliability_cases import CAUGHT_BY, CLI_INPUTS, SCENARIOS, BadInput, bad_input_answer, bad_inputs
from reliability_harness import chat_doc, writes_by_port

CORPUS = bad_inputs()
IDS = [b.key for b in CORPUS]


@pytest.fixture(scope="module")
def schema() -> dict:
    (version,) = crd_manifest()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def api_server_verdict(schema: dict, obj: dict) -> tuple[str, list[str]]:
    """('schema', paths) | ('cel', fieldPaths) | ('admitted', []) for the generated CRD."""
    errors = list(openapi_validator(schema).iter_errors(obj))
    if errors:
        paths = []
        for e in errors:
            path = [str(p) for p in e.absolute_path]
            if e.validator == "required":  # reported at the parent: name the missing field
                path.append(e.message.split("'")[1])
            paths.append(".".join(path))
        return "schema", paths
    defaulted = {**obj, "spec": apply_defaults(schema["properties"]["spec"], obj["spec"])}
    refused = [path for path, _ in cel_refusals(schema, defaulted)]
    return ("cel", refused) if refused else ("admitted", [])


# --- the corpus itself ----------------------------------------------------------------------------------


def test_corpus_is_large_and_covers_the_kinds_of_bad_input():
    assert len(CORPUS) >= 40
    assert len({b.name for b in CORPUS}) == len(CORPUS), "metadata.name must be unique across the corpus"
    for b in CORPUS:
        assert b.doc["kind"] == KIND and b.doc["apiVersion"] == API_VERSION, b.path.name
        assert b.caught_by in CAUGHT_BY, b.path.name
        assert b.field.startswith(("spec", "metadata.name")), b.path.name
        assert b.caught_by != "unschedulable" or b.says, f"{b.path.name}: say what the Unschedulable message holds"
    kinds = {  # what the issue asks the corpus to hold -> a file that does
        "unknown model id": "unknown-model", "wrong types": "wrong-type", "negative budget": "budget-negative",
        "zero budget": "budget-zero", "zero replicas": "replicas-zero", "negative replicas": "replicas-negative",
        "unparseable duration": "ttft-unparseable", "unparseable quantity": "budget-unparseable",
        "floor larger than the model": "floor-larger-than-model", "vision with a text floor": "vision-floor-is-text",
        "context beyond the model's maximum": "context-beyond-model",
        "quantizations the runtime cannot serve": "vllm-with-gguf-quantizations",
        "placement no node satisfies": "placement-no-node", "empty spec": "spec-empty", "huge numbers": "huge",
        "a name no Service can take": "name-", "tolerations the Pod API refuses": "toleration-exists-with-value",
        "label syntax": "node-selector-key-invalid", "object names": "secret-name-invalid",
        "more items than the bounds": "too-many",
    }
    missing = [k for k, part in kinds.items() if not any(part in b.key for b in CORPUS)]
    assert not missing, missing
    assert {b.caught_by for b in CORPUS} == set(CAUGHT_BY)


@pytest.mark.parametrize("bad", CORPUS, ids=IDS)
def test_refused_where_its_comment_says(schema, bad: BadInput, results):
    verdict, where = api_server_verdict(schema, bad.doc)
    expected = {"schema": "schema", "cel": "cel"}.get(bad.caught_by, "admitted")
    assert verdict == expected, f"{bad.path.name}: the CRD says {verdict} {where}, the comment says {bad.caught_by}"
    if verdict == "schema" and bad.field != "spec":
        assert any(p.startswith(bad.field) for p in where), f"{bad.path.name}: schema errors at {where}"
    if verdict == "cel":
        assert any(p.startswith(bad.field) for p in where), f"{bad.path.name}: CEL refused {where}, not {bad.field}"


@pytest.mark.parametrize("bad", CORPUS, ids=IDS)
def test_the_operator_reads_it_as_the_comment_says(bad: BadInput):
    if bad.caught_by == "unschedulable":
        _parse_spec(bad.doc["spec"])  # a valid spec: the planner is what refuses it
        return
    with pytest.raises(SpecError) as info:
        if bad.field.startswith("metadata."):  # the name: api.parse_object (as `plan` reads it) checks it
            parse_object(bad.doc)
        else:
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
    wait_until(settled, 60, "every bad input Invalid or Unschedulable, and the good one Ready", retry_errors=True)
    # The Events of the last status writes may still be on their way.
    wait_until(lambda: len([e for e in cluster.events(namespace=ns) if e["type"] == "Warning"]) >= len(CORPUS), 10,
               "a Warning Event per bad input", retry_errors=True)

    items = {o["metadata"]["name"]: o for o in cluster.list(API_VERSION, KIND, ns)}
    events = cluster.events(namespace=ns)
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


# --- plan / render input files ---------------------------------------------------------------------------

CHAT = EXAMPLES / "chat.yaml"
A100 = CLUSTERS / "a100.yaml"
# The CLI as its own process, reporting its peak resident memory (KiB) to a file (VmHWM: ru_maxrss would carry
# the test process's own peak across fork and exec).
_RUN = """import os, re, sys
from llama_operator.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status, open(os.environ["PEAK_RSS_FILE"], "w") as f:
        f.write(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1))
sys.exit(code)
"""


def cli(tmp_path: Path, *argv) -> tuple[int, str, str, float, int]:
    """(exit code, stdout, stderr, seconds, peak RSS in MiB) of `llama-operator ARGV` in a process of its own."""
    peak = tmp_path / "peak-rss"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PEAK_RSS_FILE": str(peak)})
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, int(peak.read_text()) // 1024


def _alias_bomb(kind: str) -> str:
    lines = ["apiVersion: llama-operator.dev/v1alpha1", f"kind: {kind}", "metadata: {name: bomb}", "spec:",
             "  slo: {ttftP95: 1s, tpotP95: 50ms}", "  memoryBudget: 40Gi",
             '  x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines + ["  model: *a8", ""])


def _deployment(name="chat", **spec) -> str:
    return json.dumps({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
                       "spec": {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "1s", "tpotP95": "50ms"},
                                "memoryBudget": "40Gi", **spec}})


def _cluster(nodes: int) -> str:
    items = []
    for i in range(nodes):
        gpu = i % 4 != 3
        labels = {"kubernetes.io/hostname": f"node-{i:05d}", "topology.kubernetes.io/zone": f"zone-{i % 3}"}
        if gpu:
            labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-L4",
                           "nvidia.com/gpu.count": "4", "nvidia.com/gpu.memory": "23034",
                           "nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "9"})
        resources = {"cpu": "47810m", "memory": "186646292Ki", "pods": "110", **({"nvidia.com/gpu": "4"} if gpu else {})}
        items.append(
            f"- apiVersion: v1\n  kind: Node\n  metadata:\n    name: node-{i:05d}\n    labels:\n"
            + "".join(f"      {k}: \"{v}\"\n" for k, v in labels.items())
            + ("  spec:\n    taints:\n    - {key: nvidia.com/gpu, value: present, effect: NoSchedule}\n" if gpu else "")
            + "  status:\n    allocatable:\n" + "".join(f"      {k}: \"{v}\"\n" for k, v in resources.items())
            + "    capacity:\n" + "".join(f"      {k}: \"{v}\"\n" for k, v in resources.items())
            + "    conditions:\n    - {type: MemoryPressure, status: \"False\"}\n    - {type: Ready, status: \"True\"}\n")
    return "apiVersion: v1\nkind: List\nitems:\n" + "".join(items)


def _bad(tmp_path, problems: list[str], label: str, argv, *, says=(), max_chars=1010, max_seconds=None,
         max_mib=None) -> None:
    for command in ("plan", "render"):
        code, out, err, seconds, mib = cli(tmp_path, command, *argv)
        where = f"{command} {label}"
        if code != 1 or not err.startswith("error:"):
            problems.append(f"{where}: exit {code}, stderr {err[-300:]!r}")
            continue
        if "Traceback" in err:
            problems.append(f"{where}: a traceback")
        if len(err) > max_chars:
            problems.append(f"{where}: {len(err)} characters of error")
        problems += [f"{where}: the message lacks {s!r}: {err[:200]!r}" for s in says if s not in err]
        if max_seconds is not None and seconds > max_seconds:
            problems.append(f"{where}: {seconds:.1f} s")
        if max_mib is not None and mib > max_mib:
            problems.append(f"{where}: {mib} MiB")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CLI_INPUTS), ids=list(CLI_INPUTS))
def test_plan_and_render_refuse_hostile_files_briefly(tmp_path, case, results):
    problems: list[str] = []
    if case == "alias-bomb":
        f = _write(tmp_path, "bomb.yaml", _alias_bomb(KIND))
        _bad(tmp_path, problems, "bomb", ("-f", f, "--cluster", A100), says=("bomb.yaml", "alias"), max_chars=500,
             max_seconds=10, max_mib=200)
        g = _write(tmp_path, "bomb-nodes.yaml", _alias_bomb("Node"))
        _bad(tmp_path, problems, "bomb cluster", ("-f", CHAT, "--cluster", g), says=("bomb-nodes.yaml", "alias"),
             max_chars=500, max_seconds=10, max_mib=200)
    elif case == "odd-yaml":
        for i, content in enumerate(["a: &a [1, *a]\n", "a: " + "[" * 150 + "]" * 150 + "\n",
                                     "a: " + "9" * 5000 + "\n", "a: !!set {x: null}\n",
                                     "kind: !<" + "x" * 100_000 + "> y\n"]):
            f = _write(tmp_path, f"odd-{i}.yaml", content)
            _bad(tmp_path, problems, f"odd-{i}", ("-f", f, "--cluster", A100), says=(f"odd-{i}.yaml",))
        f = tmp_path / "latin1.yaml"
        f.write_bytes("metadata: {name: café}\n".encode("latin-1"))
        _bad(tmp_path, problems, "latin-1", ("-f", f, "--cluster", A100), says=("latin1.yaml",))
    elif case == "huge-numbers":
        for i, (spec, field) in enumerate([({"memoryBudget": "9" * 400 + "E"}, "spec.memoryBudget"),
                                           ({"memoryBudget": "99999999999E"}, "spec.memoryBudget"),
                                           ({"memoryBudget": 10**400}, "spec.memoryBudget"),
                                           ({"contextLength": 10**400}, "spec.contextLength"),
                                           ({"replicas": 1e400}, "spec.replicas")]):
            text = _deployment(**spec).replace("Infinity", "1e400")  # (json writes inf as Infinity)
            f = _write(tmp_path, f"huge-{i}.yaml", text)
            _bad(tmp_path, problems, f"huge-{i}", ("-f", f, "--cluster", A100), says=(field,))
    elif case == "megabyte-strings":
        mega = "k" * 2**20
        f = _write(tmp_path, "mega.yaml", _deployment(name=mega, memoryBudget=mega, placement={
            "tolerations": [{"key": mega, "value": mega}], "nodeSelector": {mega: mega}}))
        _bad(tmp_path, problems, "mega", ("-f", f, "--cluster", A100), max_chars=5000, says=(
            "metadata.name", "spec.memoryBudget", "spec.placement.tolerations[0].key",
            "spec.placement.tolerations[0].value", "spec.placement.nodeSelector"))
    elif case == "bad-names":
        for name in ("my.chat", "Chat", "x" * 64):
            f = _write(tmp_path, "named.yaml", _deployment(name=name))
            _bad(tmp_path, problems, name[:10], ("-f", f, "--cluster", A100), says=("metadata.name",))
    elif case == "oversized-files":
        big = tmp_path / "big.yaml"
        with big.open("wb") as fh:  # sparse: no disk is used
            fh.truncate(16 * 2**20 + 1)
        _bad(tmp_path, problems, "big file", ("-f", big, "--cluster", A100), says=("16777216 bytes",))
        huge = tmp_path / "huge-nodes.yaml"
        with huge.open("wb") as fh:
            fh.truncate(512 * 2**20 + 1)
        _bad(tmp_path, problems, "big cluster", ("-f", CHAT, "--cluster", huge), says=("536870912 bytes",))
    elif case == "malformed-nodes":
        for i, node in enumerate([{"kind": "Node", "metadata": {"name": "a", "labels": [1]}},
                                  {"kind": "Node", "metadata": {"name": "b"}, "status": {"allocatable": {"cpu": "lots"}}},
                                  {"kind": "Node", "metadata": {"name": "c"}, "status": {"conditions": 7}}]):
            f = _write(tmp_path, f"node-{i}.yaml", json.dumps(node))
            _bad(tmp_path, problems, f"node-{i}", ("-f", CHAT, "--cluster", f), says=("Node", "cannot be read"))
    elif case == "large-cluster":
        text = _cluster(10_000)
        f = _write(tmp_path, "nodes.yaml", text)
        g = _write(tmp_path, "nodes.json", json.dumps({"apiVersion": "v1", "kind": "List",
                                                        "items": _load_documents(str(f), 2**30)}))
        for path in (f, g):
            code, out, err, seconds, _ = cli(tmp_path, "plan", "-f", CHAT, "--cluster", path)
            if code != 0 or "(10000 nodes)" not in out:
                problems.append(f"{path.name}: exit {code}, {err[-300:]!r}")
    _, green = CLI_INPUTS[case]
    results.add("cli-input", case, input=CLI_INPUTS[case][0],
                outcome=green if not problems else "FAILED: " + "; ".join(problems)[:300])
    assert not problems, "\n".join(problems)
