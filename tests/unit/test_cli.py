"""The `llama-operator` CLI: plan, estimate and crd, their outputs and every exit code.

Exit codes: 0 success (plan: feasible), 2 plan found nothing feasible, 1 bad input with a message and no
traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llama_operator.cli import main
from llama_operator.crd import render_crd

from kit.paths import CLUSTERS as CL, EXAMPLES as EX


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def bad_input(capsys, *argv) -> str:
    """Run, expect exit 1 with a message on stderr; return the message."""
    code, out, err = run(capsys, *argv)
    assert code == 1, (code, out, err)
    assert err.strip().startswith("error:"), err
    return err


def write_yaml(path: Path, *docs) -> Path:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return path


def deployment(name: str, **spec) -> dict:
    return {"apiVersion": "llama-operator.dev/v1alpha1", "kind": "LlamaDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def node_list(*nodes) -> dict:
    return {"apiVersion": "v1", "kind": "List", "items": list(nodes)}


# --- plan: tables ---------------------------------------------------------------------------------------


def test_plan_table_for_a_feasible_fallback(capsys):
    code, out, _ = run(capsys, "plan", "-f", EX / "vision-90b-on-l4.yaml", "--cluster", CL / "l4-pool.yaml")
    assert code == 0
    assert "LlamaDeployment vision-90b" in out
    chosen = next(line for line in out.splitlines() if line.strip().startswith("Chosen"))
    assert "llama-3.2-11b-vision-instruct" in chosen and "vllm" in chosen and "1x NVIDIA-L4" in chosen
    assert "[FALLBACK]" in chosen
    assert "Predicted" in out and "memory" in out
    assert "(limit 2s)" in out and "(limit 100ms)" in out  # predicted TTFT/TPOT next to the limits
    assert "Why" in out and "llama-3.2-90b-vision-instruct" in out
    # the rejected candidates, each with its reasons
    rejected = [line for line in out.splitlines() if line.strip().startswith("rejected")]
    assert rejected and any("llama-3.2-90b-vision-instruct" in line for line in rejected)
    assert "- needs" in out and "usable on NVIDIA-L4" in out
    assert "VERDICT" in out and "HARDWARE" in out and "TPOT" in out


def test_plan_table_without_fallback(capsys):
    code, out, _ = run(capsys, "plan", "-f", EX / "70b-tight-tpot.yaml", "--cluster", CL / "a100.yaml")
    assert code == 0
    chosen = next(line for line in out.splitlines() if line.strip().startswith("Chosen"))
    assert "llama-3.3-70b-instruct bf16 on vllm" in chosen and "NVIDIA-A100-SXM4-80GB" in chosen
    assert "[FALLBACK]" not in chosen
    assert "(limit 30ms)" in out and "(limit 5s)" in out  # examples/70b-tight-tpot.yaml's slo
    assert "Weights    meta-llama/Llama-3.3-70B-Instruct" in out


def test_plan_table_for_cpu(capsys):
    code, out, _ = run(capsys, "plan", "-f", EX / "tiny-cpu.yaml", "--cluster", CL / "cpu-only.yaml")
    assert code == 0
    chosen = next(line for line in out.splitlines() if line.strip().startswith("Chosen"))
    assert "llama-3.2-1b-instruct" in chosen and "llamacpp" in chosen and "cpu" in chosen
    assert "of RAM" in out


def test_plan_table_infeasible_exits_2(capsys):
    code, out, _ = run(capsys, "plan", "-f", EX / "impossible.yaml", "--cluster", CL / "h100-8x.yaml")
    assert code == 2
    assert "INFEASIBLE" in out
    assert "Chosen" not in out
    assert "memory budget 16.0 GiB" in out


# --- plan: json and yaml --------------------------------------------------------------------------------


def plan_json(capsys, example, cluster) -> tuple[int, dict]:
    code, out, _ = run(capsys, "plan", "-f", EX / example, "--cluster", CL / cluster, "-o", "json")
    return code, json.loads(out)


def test_plan_json_has_the_documented_keys(capsys):
    code, d = plan_json(capsys, "70b-tight-tpot.yaml", "mixed.yaml")
    assert code == 0
    assert d["feasible"] is True and d["fallback"] is True and d["name"] == "assistant-70b"
    ch = d["chosen"]
    assert {"model", "quantization", "runtime", "gpuProduct", "gpusPerReplica", "predicted"} <= set(ch)
    assert {"memoryBytes", "ttftSeconds", "tpotSeconds"} <= set(ch["predicted"])
    assert ch["model"] == "llama-3.3-70b-instruct" and ch["quantization"] not in ("bf16", "f16")
    assert isinstance(ch["gpuProduct"], str) and ch["gpusPerReplica"] >= 1
    # the prediction is within the limits of examples/70b-tight-tpot.yaml
    assert ch["predicted"]["tpotSeconds"] <= 0.030 and ch["predicted"]["ttftSeconds"] <= 5.0
    assert ch["predicted"]["memoryBytes"] <= 320 * 2**30
    assert d["candidates"]
    for c in d["candidates"]:
        assert {"model", "quantization", "runtime", "hardware", "verdict", "reasons"} <= set(c)
        assert c["verdict"] in ("chosen", "feasible", "rejected")
        assert (c["verdict"] == "rejected") == bool(c["reasons"])
    assert all("predicted" in c for c in d["candidates"])  # null when the format cannot run there
    estimated = [c for c in d["candidates"] if c["predicted"] is not None]
    assert estimated and all({"memoryBytes", "ttftSeconds", "tpotSeconds"} <= set(c["predicted"]) for c in estimated)
    assert [c["verdict"] for c in d["candidates"]].count("chosen") == 1


def test_plan_json_cpu_choice_has_null_gpu_product(capsys):
    code, d = plan_json(capsys, "tiny-cpu.yaml", "cpu-only.yaml")
    assert code == 0 and d["fallback"] is False
    assert d["chosen"]["gpuProduct"] is None and d["chosen"]["runtime"] == "llamacpp"


def test_plan_json_infeasible(capsys):
    code, d = plan_json(capsys, "impossible.yaml", "h100-8x.yaml")
    assert code == 2
    assert d["feasible"] is False and d["chosen"] is None
    assert d["candidates"] and all(c["verdict"] == "rejected" and c["reasons"] for c in d["candidates"])


def test_plan_lists_the_variants_no_node_can_run(capsys):
    # a vision model (vLLM only) on a CPU-only cluster: every variant is a rejected candidate with why
    code, out, _ = run(capsys, "plan", "-f", EX / "chat-11b-vision.yaml", "--cluster", CL / "cpu-only.yaml",
                       "-o", "json")
    assert code == 2
    d = json.loads(out)
    assert [c["quantization"] for c in d["candidates"]] == ["bf16", "fp8", "gptq-int4"]
    for c in d["candidates"]:
        assert c["verdict"] == "rejected" and c["hardware"] == "no GPU node" and c["predicted"] is None
        assert "vLLM 0.10.2 needs a GPU" in c["reasons"]
    code, out, _ = run(capsys, "plan", "-f", EX / "chat-11b-vision.yaml", "--cluster", CL / "cpu-only.yaml")
    assert code == 2
    assert "Candidates tried: 3" in out
    assert out.count("      - vLLM 0.10.2 needs a GPU") == 3
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("rejected")]
    assert [r[2] for r in rows] == ["bf16", "fp8", "gptq-int4"] and all("no GPU node" in " ".join(r) for r in rows)


def test_plan_yaml_parses_to_the_same_document(capsys):
    code, out, _ = run(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", CL / "mixed.yaml", "-o", "yaml")
    assert code == 0
    as_yaml = yaml.safe_load(out)
    _, as_json = plan_json(capsys, "chat.yaml", "mixed.yaml")
    assert as_yaml == as_json


def test_plan_output_is_deterministic(capsys):
    first = run(capsys, "plan", "-f", EX / "70b-tight-tpot.yaml", "--cluster", CL / "mixed.yaml")
    second = run(capsys, "plan", "-f", EX / "70b-tight-tpot.yaml", "--cluster", CL / "mixed.yaml")
    assert first == second


@pytest.mark.parametrize("example, cluster, code", [
    ("chat.yaml", "a100.yaml", 0), ("chat-11b-vision.yaml", "l4-pool.yaml", 0),
    ("vision-90b-on-l4.yaml", "l4-pool.yaml", 0), ("70b-tight-tpot.yaml", "a100.yaml", 0),
    ("70b-tight-tpot.yaml", "mixed.yaml", 0), ("tiny-cpu.yaml", "cpu-only.yaml", 0),
    ("impossible.yaml", "h100-8x.yaml", 2), ("chat-11b-vision.yaml", "cpu-only.yaml", 2),
])
def test_plan_exit_codes_on_the_examples(capsys, example, cluster, code):
    got, d = plan_json(capsys, example, cluster)
    assert got == code and d["feasible"] is (code == 0)


# --- plan: several deployments in one file --------------------------------------------------------------


def test_later_deployments_see_the_gpus_earlier_ones_take(capsys, tmp_path, make_node):
    cluster = write_yaml(tmp_path / "cluster.yaml", node_list(make_node("only-l4", "NVIDIA-L4", 1)))
    spec = dict(model="llama-3.1-8b-instruct", slo={"ttftP95": "10s", "tpotP95": "1s"}, memoryBudget="24Gi",
                fallback={"allowCPU": False})
    one = write_yaml(tmp_path / "one.yaml", deployment("first", **spec))
    two = write_yaml(tmp_path / "two.yaml", deployment("first", **spec), deployment("second", **spec))
    assert run(capsys, "plan", "-f", one, "--cluster", cluster)[0] == 0
    code, out, _ = run(capsys, "plan", "-f", two, "--cluster", cluster, "-o", "json")
    assert code == 2
    first, second = json.loads(out)
    assert first["name"] == "first" and first["feasible"]
    assert second["name"] == "second" and not second["feasible"]


def test_later_deployments_see_the_cpu_node_earlier_ones_take(capsys, tmp_path, make_node):
    # Two 16-core CPU nodes; only the one labelled 240 GB/s streams the 1B fast enough (~2.5 GB of f16
    # weights per token at 51% of the peak: ~20 ms at 240 GB/s, ~122 ms at the 40 GB/s default, against a 40 ms
    # TPOT).
    # A replica takes 16 cores, so the fast node holds one replica: the second deployment has nowhere to go.
    cluster = write_yaml(tmp_path / "cluster.yaml", node_list(
        make_node("a-slow", cpu="16", memory="64Gi"),
        make_node("z-fast", cpu="16", memory="64Gi", labels={"llama-operator.dev/memory-bandwidth-gbps": "240"}),
    ))
    spec = dict(model="llama-3.2-1b-instruct", runtime="llamacpp", contextLength=4096, memoryBudget="8Gi",
                slo={"ttftP95": "3s", "tpotP95": "40ms", "promptTokens": 256},
                fallback={"allowQuantization": False})
    one = write_yaml(tmp_path / "one.yaml", deployment("first", **spec))
    code, out, _ = run(capsys, "plan", "-f", one, "--cluster", cluster, "-o", "json")
    assert code == 0 and "240 GB/s" in json.loads(out)["chosen"]["hardware"]
    two = write_yaml(tmp_path / "two.yaml", deployment("first", **spec), deployment("second", **spec))
    code, out, _ = run(capsys, "plan", "-f", two, "--cluster", cluster, "-o", "json")
    first, second = json.loads(out)
    assert first["feasible"]
    assert not second["feasible"], f"second deployment planned on {second['chosen']['hardware']}, already taken"
    assert code == 2


def test_later_deployments_see_the_gpus_taken_where_the_earlier_one_was_placed(capsys, tmp_path, make_node):
    # Two single-L4 nodes of two teams. "y-first" may only run on team y's node and takes its GPU; then
    # "x-second" (team x) still has team x's GPU, and "y-second" (team y) has none.
    cluster = write_yaml(tmp_path / "cluster.yaml", node_list(
        make_node("a", "NVIDIA-L4", 1, labels={"team": "x"}),
        make_node("b", "NVIDIA-L4", 1, labels={"team": "y"}),
    ))

    def pinned(name, team):
        return deployment(name, model="llama-3.1-8b-instruct", slo={"ttftP95": "10s", "tpotP95": "1s"},
                          memoryBudget="24Gi", fallback={"allowCPU": False},
                          placement={"nodeSelector": {"team": team}})

    f = write_yaml(tmp_path / "d.yaml", pinned("y-first", "y"), pinned("x-second", "x"), pinned("y-second", "y"))
    code, out, _ = run(capsys, "plan", "-f", f, "--cluster", cluster, "-o", "json")
    verdicts = {d["name"]: d["feasible"] for d in json.loads(out)}
    assert verdicts == {"y-first": True, "x-second": True, "y-second": False}
    assert code == 2


# --- render ---------------------------------------------------------------------------------------------


def test_render_prints_what_the_operator_would_apply(capsys):
    from llama_operator.loading import load_cluster_file, load_deployment_objects
    from llama_operator.planner import plan
    from llama_operator.render import Owner, render

    code, out, _ = run(capsys, "render", "-f", EX / "chat.yaml", "--cluster", CL / "mixed.yaml")
    assert code == 0
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert out.startswith("# LlamaDeployment default/chat: ") and "placeholder uid" in out
    # The same objects the operator's own path renders for this spec on this cluster.
    ((name, meta, spec),) = load_deployment_objects(str(EX / "chat.yaml"))
    inventory, _ = load_cluster_file(str(CL / "mixed.yaml"))
    chosen = plan(spec, inventory).chosen.to_chosen_plan()
    assert docs == render(Owner(name, "default", "00000000-0000-0000-0000-000000000000"), spec, chosen)


def test_render_takes_namespace_and_uid_from_the_file(capsys, tmp_path):
    doc = yaml.safe_load((EX / "tiny-cpu.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="3f0a6f6e-5a57-4a0b-9a3c-1d7e6a2b9c10")
    f = write_yaml(tmp_path / "d.yaml", doc)
    code, out, _ = run(capsys, "render", "-f", f, "--cluster", CL / "cpu-only.yaml")
    assert code == 0 and "placeholder" not in out
    for d in yaml.safe_load_all(out):
        assert d["metadata"]["namespace"] == "team-a"
        assert d["metadata"]["ownerReferences"][0]["uid"] == "3f0a6f6e-5a57-4a0b-9a3c-1d7e6a2b9c10"


def test_render_with_no_feasible_plan_exits_2_and_renders_the_rest(capsys, tmp_path):
    ok = yaml.safe_load((EX / "tiny-cpu.yaml").read_text())
    impossible = yaml.safe_load((EX / "impossible.yaml").read_text())
    f = write_yaml(tmp_path / "d.yaml", impossible, ok)
    code, out, err = run(capsys, "render", "-f", f, "--cluster", CL / "cpu-only.yaml")
    assert code == 2
    assert f"{impossible['metadata']['name']}: no feasible plan" in err
    assert {d["metadata"]["name"] for d in yaml.safe_load_all(out) if d} == {ok["metadata"]["name"]}


def test_render_bad_input_exits_1(capsys, tmp_path):
    assert "no such file" in bad_input(capsys, "render", "-f", tmp_path / "nope.yaml", "--cluster", CL / "a100.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", deployment("x", model="llama-9b", slo={"ttftP95": "1s", "tpotP95": "1s"},
                                                       memoryBudget="1Gi"))
    assert "spec.model" in bad_input(capsys, "render", "-f", bad, "--cluster", CL / "a100.yaml")


@pytest.fixture
def captured_run(monkeypatch):
    """`llama-operator run` up to the operator itself: the RunOptions it would start with."""
    import llama_operator.runner as runner

    seen = []

    async def fake_run_async(options, **_):
        seen.append(options)

    monkeypatch.setattr(runner, "run_async", fake_run_async)
    monkeypatch.setattr(runner, "configure_logging", lambda **_: None)
    monkeypatch.setattr(runner, "tune_gc", lambda: None)  # process-wide: not in the test process

    def start(capsys, *argv):
        code, out, err = run(capsys, "run", *argv)
        assert code == 0, err
        return seen.pop()

    return start


def test_run_listens_on_every_interface_by_default(capsys, captured_run):
    options = captured_run(capsys)
    assert (options.metrics_host, options.metrics_port) == ("0.0.0.0", 8080)
    assert (options.health_host, options.health_port) == ("0.0.0.0", 8081)


def test_run_metrics_and_health_addresses(capsys, captured_run):
    options = captured_run(capsys, "--metrics-address", "127.0.0.1", "--health-address", "::1")
    assert options.metrics_host == "127.0.0.1" and options.health_host == "::1"
    from llama_operator.runner import _url_host

    assert _url_host("::1") == "[::1]" and _url_host("0.0.0.0") == "0.0.0.0"  # the liveness URL kopf parses
    for flag in ("--metrics-address", "--health-address"):
        for bad in ("localhost", "", "0.0.0.0:8080", "300.1.1.1"):
            assert f"{flag} " in bad_input(capsys, "run", flag, bad)


def test_run_forbidden_tolerations(capsys, captured_run):
    from llama_operator.cli import _forbidden_tolerations
    from llama_operator.loading import UserError
    from llama_operator.placement import DEFAULT_FORBIDDEN_TOLERATIONS

    assert _forbidden_tolerations(None) == DEFAULT_FORBIDDEN_TOLERATIONS
    assert _forbidden_tolerations(["dedicated", "node-role.kubernetes.io/control-plane"]) == {
        "dedicated", "node-role.kubernetes.io/control-plane"}
    assert _forbidden_tolerations([""]) == frozenset()  # --forbid-toleration= : none
    for bad in ("a b", "-x", "a/b/c", "x" * 64):
        with pytest.raises(UserError, match="--forbid-toleration"):
            _forbidden_tolerations([bad])
    assert "--forbid-toleration" in bad_input(capsys, "run", "--forbid-toleration", "not a key")
    options = captured_run(capsys, "--forbid-toleration", "dedicated", "--forbid-toleration", "gpu-only")
    assert options.settings.forbidden_tolerations == {"dedicated", "gpu-only"}


def test_run_pods_all_namespaces_with_watched_namespaces(capsys, captured_run):
    options = captured_run(capsys, "-n", "team-a", "--pods-all-namespaces")
    assert options.namespaces == ["team-a"] and options.pods_all_namespaces
    assert not captured_run(capsys, "-n", "team-a").pods_all_namespaces
    # cluster-wide: every namespace's Pods are watched anyway
    options = captured_run(capsys, "--all-namespaces", "--pods-all-namespaces")
    assert options.namespaces == [] and not options.pods_all_namespaces


def test_run_image_mirrors_name_a_pinned_image(capsys):
    from llama_operator.cli import _image_mirrors
    from llama_operator.loading import UserError
    from llama_operator.engines import releases

    pinned = releases()[0].images["cuda"]
    assert _image_mirrors([f"{pinned}=registry.local/v:1"]).resolve(pinned) == "registry.local/v:1"
    assert _image_mirrors([f"{pinned}=registry.local/v:1=2000"]).user(pinned) == (2000, 2000)
    for bad in ("nope", "vllm/vllm-openai:latest=x", f"{pinned}=", f"{pinned}=registry.local/v:1=root",
                f"{pinned}=registry.local/v:1=0"):
        with pytest.raises(UserError, match="--image"):
            _image_mirrors([bad])


# --- plan: bad input ------------------------------------------------------------------------------------


def test_missing_file(capsys, tmp_path):
    err = bad_input(capsys, "plan", "-f", tmp_path / "nope.yaml", "--cluster", CL / "a100.yaml")
    assert "nope.yaml" in err and "no such file" in err


def test_missing_cluster_file(capsys, tmp_path):
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", tmp_path / "gone.yaml")
    assert "gone.yaml" in err


def test_invalid_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n  model: x\n")
    err = bad_input(capsys, "plan", "-f", bad, "--cluster", CL / "a100.yaml")
    assert "not valid YAML" in err
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", bad)
    assert "not valid YAML" in err


@pytest.mark.parametrize("content", ["", "just a string\n", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"])
def test_file_without_a_llamadeployment(capsys, tmp_path, content):
    f = tmp_path / "other.yaml"
    f.write_text(content)
    err = bad_input(capsys, "plan", "-f", f, "--cluster", CL / "a100.yaml")
    assert "no LlamaDeployment" in err


def test_a_cluster_file_as_the_deployment_file(capsys):
    assert "no LlamaDeployment" in bad_input(capsys, "plan", "-f", CL / "a100.yaml", "--cluster", CL / "a100.yaml")


@pytest.mark.parametrize("spec_overrides, field", [
    ({"memoryBudget": "lots"}, "spec.memoryBudget"),
    ({"slo": {"ttftP95": "500 ms", "tpotP95": "50ms"}}, "spec.slo.ttftP95"),
    ({"model": "llama-3.2-11b-vision-instruct", "runtime": "llamacpp"}, "spec.runtime"),
    ({"fallback": {"quantizations": []}}, "spec.fallback.quantizations"),
    ({"runtime": "vllm", "fallback": {"quantizations": ["q4_k_m"]}}, "spec.fallback.quantizations"),
    ({"runtime": "llamacpp", "fallback": {"quantizations": ["awq-int4"]}}, "spec.fallback.quantizations"),
])
def test_invalid_spec_names_the_deployment_and_the_field(capsys, tmp_path, spec_overrides, field):
    spec = {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "1s", "tpotP95": "50ms"}, "memoryBudget": "40Gi"}
    spec.update(spec_overrides)
    f = write_yaml(tmp_path / "bad-spec.yaml", deployment("broken", **spec))
    err = bad_input(capsys, "plan", "-f", f, "--cluster", CL / "a100.yaml")
    assert "broken" in err and field in err


@pytest.mark.parametrize("cluster", [
    node_list(),
    deployment("not-a-node", model="llama-3.1-8b-instruct"),
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
])
def test_cluster_file_without_nodes(capsys, tmp_path, cluster):
    f = write_yaml(tmp_path / "empty-cluster.yaml", cluster)
    assert "no Node" in bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", f)


def test_no_cluster_and_no_kubeconfig(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "does-not-exist"))
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml")
    assert "kubeconfig" in err.lower() and "--cluster" in err


def test_cluster_with_pods_holding_the_gpus(capsys, tmp_path, make_node, make_pod):
    f = write_yaml(tmp_path / "busy.yaml", make_node("l4", "NVIDIA-L4", 1), make_pod("l4", gpus=1))
    spec = dict(model="llama-3.1-8b-instruct", slo={"ttftP95": "10s", "tpotP95": "1s"}, memoryBudget="24Gi",
                fallback={"allowCPU": False})
    d = write_yaml(tmp_path / "d.yaml", deployment("d", **spec))
    code, out, _ = run(capsys, "plan", "-f", d, "--cluster", f, "-o", "json")
    assert code == 2
    assert any("free" in r for c in json.loads(out)["candidates"] for r in c["reasons"])


def test_argparse_errors_exit_1(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan"])  # -f is required
    assert info.value.code == 1
    assert "-f" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["plan", "-f", str(EX / "chat.yaml"), "-o", "xml"])
    assert info.value.code == 1


# --- estimate -------------------------------------------------------------------------------------------


def estimate_json(capsys, *extra, model="llama-3.1-8b-instruct", quant="bf16", runtime="vllm", gpu="A100-80GB"):
    code, out, _ = run(capsys, "estimate", "--model", model, "--quantization", quant, "--runtime", runtime,
                       "--gpu", gpu, "-o", "json", *extra)
    assert code == 0
    return json.loads(out)


def test_estimate_json_keys_and_sums(capsys):
    d = estimate_json(capsys)
    assert {"weightsBytes", "kvCacheBytes", "overheadBytes", "totalBytes", "perGpuBytes", "ttftSeconds",
            "tpotSeconds", "decodeTokensPerSecond"} <= set(d)
    assert d["totalBytes"] == d["weightsBytes"] + d["kvCacheBytes"] + d["overheadBytes"]
    assert d["perGpuBytes"] == d["totalBytes"]  # one GPU
    assert d["decodeTokensPerSecond"] == pytest.approx(1 / d["tpotSeconds"], rel=1e-3)
    assert d["weightsBytes"] == pytest.approx(2 * 8.03e9, rel=0.01)  # 8B parameters x 2 bytes


def test_estimate_more_gpus_with_vllm(capsys):
    two = estimate_json(capsys, "--gpus", 2, model="llama-3.3-70b-instruct")
    four = estimate_json(capsys, "--gpus", 4, model="llama-3.3-70b-instruct")
    assert four["perGpuBytes"] < two["perGpuBytes"]
    assert four["tpotSeconds"] < two["tpotSeconds"]
    assert four["weightsBytes"] == two["weightsBytes"]


def test_estimate_longer_context_more_kv(capsys):
    short = estimate_json(capsys, "--context", 4096)
    long_ = estimate_json(capsys, "--context", 32768)
    assert long_["kvCacheBytes"] == 8 * short["kvCacheBytes"]
    assert long_["totalBytes"] > short["totalBytes"]


def test_estimate_gguf_weights_order(capsys):
    w = {q: estimate_json(capsys, quant=q, runtime="llamacpp")["weightsBytes"] for q in ("q4_k_m", "q8_0", "f16")}
    assert w["q4_k_m"] < w["q8_0"] < w["f16"]


def test_estimate_fp8_kv_cache(capsys):
    auto = estimate_json(capsys, "--context", 16384)
    fp8 = estimate_json(capsys, "--context", 16384, "--kv-cache-dtype", "fp8")
    assert fp8["kvCacheBytes"] * 2 == auto["kvCacheBytes"]


def test_estimate_on_cpu(capsys):
    d = estimate_json(capsys, "--cpu-cores", 32, "--cpu-bandwidth", 120, model="llama-3.2-1b-instruct",
                      quant="q8_0", runtime="llamacpp", gpu="cpu")
    slow = estimate_json(capsys, "--cpu-cores", 32, "--cpu-bandwidth", 40, model="llama-3.2-1b-instruct",
                         quant="q8_0", runtime="llamacpp", gpu="cpu")
    assert d["tpotSeconds"] < slow["tpotSeconds"]
    assert d["perGpuBytes"] == d["totalBytes"]


def test_estimate_a_variant_nobody_publishes_with_a_note(capsys):
    """70B at f16 in GGUF has no published file, but llama.cpp runs it: estimated, and said so."""
    d = estimate_json(capsys, "--gpus", 2, model="llama-3.1-70b-instruct", quant="f16", runtime="llamacpp",
                      gpu="H100")
    assert "not published as f16" in d["note"] and "q4_k_m" in d["note"]
    assert d["weightsBytes"] == pytest.approx(2 * 70.6e9, rel=0.02)  # 16-bit weights
    published = estimate_json(capsys, "--gpus", 2, model="llama-3.1-70b-instruct", quant="q8_0",
                              runtime="llamacpp", gpu="H100")
    assert "note" not in published
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.1-70b-instruct", "--quantization", "f16",
                       "--runtime", "llamacpp", "--gpu", "H100", "--gpus", "2")
    assert code == 0 and "note      llama-3.1-70b-instruct is not published as f16" in out


def test_estimate_table_and_yaml(capsys):
    args = ["estimate", "--model", "llama-3.1-8b-instruct", "--quantization", "q4_k_m", "--runtime", "llamacpp",
            "--gpu", "L4"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert "llama-3.1-8b-instruct q4_k_m on llamacpp, 1x NVIDIA-L4" in out
    for label in ("weights", "KV cache", "overhead", "total", "TTFT", "TPOT"):
        assert label in out
    code, out, _ = run(capsys, *args, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == estimate_json(capsys, quant="q4_k_m", runtime="llamacpp", gpu="L4")


@pytest.mark.parametrize("argv, mentions", [
    (["--model", "llama-9b", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "L4"], "--model"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "q9", "--runtime", "vllm", "--gpu", "L4"],
     "--quantization"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "B9000"], "--gpu"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "q4_k_m", "--runtime", "vllm", "--gpu", "L4"],
     "--runtime"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "awq-int4", "--runtime", "llamacpp", "--gpu", "L4"],
     "--runtime"),
    (["--model", "llama-3.2-11b-vision-instruct", "--quantization", "q4_k_m", "--runtime", "llamacpp", "--gpu", "L4"],
     "not published"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "cpu"], "vLLM"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "L4",
      "--gpus", "0"], "--gpus"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "L4",
      "--context", "0"], "--context"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "L4",
      "--context", "200000"], "--context"),
    (["--model", "llama-3.1-8b-instruct", "--quantization", "bf16", "--runtime", "vllm", "--gpu", "L4",
      "--kv-cache-dtype", "q8_0"], "--kv-cache-dtype"),
])
def test_estimate_bad_input(capsys, argv, mentions):
    assert mentions in bad_input(capsys, "estimate", *argv)


def test_estimate_unknown_gpu_lists_the_known_ones(capsys):
    err = bad_input(capsys, "estimate", "--model", "llama-3.1-8b-instruct", "--quantization", "bf16",
                    "--runtime", "vllm", "--gpu", "B9000")
    assert "NVIDIA-L4" in err and "cpu" in err


@pytest.mark.parametrize("flag, value", [("--cpu-bandwidth", "-5"), ("--cpu-cores", "0")])
def test_estimate_refuses_impossible_cpu_figures(capsys, flag, value):
    # a negative memory bandwidth or a node without cores cannot be estimated; like --gpus 0 or
    # --context 0 these are bad input (exit 1), not a number to print
    err = bad_input(capsys, "estimate", "--model", "llama-3.1-8b-instruct", "--quantization", "q4_k_m",
                    "--runtime", "llamacpp", "--gpu", "cpu", flag, value)
    assert flag in err


# --- crd ------------------------------------------------------------------------------------------------


def test_crd_stdout(capsys):
    code, out, _ = run(capsys, "crd", "--stdout")
    assert code == 0 and out == render_crd()


def test_crd_writes_the_file(capsys, tmp_path):
    target = tmp_path / "out" / "crd.yaml"
    code, out, _ = run(capsys, "crd", "--output", target)
    assert code == 0 and str(target) in out
    assert target.read_text() == render_crd()


# --- plan / render: hostile and huge input files --------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" LlamaDeployment: a few hundred bytes whose aliases expand to 9**levels strings,
    in the spec where validation, and an error message quoting the value, would expand them."""
    lines = ["apiVersion: llama-operator.dev/v1alpha1", "kind: LlamaDeployment", "metadata: {name: bomb}",
             "spec:", "  slo: {ttftP95: 1s, tpotP95: 50ms}", "  memoryBudget: 40Gi",
             '  x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"  x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"  model: *a{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["plan", "render"])
def test_an_alias_bomb_is_refused_quickly_in_little_memory_with_a_short_message(capsys, tmp_path, command):
    import time
    import tracemalloc

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    tracemalloc.start()
    started = time.monotonic()
    try:
        err = bad_input(capsys, command, "-f", bomb, "--cluster", CL / "a100.yaml")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "alias" in err and "bomb.yaml" in err
    assert len(err) < 500, len(err)
    assert elapsed < 5 and peak < 64 * 2**20, (elapsed, peak)


def test_the_same_bomb_in_a_cluster_file_is_refused(capsys, tmp_path):
    bomb = tmp_path / "nodes.yaml"
    bomb.write_text(alias_bomb().replace("kind: LlamaDeployment", "kind: Node"))
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", bomb)
    assert "alias" in err and len(err) < 500


@pytest.mark.parametrize("content, says", [
    ("a: &a [1, *a]\n", "recursive alias"),
    ("a: " + "[" * 150 + "]" * 150 + "\n", "deeper than"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting"),  # libyaml's own limit
    ("[" * 5000 + "]" * 5000 + "\n", "nesting"),  # too deep for json: read as YAML
    ("a: " + "9" * 5000 + "\n", "digits"),
    ("a: !!set {x: null}\n", "not supported"),
    ("a: !custom x\n", "constructor"),
    ("kind: !<" + "x" * 100_000 + "> y\n", "constructor"),
    ("? [a, b]\n: c\n", "mapping key"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_yaml_the_loader_refuses_is_a_short_error(capsys, tmp_path, content, says):
    f = tmp_path / "odd.yaml"
    f.write_text(content)
    for argv in (("-f", f, "--cluster", CL / "a100.yaml"), ("-f", EX / "chat.yaml", "--cluster", f)):
        err = bad_input(capsys, "plan", *argv)
        assert says in err and len(err) < 1200, err[:300]


def test_a_file_that_is_not_utf8_is_a_short_error(capsys, tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("metadata: {name: café}\n".encode("latin-1"))
    assert "not valid YAML" in bad_input(capsys, "plan", "-f", f, "--cluster", CL / "a100.yaml")


def test_files_larger_than_the_caps_are_refused_unread(capsys, tmp_path, monkeypatch):
    import llama_operator.loading as loading

    monkeypatch.setattr(loading, "MAX_DEPLOYMENT_FILE_BYTES", 1000)
    monkeypatch.setattr(loading, "MAX_CLUSTER_FILE_BYTES", 2000)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 3000 + "\n" + (EX / "chat.yaml").read_text())
    err = bad_input(capsys, "plan", "-f", big, "--cluster", CL / "a100.yaml")
    assert "big.yaml" in err and "1000 bytes" in err
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", big)
    assert "2000 bytes" in err
    assert loading.MAX_DEPLOYMENT_FILE_BYTES < loading.MAX_CLUSTER_FILE_BYTES


@pytest.mark.parametrize("spec_overrides, field", [
    ({"memoryBudget": "9" * 400 + "E"}, "spec.memoryBudget"),
    ({"memoryBudget": 10**400}, "spec.memoryBudget"),
    ({"memoryBudget": "99999999999E"}, "spec.memoryBudget"),
    ({"source": {"cache": {"size": "9" * 400 + "Ei"}}}, "spec.source.cache.size"),
    ({"contextLength": 10**400}, "spec.contextLength"),
    ({"replicas": 1e400}, "spec.replicas"),
    ({"slo": {"ttftP95": "9" * 400 + "s", "tpotP95": "50ms"}}, "spec.slo.ttftP95"),
])
@pytest.mark.parametrize("command", ["plan", "render"])
def test_huge_numbers_exit_1_naming_the_field(capsys, tmp_path, command, spec_overrides, field):
    spec = {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "1s", "tpotP95": "50ms"}, "memoryBudget": "40Gi"}
    spec.update(spec_overrides)
    f = write_yaml(tmp_path / "huge.yaml", deployment("huge", **spec))
    err = bad_input(capsys, command, "-f", f, "--cluster", CL / "a100.yaml")
    assert "huge" in err and field in err and len(err) < 800, err[:800]


@pytest.mark.parametrize("name", ["chat.v2", "Chat", "x" * 64])
def test_a_name_the_service_cannot_take_exits_1_naming_metadata_name(capsys, tmp_path, name):
    spec = {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "1s", "tpotP95": "50ms"}, "memoryBudget": "40Gi"}
    f = write_yaml(tmp_path / "named.yaml", deployment(name, **spec))
    for command in ("plan", "render"):
        err = bad_input(capsys, command, "-f", f, "--cluster", CL / "a100.yaml")
        assert "metadata.name" in err and "63" in err


def test_a_megabyte_value_prints_a_short_error(capsys, tmp_path):
    mega = "k" * 2**20
    f = tmp_path / "mega.yaml"
    f.write_text(json.dumps(deployment(mega, model="llama-3.1-8b-instruct", slo={"ttftP95": "1s", "tpotP95": "50ms"},
                                       memoryBudget=mega, placement={"tolerations": [{"key": mega, "value": mega}],
                                                                     "nodeSelector": {mega: mega}})))
    err = bad_input(capsys, "plan", "-f", f, "--cluster", CL / "a100.yaml")
    for field in ("metadata.name", "spec.memoryBudget", "spec.placement.tolerations[0].key",
                  "spec.placement.tolerations[0].value", "spec.placement.nodeSelector"):
        assert field in err
    assert len(err) < 5000


@pytest.mark.parametrize("node", [
    {"kind": "Node", "metadata": {"name": "a", "labels": [1]}},
    {"kind": "Node", "metadata": {"name": "a"}, "status": {"allocatable": {"cpu": "lots"}}},
    {"kind": "Node", "metadata": {"name": "a"}, "status": {"conditions": 7}},
    {"kind": "Node", "metadata": {"name": ["a"]}, "spec": {"taints": [1]}},
])
def test_a_node_the_operator_cannot_read_is_named(capsys, tmp_path, node):
    f = write_yaml(tmp_path / "nodes.yaml", node)
    err = bad_input(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", f)
    assert "Node" in err and "cannot be read" in err


def test_the_loader_reads_what_the_safe_loader_reads(tmp_path):
    from llama_operator.loading import _load_documents

    text = """
base: &base {a: 1, b: two, c: [1, 2, {d: null}]}
other: &other {b: 3, e: 2001-12-14, f: 1.5e3, g: .inf, h: 0x1F, i: yes, j: "quoted", k: !!binary aGVsbG8=}
m: {<<: [*base, *other], c: overridden}
n: {<<: *other, b: mine}
s: &s scalar
t: *s
empty:
"1": one
---
- a
- !!str 1
---
"""
    f = tmp_path / "doc.yaml"
    f.write_text(text)
    assert _load_documents(str(f)) == [d for d in yaml.safe_load_all(text) if d is not None]
    for path in sorted(EX.glob("**/*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        expanded = [x for d in docs for x in (d["items"] if d.get("kind") == "List" else [d])]
        assert _load_documents(str(path), 2**30) == expanded, path.name


def cluster_file(nodes: int) -> str:
    """`kubectl get nodes -o yaml` of a large cluster: a List of GFD-labelled GPU nodes and CPU nodes."""
    shapes = [("NVIDIA-L4", 4, "23034", "8", "9"), ("NVIDIA-A10G", 1, "23028", "8", "6"),
              ("NVIDIA-H100-80GB-HBM3", 8, "81559", "9", "0"), (None, 0, "", "", "")]
    items = []
    for i in range(nodes):
        product, gpus, mem, major, minor = shapes[i % len(shapes)]
        gpu_labels = (f"""
      nvidia.com/gpu.present: "true"
      nvidia.com/gpu.product: {product}
      nvidia.com/gpu.count: "{gpus}"
      nvidia.com/gpu.memory: "{mem}"
      nvidia.com/gpu.compute.major: "{major}"
      nvidia.com/gpu.compute.minor: "{minor}\"""" if product else "")
        taints = "\n    taints:\n    - {effect: NoSchedule, key: nvidia.com/gpu, value: present}" if product else ""
        gpu_res = f'\n      nvidia.com/gpu: "{gpus}"' if product else ""
        items.append(f"""- apiVersion: v1
  kind: Node
  metadata:
    name: node-{i:05d}
    labels:
      kubernetes.io/hostname: node-{i:05d}
      kubernetes.io/os: linux
      kubernetes.io/arch: amd64
      topology.kubernetes.io/zone: zone-{i % 3}{gpu_labels}
  spec:
    providerID: aws:///zone/i-{i:017x}{taints}
  status:
    allocatable:
      cpu: 47810m
      memory: 186646292Ki
      pods: "110"{gpu_res}
    capacity:
      cpu: "48"
      memory: 195924924Ki
      pods: "110"{gpu_res}
    conditions:
    - {{type: MemoryPressure, status: "False", reason: KubeletHasSufficientMemory}}
    - {{type: Ready, status: "True", reason: KubeletReady}}""")
    return "apiVersion: v1\nkind: List\nitems:\n" + "\n".join(items) + "\n"


def test_a_10000_node_cluster_file_plans(capsys, tmp_path):
    from llama_operator.loading import _load_documents

    # benchmarks/bench_cli_load.py times it; here it only has to work (and not take minutes).
    f = tmp_path / "nodes.yaml"
    f.write_text(cluster_file(10_000))
    code, out, _ = run(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", f)
    assert code == 0 and "(10000 nodes)" in out
    # `kubectl get nodes -o json` (JSON is YAML; read by json)
    g = tmp_path / "nodes.json"
    g.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": _load_documents(str(f), 2**30)}))
    code, out, _ = run(capsys, "plan", "-f", EX / "chat.yaml", "--cluster", g, "-o", "json")
    assert code == 0 and json.loads(out)["chosen"]
