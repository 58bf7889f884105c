"""A replica spanning nodes (issue 14): vLLM tensor parallel inside a node, pipeline parallel across nodes,
offered only when no one node holds the variant and only with LeaderWorkerSet; its estimate
(pipeline.py), the planner's choice (multinode.py), and how plans, status and the CLI show it."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from llama_operator.api import parse_spec
from llama_operator.catalog import load_catalog
from llama_operator.cli import main
from llama_operator.estimate import Hardware, Workload, estimate
from llama_operator.inventory import LEADERWORKERSET_CRD, Inventory, has_leaderworkerset_crd
from llama_operator.loading import load_cluster_file
from llama_operator.multinode import LLAMACPP_NO_SPAN
from llama_operator.pipeline import PipelineEstimate, estimate_pipeline, hop_seconds
from llama_operator.placement import build_pools, reserve_plan
from llama_operator.planner import check_choice, plan, rank

from kit.paths import CLUSTERS, EXAMPLES, ROOT

H100 = "NVIDIA-H100-80GB-HBM3"
NETWORK_LABEL = "llama-operator.dev/network-gbps"
PAIR = CLUSTERS / "h100-8x-pair.yaml"


def spec_405b(**overrides):
    spec = {
        "model": "llama-3.1-405b-instruct",
        "memoryBudget": "1600Gi",
        "contextLength": 8192,
        "slo": {"ttftP95": "10s", "tpotP95": "200ms"},
        "fallback": {"allowQuantization": False, "allowSmallerModels": False},
        # the example pair's nodes are the sandbox's multi-node pool (examples/clusters/h100-8x-pair.yaml)
        "placement": {"tolerations": [{"key": "sandbox.llama-operator.dev/multinode", "operator": "Exists",
                                       "effect": "NoSchedule"}]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return parse_spec(spec)


def h100_nodes(make_node, count: int, labels: dict | None = None) -> list[dict]:
    return [make_node(f"h{i}", H100, 8, cpu="192", memory="2000Gi", labels=labels) for i in range(count)]


def pair(make_node, *, lws: bool = True, labels: dict | None = None) -> Inventory:
    return Inventory.from_manifests(h100_nodes(make_node, 2, labels), leaderworkerset=lws)


# --- The "done when" ----------------------------------------------------------------------------


def test_405b_bf16_spans_two_h100_nodes_with_leaderworkerset():
    inventory, _ = load_cluster_file(str(PAIR))  # its LeaderWorkerSet CRD marks LeaderWorkerSet installed
    assert inventory.leaderworkerset
    p = plan(spec_405b(), inventory)
    assert p.feasible and not p.fallback
    c = p.chosen
    assert (c.quant.id, c.runtime, c.gpus_per_replica, c.nodes_per_replica) == ("bf16", "vllm", 8, 2)
    assert c.hardware == f"2 nodes x 8x {H100}"
    chosen = p.to_dict()["chosen"]
    assert chosen["nodesPerReplica"] == 2 and chosen["gpusPerReplica"] == 8
    status = c.to_chosen_plan()
    assert status.nodesPerReplica == 2 and status.gpusPerReplica == 8
    assert status.predicted.startupSeconds and status.predicted.startupSeconds > 3600  # 756 GiB at 35 MB/s
    # each GPU holds its 1/16 of the weights, under the H100's usable memory
    assert c.estimate.per_gpu_bytes < 0.95 * load_catalog().find_gpu(H100).memory_bytes


def test_without_leaderworkerset_the_plan_says_so(make_node):
    p = plan(spec_405b(), pair(make_node, lws=False))
    assert not p.feasible
    assert "LeaderWorkerSet (leaderworkerset.x-k8s.io) is not installed" in p.fallback_reason
    assert "https://lws.sigs.k8s.io" in p.fallback_reason and "kubectl apply --server-side" in p.fallback_reason
    spanning = [c for c in p.candidates if c.nodes_per_replica > 1]
    assert len(spanning) == 1 and spanning[0].estimate is not None  # still estimated, honestly
    assert spanning[0].reasons[0].startswith("LeaderWorkerSet")
    assert not spanning[0].reasons[0].startswith("needs ")  # (memory reasons start so: the KV-cache rung test)
    assert "one replica needs 2 nodes of 8x" in spanning[0].reasons[0]


def test_the_same_file_without_the_crd_has_no_leaderworkerset(tmp_path):
    doc = yaml.safe_load(PAIR.read_text())
    doc["items"] = [d for d in doc["items"] if d["kind"] == "Node"]
    path = tmp_path / "pair-no-lws.yaml"
    path.write_text(yaml.safe_dump(doc))
    inventory, count = load_cluster_file(str(path))
    assert count == 2 and not inventory.leaderworkerset
    assert not plan(spec_405b(), inventory).feasible


def test_a_budget_bf16_cannot_meet_leaves_fp8_on_one_node(make_node):
    p = plan(spec_405b(memoryBudget="800Gi", fallback={"allowQuantization": True}), pair(make_node))
    assert p.feasible
    assert (p.chosen.quant.id, p.chosen.nodes_per_replica, p.chosen.gpus_per_replica) == ("fp8", 1, 8)
    assert p.to_dict()["chosen"]["nodesPerReplica"] == 1


def test_the_ladder_order_decides_across_rungs(make_node):
    # Quantization allowed and bf16 within the budget: bf16 on two nodes is the ladder's first rung, and wins.
    p = plan(spec_405b(fallback={"allowQuantization": True}), pair(make_node))
    assert (p.chosen.quant.id, p.chosen.nodes_per_replica) == ("bf16", 2)


def test_one_node_with_leaderworkerset_is_not_enough(make_node):
    inventory = Inventory.from_manifests(h100_nodes(make_node, 1), leaderworkerset=True)
    p = plan(spec_405b(), inventory)
    assert not p.feasible
    spanning = [c for c in p.candidates if c.nodes_per_replica == 2]
    assert spanning and not spanning[0].feasible
    assert any("need 2 nodes each with 8 free" in r and "only 1 such node(s) are free" in r
               for r in spanning[0].reasons)
    assert not any("LeaderWorkerSet" in r for r in spanning[0].reasons)


def test_busy_gpus_count_against_the_nodes(make_node, make_pod):
    nodes = h100_nodes(make_node, 2)
    inventory = Inventory.from_manifests(nodes, [make_pod("h1", gpus=1)], leaderworkerset=True)
    p = plan(spec_405b(), inventory)
    assert not p.feasible
    spanning = [c for c in p.candidates if c.nodes_per_replica == 2]
    assert any("only 1 such node(s) are free" in r for r in spanning[0].reasons)


def test_without_leaderworkerset_a_cluster_too_small_anyway_says_nothing_of_it(make_node):
    p = plan(spec_405b(), Inventory.from_manifests(h100_nodes(make_node, 1)))
    assert not p.feasible
    assert "LeaderWorkerSet" not in p.fallback_reason
    assert all(c.nodes_per_replica == 1 for c in p.candidates)


def test_one_node_is_preferred_whenever_it_holds_the_variant(make_node):
    # 70B bf16 fits one 8x H100 node: never split, with LeaderWorkerSet and two nodes free.
    spec = parse_spec({"model": "llama-3.3-70b-instruct", "memoryBudget": "400Gi",
                       "slo": {"ttftP95": "10s", "tpotP95": "1s"}})
    p = plan(spec, pair(make_node))
    assert p.chosen.nodes_per_replica == 1
    assert all(c.nodes_per_replica == 1 for c in p.candidates)


# --- The estimate ----------------------------------------------------------------------------------------


def _variant(quant="bf16"):
    catalog = load_catalog()
    return catalog.model("llama-3.1-405b-instruct"), catalog.quantizations[quant]


def test_per_gpu_memory_halves_across_two_nodes():
    model, quant = _variant()
    hw = Hardware(gpu=load_catalog().find_gpu(H100), gpu_count=8)
    work = Workload(context_length=8192, concurrency=4)
    one = estimate_pipeline(model, quant, hw, work, 1, 25.0)
    two = estimate_pipeline(model, quant, hw, work, 2, 25.0)
    overhead = one.overhead_bytes / 8  # per GPU, the same on either (TP 8 inside a node)
    assert two.overhead_bytes == pytest.approx(overhead * 16, abs=16)
    held = one.weights_bytes + one.kv_cache_bytes
    assert (two.per_gpu_bytes - overhead) * 2 == pytest.approx(one.per_gpu_bytes - overhead, abs=4)
    assert two.total_bytes == held + two.overhead_bytes  # every GPU's overhead counts
    assert two.weights_bytes == one.weights_bytes and two.kv_cache_bytes == one.kv_cache_bytes
    # on one node the pipeline estimate is the ordinary one
    plain = estimate(model, quant, hw, work)
    assert (one.per_gpu_bytes, one.total_bytes, one.tpot_seconds) == \
        (plain.per_gpu_bytes, plain.total_bytes, plain.tpot_seconds)


def test_tpot_grows_by_the_hop_and_ttft_by_the_prompts_hop():
    model, quant = _variant()
    hw = Hardware(gpu=load_catalog().find_gpu(H100), gpu_count=8)
    work = Workload(context_length=8192, concurrency=4, prompt_tokens=1024)
    one = estimate(model, quant, hw, work)
    for nodes in (2, 3):
        e = estimate_pipeline(model, quant, hw, work, nodes, 25.0)
        assert isinstance(e, PipelineEstimate) and e.nodes == nodes
        assert e.hop_seconds == pytest.approx(hop_seconds(model, 4, 25.0))
        assert e.tpot_seconds == pytest.approx(one.tpot_seconds + (nodes - 1) * e.hop_seconds)
        assert e.ttft_seconds == pytest.approx(one.ttft_seconds + (nodes - 1) * hop_seconds(model, 4 * 1024, 25.0))
    # a hop: the fixed latency plus 2 tensors x hidden x 2 bytes per sequence at the bandwidth
    net = load_catalog().network
    assert hop_seconds(model, 4, 25.0) == pytest.approx(
        net.hop_latency_seconds + 2 * model.arch.hidden_size * 2 * 4 * 8 / 25e9)


def test_a_slower_network_label_makes_tpot_larger(make_node):
    fast = plan(spec_405b(), pair(make_node, labels={NETWORK_LABEL: "400"}))
    default = plan(spec_405b(), pair(make_node))
    slow = plan(spec_405b(), pair(make_node, labels={NETWORK_LABEL: "1"}))
    tpots = [p.chosen.estimate.tpot_seconds for p in (fast, default, slow)]
    assert tpots[0] < tpots[1] < tpots[2]
    assert [p.chosen.estimate.network_gbps for p in (fast, default, slow)] == [400, 25, 1]


def test_a_pool_takes_its_slowest_nodes_network(make_node):
    nodes = [make_node("a", H100, 8, labels={NETWORK_LABEL: "400"}),
             make_node("b", H100, 8, labels={NETWORK_LABEL: "100"}),
             make_node("c", H100, 8, labels={NETWORK_LABEL: "garbage"}),  # ignored: the default
             make_node("d", H100, 8, labels={NETWORK_LABEL: "-3"})]  # likewise
    pools, _ = build_pools(spec_405b(), Inventory.from_manifests(nodes[:2]))
    assert [p.network_gbps for p in pools] == [100]
    pools, _ = build_pools(spec_405b(), Inventory.from_manifests(nodes[2:]))
    assert [p.network_gbps for p in pools] == [load_catalog().network.bandwidth_gbps]


# --- Engines that never span nodes ----------------------------------------------------------------------


def test_llamacpp_never_spans_nodes(make_node):
    spec = spec_405b(runtime="llamacpp")
    p = plan(spec, pair(make_node))
    assert not p.feasible
    assert all(c.nodes_per_replica == 1 for c in p.candidates)
    assert any(LLAMACPP_NO_SPAN in c.reasons for c in p.candidates)
    assert "rpc-server is a proof of concept without authentication upstream" in LLAMACPP_NO_SPAN


def test_the_vision_release_is_not_offered_across_nodes(make_node):
    spec = parse_spec({"model": "llama-3.2-90b-vision-instruct", "memoryBudget": "800Gi", "runtime": "vllm",
                       "slo": {"ttftP95": "30s", "tpotP95": "2s"},
                       "fallback": {"allowQuantization": False, "allowSmallerModels": False}})
    nodes = [make_node(f"a{i}", "NVIDIA-A100-SXM4-80GB", 2, cpu="64", memory="500Gi") for i in range(4)]
    p = plan(spec, Inventory.from_manifests(nodes, leaderworkerset=True))
    assert not p.feasible
    assert all(c.nodes_per_replica == 1 for c in p.candidates)
    assert any("vllm-0.10.2 is not offered across nodes" in r for c in p.candidates for r in c.reasons)


# --- Plans in force, JSON and the CLI ---------------------------------------------------------------------


def test_an_ordinary_plan_has_one_node_per_replica(make_node):
    spec = parse_spec({"model": "llama-3.1-8b-instruct", "memoryBudget": "100Gi",
                       "slo": {"ttftP95": "10s", "tpotP95": "1s"}})
    p = plan(spec, Inventory.from_manifests([make_node("l4", "NVIDIA-L4", 1)]))
    d = p.to_dict()
    assert d["chosen"]["nodesPerReplica"] == 1
    assert all(c["nodesPerReplica"] == 1 for c in d["candidates"])
    status = p.chosen.to_chosen_plan()
    assert status.nodesPerReplica == 1 and status.predicted.startupSeconds is None
    assert "startupSeconds" not in d["chosen"]["predicted"]
    json.dumps(d)


def test_check_choice_of_a_plan_spanning_nodes(make_node):
    spec = spec_405b()
    chosen = plan(spec, pair(make_node)).chosen.to_chosen_plan()
    assert check_choice(spec, pair(make_node), chosen) == []
    lost = check_choice(spec, pair(make_node, lws=False), chosen)
    assert lost and lost[0].startswith("LeaderWorkerSet")
    one = Inventory.from_manifests(h100_nodes(make_node, 1), leaderworkerset=True)
    assert any("need 2 nodes each" in r for r in check_choice(spec, one, chosen))


def test_rank_puts_several_nodes_after_one_of_the_same_variant(make_node):
    spec = spec_405b(fallback={"allowQuantization": True})
    two = plan(spec, pair(make_node)).chosen.to_chosen_plan()
    one = two.model_copy(update={"nodesPerReplica": 1})
    assert rank(spec, one) < rank(spec, two)
    fp8 = plan(spec_405b(memoryBudget="800Gi", fallback={"allowQuantization": True}),
               pair(make_node)).chosen.to_chosen_plan()
    assert rank(spec, two) < rank(spec, fp8)  # across rungs the ladder decides: bf16 before fp8


def test_cost_puts_one_node_first_within_a_rung(make_node):
    p = plan(spec_405b(), pair(make_node))
    c = p.chosen
    single = copy.copy(c)
    single.nodes_per_replica = 1
    assert single.cost_key() < c.cost_key()


def test_the_leaderworkerset_crd_is_recognised_by_name():
    vendored = list(yaml.safe_load_all((ROOT / "tests" / "vendor" / "lws" /
                                        "leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text()))
    assert has_leaderworkerset_crd(vendored)
    assert not has_leaderworkerset_crd([{"kind": "CustomResourceDefinition", "metadata": {"name": "x.example"}},
                                        {"kind": "Node", "metadata": {"name": LEADERWORKERSET_CRD}}, None, "x"])
    assert Inventory.from_manifests([], leaderworkerset=True).release([]).leaderworkerset  # copies keep it


def test_plan_cli_on_the_example(capsys, tmp_path):
    code = main(["plan", "-f", str(EXAMPLES / "multinode-405b.yaml"), "--cluster", str(PAIR)])
    out = capsys.readouterr().out
    assert code == 0
    chosen = next(line for line in out.splitlines() if line.strip().startswith("Chosen"))
    assert f"2 nodes x 8x {H100}" in chosen and "pipeline parallel 2" in chosen
    assert "startup" in out and "Gbit/s" in out
    code = main(["plan", "-f", str(EXAMPLES / "multinode-405b.yaml"), "--cluster", str(PAIR), "-o", "json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["chosen"]["nodesPerReplica"] == 2 and d["chosen"]["gpusPerReplica"] == 8
    # the example's SLO holds with the prediction (its comment says so)
    assert d["chosen"]["predicted"]["tpotSeconds"] < 0.1 and d["chosen"]["predicted"]["ttftSeconds"] < 5
    one = yaml.safe_load(PAIR.read_text())
    one["items"] = [i for i in one["items"] if i["metadata"]["name"] != one["items"][1]["metadata"]["name"]]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    code = main(["plan", "-f", str(EXAMPLES / "multinode-405b.yaml"), "--cluster", str(tmp_path / "one.yaml"),
                 "-o", "json"])
    d = json.loads(capsys.readouterr().out)  # one node: FP8 there, a Deployment (the sandbox's story)
    assert code == 0 and d["chosen"]["quantization"] == "fp8" and d["chosen"]["nodesPerReplica"] == 1


def test_a_variant_some_node_holds_never_spans_nodes(make_node, make_pod):
    """Spanning is for what no node holds: 8B bf16 fits one L40S, so it never spans two L4 nodes, even while
    the L40S is taken (it falls to FP8 on an L4 instead)."""
    nodes = [make_node("l40s", "NVIDIA-L40S", 1), make_node("l4-a", "NVIDIA-L4", 1), make_node("l4-b", "NVIDIA-L4", 1)]
    # at 4 concurrent 8K contexts bf16 needs 22.7 GiB per GPU: more than an L4 holds, less than an L40S
    spec = parse_spec({"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "10s", "tpotP95": "1s", "concurrency": 4},
                       "memoryBudget": "200Gi", "runtime": "vllm"})
    busy = make_pod("l40s", gpus=1, name="someone-else")
    p = plan(spec, Inventory.from_manifests(nodes, [busy], leaderworkerset=True))
    assert p.chosen is not None and p.chosen.nodes_per_replica == 1 and p.chosen.quant.id == "fp8"
    assert all(c.nodes_per_replica == 1 for c in p.candidates)
    # without the L40S no node holds it: the two L4 nodes are one replica
    p = plan(spec, Inventory.from_manifests(nodes[1:], leaderworkerset=True))
    assert p.chosen is not None and p.chosen.nodes_per_replica == 2 and p.chosen.quant.id == "bf16"


def test_a_plan_spanning_nodes_reserves_every_node_it_takes(make_node):
    spec = spec_405b()
    chosen = plan(spec, pair(make_node)).chosen.to_chosen_plan()
    four = Inventory.from_manifests(h100_nodes(make_node, 4), leaderworkerset=True)
    taken = reserve_plan(four, spec, chosen, 1)
    assert sorted(taken.free[n][0] for n in taken.nodes) == [0, 0, 8, 8]
    assert plan(spec, taken).chosen.nodes_per_replica == 2  # another such deployment still fits
    assert not plan(spec, reserve_plan(taken, spec, chosen, 1)).feasible


def test_a_replica_spanning_nodes_still_counts_as_a_memory_failure_for_the_kv_rungs(make_node):
    # 8B bf16 with two 128k contexts on 1x L40S nodes: one node cannot hold the cache (32 GiB); without
    # LeaderWorkerSet the line is the 2-node candidate, and the 8-bit KV cache rungs are tried all the same.
    spec = parse_spec({"model": "llama-3.1-8b-instruct", "memoryBudget": "100Gi", "runtime": "vllm",
                       "contextLength": 131072, "slo": {"ttftP95": "60s", "tpotP95": "1s", "concurrency": 2},
                       "fallback": {"quantizations": ["bf16"], "allowSmallerModels": False}})
    nodes = [make_node(f"l{i}", "NVIDIA-L40S", 1) for i in range(2)]
    p = plan(spec, Inventory.from_manifests(nodes))
    assert p.candidates[0].nodes_per_replica == 2 and not p.candidates[0].feasible
    assert p.feasible and p.chosen.kv_cache_dtype == "fp8" and p.chosen.nodes_per_replica == 1
