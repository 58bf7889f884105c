"""The operator end to end against the API emulator: kopf in a thread (kit.operator.OperatorThread), a
simulated scheduler/kubelet that binds pods and reports Deployment status, Nodes from examples/clusters.

What a user of the operator sees: the Deployment and Service it renders for each runtime, the
LlamaDeployment's status and Events, re-planning on spec and cluster changes (with the upgrade delay
for better plans, at once when the hardware in force is lost), Unschedulable with reasons, clean-up
on delete, and restarts that neither duplicate nor rewrite anything.
"""
from __future__ import annotations

import time
from datetime import timedelta

import pytest

from llama_operator import planner
from llama_operator.api import API_VERSION, KIND, parse_spec
from llama_operator.inventory import Inventory
from llama_operator.catalog import load_catalog
from llama_operator.engines import release_for
from llama_operator.ownership import HASH_ANNOTATION
from llama_operator.render import Owner, render
from llama_operator.state import Settings

from kit.examples import cluster_nodes, example
from kit.nodes import node_manifest
from kit.poll import holds_for, wait_until

# Real threads and sockets: never fast-forward time here.
pytestmark = pytest.mark.looptime(False)

FAST = Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=30)
ALL_PHASES_SETTLED = ("Ready", "Unschedulable", "Invalid")


def only(items: list[dict], what: str) -> dict:
    assert len(items) == 1, f"expected exactly one {what}, got {[i['metadata']['name'] for i in items]}"
    return items[0]


def owned_by(obj: dict, ld: dict) -> bool:
    return obj["metadata"].get("ownerReferences") == [{
        "apiVersion": API_VERSION, "kind": KIND, "name": ld["metadata"]["name"], "uid": ld["metadata"]["uid"],
        "controller": True, "blockOwnerDeletion": True}]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def arg(deployment: dict, flag: str) -> str:
    args = container(deployment)["args"]
    return args[args.index(flag) + 1]


def gpu_product_affinity(deployment: dict) -> list[str]:
    terms = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return [v for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/gpu.product"
            for v in e.get("values", [])]


# --- create: the right workload for each runtime -------------------------------------------------------

_TEXT_MODEL = load_catalog().model("llama-3.1-8b-instruct")
_VLLM, _LLAMACPP = release_for(_TEXT_MODEL, "vllm"), release_for(_TEXT_MODEL, "llamacpp")
RUNTIME_CASES = {
    # example, cluster, spec overrides -> runtime, image, GPU product (None: CPU), container port
    "llamacpp-cpu": ("tiny-cpu.yaml", "cpu-only", {}, "llamacpp", _LLAMACPP.images["cpu"], None, 8080),
    "vllm-gpu": ("chat.yaml", "mixed", {}, "vllm", _VLLM.images["cuda"], "NVIDIA-L40S", 8000),
    "llamacpp-cuda": ("chat.yaml", "mixed", {"runtime": "llamacpp", "fallback": {"allowCPU": False}},
                      "llamacpp", _LLAMACPP.images["cuda"], "NVIDIA-L40S", 8080),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_create_renders_the_planned_runtime_and_becomes_ready(case, llama_cluster, run_operator, kubelet):
    file, nodes, overrides, runtime, image, gpu, port = RUNTIME_CASES[case]
    llama_cluster.add_nodes(nodes)
    run_operator(FAST)
    manifest = example(file)
    name = manifest["metadata"]["name"]
    ld = llama_cluster.create(manifest, **overrides)

    st = llama_cluster.wait_phase(name, "Ready")
    assert st["runtime"] == runtime and st["plan"]["runtime"] == runtime
    assert st["variant"] == f"{st['plan']['model']}/{st['plan']['quantization']}"
    assert st["plan"].get("gpuProduct") == gpu
    assert st["ready"] == "1/1" and st["readyReplicas"] == 1 and st["replicas"] == 1
    assert st["endpoint"] == f"http://{name}.default.svc:{port}/v1"
    assert st["observedGeneration"] == 1
    conditions = {c["type"]: c for c in st["conditions"]}
    assert set(conditions) == {"Ready", "PlanFeasible", "FallbackApplied", "Progressing"}
    assert conditions["Ready"]["status"] == "True" and conditions["PlanFeasible"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False"

    dep = only(llama_cluster.deployments(), "Deployment")
    svc = only(llama_cluster.services(), "Service")
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == name
    assert owned_by(dep, ld) and owned_by(svc, ld)
    c = container(dep)
    assert c["image"] == image
    assert c["ports"][0]["containerPort"] == port and svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    if runtime == "vllm":
        assert container(dep)["args"][0] == st["plan"]["weightsSource"]  # vllm serve MODEL
        assert arg(dep, "--max-model-len") == str(manifest["spec"]["contextLength"])
    else:
        assert arg(dep, "--hf-file") in st["plan"]["weightsSource"]
        assert arg(dep, "--n-gpu-layers") == ("0" if gpu is None else "999")
    if gpu is None:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    else:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(st["plan"]["gpusPerReplica"])
        assert gpu in gpu_product_affinity(dep)
    # The simulated scheduler placed the pod where the affinity allows.
    pod = only(llama_cluster.managed_pods(name), "pod")
    node = llama_cluster.nodes.get(name=pod["spec"]["nodeName"]).to_dict()
    assert node["metadata"]["labels"].get("nvidia.com/gpu.product") == gpu

    assert llama_cluster.reasons(name)[:1] == ["Planned"]
    wait_until(lambda: "Ready" in llama_cluster.reasons(name), 10, "the Ready event")


def test_a_small_model_on_the_mixed_cluster_gets_scheduled(llama_cluster, run_operator, kubelet):
    llama_cluster.add_nodes("mixed")
    run_operator(FAST)
    llama_cluster.create(example("chat.yaml"), name="small", model="llama-3.2-1b-instruct")
    st = llama_cluster.wait_status("small", lambda s: s.get("plan"), 10, "a plan")
    assert st["plan"]["gpuProduct"] == "Tesla-T4"
    wait_until(lambda: llama_cluster.managed_pods("small"), 10, "the pod")
    bound = lambda: all(p["spec"].get("nodeName") for p in llama_cluster.managed_pods("small"))  # noqa: E731
    wait_until(bound, 3, "the simulated scheduler to bind the pod")
    llama_cluster.wait_phase("small", "Ready", timeout=5)


def test_kubectl_get_shows_the_llamadeployment_and_its_workload(llama_cluster, run_operator, kubelet, kubectl):
    llama_cluster.add_nodes("mixed")
    run_operator(FAST)
    llama_cluster.create(example("chat.yaml"))
    llama_cluster.wait_phase("chat", "Ready")

    names = kubectl("get", "deployments,services", "-o", "name").stdout.split()
    assert names == ["deployment.apps/chat", "service/chat"]
    columns = kubectl("get", "llamad", "chat", "-o",
                      "jsonpath={.status.phase} {.status.variant} {.status.runtime} {.status.ready}").stdout
    assert columns == "Ready llama-3.1-8b-instruct/bf16 vllm 1/1"
    image = kubectl("get", "deployment", "chat", "-o", "jsonpath={.spec.template.spec.containers[0].image}").stdout
    assert image == _VLLM.images["cuda"]
    port = kubectl("get", "service", "chat", "-o", "jsonpath={.spec.ports[0].port}").stdout
    assert port == "8000"


# --- spec changes ---------------------------------------------------------------------------------------

def test_spec_change_replans_and_patches_the_same_deployment(llama_cluster, run_operator, kubelet):
    llama_cluster.add_nodes("mixed")
    run_operator(FAST)
    llama_cluster.create(example("chat.yaml"))
    llama_cluster.wait_phase("chat", "Ready")
    dep = llama_cluster.deployment("chat")
    uid = dep["metadata"]["uid"]
    assert arg(dep, "--max-model-len") == "8192"

    # A longer context, same variant: the Deployment's arguments change in place.
    llama_cluster.patch_spec("chat", {"contextLength": 16384})
    llama_cluster.wait_status("chat", lambda s: s.get("observedGeneration") == 2 and s.get("phase") == "Ready",
                              20, "generation 2 to be Ready")
    dep = wait_until(lambda: (d := llama_cluster.deployment("chat")) and arg(d, "--max-model-len") == "16384" and d,
                     10, "--max-model-len 16384")
    assert dep["metadata"]["uid"] == uid

    # Another model: re-planned at once, onto another runtime, still the same Deployment and Service.
    llama_cluster.patch_spec("chat", {"model": "llama-3.2-3b-instruct"})
    st = llama_cluster.wait_status("chat", lambda s: s.get("observedGeneration") == 3 and s.get("phase") == "Ready",
                                   20, "generation 3 to be Ready")
    assert st["variant"].startswith("llama-3.2-3b-instruct/") and st["runtime"] == "llamacpp"
    assert st["endpoint"] == "http://chat.default.svc:8080/v1"
    dep = only(llama_cluster.deployments(), "Deployment")
    svc = only(llama_cluster.services(), "Service")
    assert dep["metadata"]["uid"] == uid
    assert "Llama-3.2-3B" in arg(dep, "--hf-repo")
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])
    assert "Replanned" in llama_cluster.reasons("chat")
    # The old revision's pods are gone; the new one serves.
    pods = wait_until(lambda: (p := llama_cluster.managed_pods("chat")) and len(p) == 1 and p, 10, "one pod")
    assert pods[0]["metadata"]["labels"]["llama-operator.dev/runtime"] == "llamacpp"


# --- cluster changes -----------------------------------------------------------------------------------

def test_a_node_added_upgrades_after_the_delay(llama_cluster, run_operator, kubelet):
    delay = 2.0
    llama_cluster.add_nodes("mixed")
    run_operator(Settings(upgrade_delay=timedelta(seconds=delay), resync_seconds=30))
    llama_cluster.create(example("70b-tight-tpot.yaml"))
    st = llama_cluster.wait_phase("assistant-70b", "Ready")
    assert st["variant"] == "llama-3.3-70b-instruct/awq-int4" and st["plan"]["gpuProduct"] == "NVIDIA-A10G"
    assert st["fallback"]["inForce"]
    # kubectl describe: the Event of the first plan says it is a fallback, and why.
    planned = llama_cluster.events("assistant-70b", "Planned")
    assert len(planned) == 1 and "awq-int4" in planned[0]["message"]
    why = st["fallback"]["reason"].split(" because ", 1)[1]  # the rungs above and why each failed
    assert planned[0]["message"].endswith(f", a fallback because {why}")

    added = time.monotonic()
    llama_cluster.add_nodes("h100-8x")
    pending = llama_cluster.wait_status("assistant-70b", lambda s: s.get("pendingChange"), 10, "a pending change")
    assert pending["pendingChange"]["plan"]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"
    assert pending["variant"] == "llama-3.3-70b-instruct/awq-int4"  # still serving the old plan meanwhile
    assert pending["phase"] == "Ready"
    assert "UpgradePending" in llama_cluster.reasons("assistant-70b")
    assert "NVIDIA-A10G" in gpu_product_affinity(llama_cluster.deployment("assistant-70b"))

    st = llama_cluster.wait_status("assistant-70b", lambda s: s.get("variant") == "llama-3.3-70b-instruct/bf16",
                                   delay + 15, "the upgrade to bf16")
    assert time.monotonic() - added >= delay  # hysteresis: not before the capacity was stable for the delay
    assert st["plan"]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3" and st.get("pendingChange") is None
    wait_until(lambda: "Upgraded" in llama_cluster.reasons("assistant-70b"), 10, "the Upgraded event")
    dep = only(llama_cluster.deployments(), "Deployment")
    assert "NVIDIA-H100-80GB-HBM3" in gpu_product_affinity(dep)
    assert container(dep)["args"][0] == "meta-llama/Llama-3.3-70B-Instruct"
    assert "--quantization" not in container(dep)["args"]
    assert arg(dep, "--tensor-parallel-size") == str(st["plan"]["gpusPerReplica"])
    st = llama_cluster.wait_phase("assistant-70b", "Ready")
    assert not st["fallback"]["inForce"]


def test_a_node_removed_downgrades_at_once(llama_cluster, run_operator, kubelet):
    llama_cluster.add_nodes("mixed")
    h100 = llama_cluster.add_nodes("h100-8x")
    # A long upgrade delay: moving off lost hardware must not wait for it.
    run_operator(Settings(upgrade_delay=timedelta(seconds=120), resync_seconds=30))
    llama_cluster.create(example("70b-tight-tpot.yaml"))
    st = llama_cluster.wait_phase("assistant-70b", "Ready")
    assert st["variant"] == "llama-3.3-70b-instruct/bf16" and st["plan"]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"

    llama_cluster.remove_nodes(h100)
    st = llama_cluster.wait_status("assistant-70b", lambda s: s.get("variant") == "llama-3.3-70b-instruct/awq-int4",
                                   15, "the move to AWQ on A10G")
    assert st["plan"]["gpuProduct"] == "NVIDIA-A10G" and st.get("pendingChange") is None
    replanned = llama_cluster.events("assistant-70b", "Replanned")
    assert replanned and replanned[-1]["type"] == "Warning"
    assert "no longer fits" in replanned[-1]["message"] and "a fallback because " in replanned[-1]["message"]
    # Not stuck: the new pods are scheduled on the A10G node and the deployment serves again.
    st = llama_cluster.wait_phase("assistant-70b", "Ready", timeout=15)
    assert st["fallback"]["inForce"]
    pod = only(llama_cluster.managed_pods("assistant-70b"), "pod")
    assert pod["spec"]["nodeName"] == "ip-10-1-30-9.us-east-1.compute.internal"  # the 4x A10G node


def test_no_feasible_plan_is_unschedulable_with_reasons_and_one_warning(llama_cluster, run_operator):
    llama_cluster.add_nodes("h100-8x")
    run_operator(Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=0.5))  # resync often: no spam
    llama_cluster.create(example("impossible.yaml"))
    st = llama_cluster.wait_phase("impossible", "Unschedulable")
    assert "memory budget 16.0 GiB" in st["message"]
    assert st["rejected"] and all(r["reasons"] for r in st["rejected"])
    feasible = next(c for c in st["conditions"] if c["type"] == "PlanFeasible")
    assert feasible["status"] == "False" and feasible["reason"] == "NoFeasiblePlan"
    assert st.get("plan") is None and llama_cluster.deployments() == [] and llama_cluster.services() == []

    warning = wait_until(lambda: llama_cluster.events("impossible", "Unschedulable"), 10, "the Unschedulable event")
    assert warning[0]["type"] == "Warning" and "No feasible plan" in warning[0]["message"]
    # Several resyncs later: still one event, the status not rewritten.
    rv = llama_cluster.get("impossible")["metadata"]["resourceVersion"]
    holds_for(lambda: len(llama_cluster.events("impossible")) == 1, 2.0, "a single event")
    assert llama_cluster.get("impossible")["metadata"]["resourceVersion"] == rv


# --- delete --------------------------------------------------------------------------------------------------

def test_delete_removes_the_workload_and_the_metrics(llama_cluster, run_operator, kubelet):
    llama_cluster.add_nodes("mixed")
    op = run_operator(FAST)
    state = op.state_holder[0]
    llama_cluster.create(example("chat.yaml"), source={"cache": {"size": "100Gi"}})
    llama_cluster.create(example("tiny-cpu.yaml"), name="other")
    llama_cluster.wait_phase("chat", "Ready")
    llama_cluster.wait_phase("other", "Ready")
    assert sorted(d["metadata"]["name"] for d in llama_cluster.deployments()) == ["chat", "other"]
    assert [p["metadata"]["name"] for p in llama_cluster.pvcs()] == ["chat-model-cache"]
    assert ("default", "chat") in set(state.metrics.deployments())
    assert 'llamadeployment="chat"' in state.metrics.render()

    llama_cluster.delete("chat")
    wait_until(lambda: llama_cluster.get("chat") is None, 15, "the LlamaDeployment to go (finalizer released)")
    wait_until(lambda: [d["metadata"]["name"] for d in llama_cluster.deployments()] == ["other"], 10,
               "the Deployment to be garbage-collected")
    assert [s["metadata"]["name"] for s in llama_cluster.services()] == ["other"]
    assert llama_cluster.pvcs() == []
    wait_until(lambda: llama_cluster.managed_pods("chat") == [], 10, "the pods to go")
    wait_until(lambda: ("default", "chat") not in set(state.metrics.deployments()), 10, "the metrics to be dropped")
    holds_for(lambda: 'llamadeployment="chat"' not in state.metrics.render(), 1.0, "no series of chat")
    assert ("default", "other") in set(state.metrics.deployments())  # the other one is untouched
    assert llama_cluster.status("other")["phase"] == "Ready"


# --- restarts ------------------------------------------------------------------------------------------------

def _writes(emulator_thread, since: int) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in list(emulator_thread.emulator)[since:]
            if r.method not in ("GET", "HEAD", "OPTIONS")]


def test_restart_creates_nothing_new_for_a_converged_deployment(llama_cluster, run_operator, kubelet,
                                                               emulator_thread):
    llama_cluster.add_nodes("mixed")
    first = run_operator(FAST)
    llama_cluster.create(example("chat.yaml"))
    llama_cluster.create(example("tiny-cpu.yaml"))
    llama_cluster.wait_phase("chat", "Ready")
    llama_cluster.wait_phase("tiny", "Ready")
    kubelet.stop()  # from here on, every write is the operator's
    first.stop()
    before = {n: llama_cluster.get(n)["metadata"]["resourceVersion"] for n in ("chat", "tiny")}
    deployments = {d["metadata"]["name"]: d["metadata"]["resourceVersion"] for d in llama_cluster.deployments()}
    events = len(llama_cluster.events("chat")) + len(llama_cluster.events("tiny"))
    mark = len(list(emulator_thread.emulator))

    rv = emulator_thread.emulator.resource_version

    second = run_operator(FAST)
    state = second.state_holder[0]
    wait_until(lambda: {("default", "chat"), ("default", "tiny")} <= set(state.metrics.deployments()), 15,
               "the restarted operator to reconcile both")
    # Nothing at all changes in the cluster: no object created, modified or deleted, no Event.
    holds_for(lambda: emulator_thread.emulator.resource_version == rv, 1.5, "the cluster unchanged")
    assert not [w for w in _writes(emulator_thread, mark) if not w.endswith("/status")]
    assert {d["metadata"]["name"]: d["metadata"]["resourceVersion"] for d in llama_cluster.deployments()} == deployments
    assert sorted(s["metadata"]["name"] for s in llama_cluster.services()) == ["chat", "tiny"]
    assert {n: llama_cluster.get(n)["metadata"]["resourceVersion"] for n in ("chat", "tiny")} == before
    assert len(llama_cluster.events("chat")) + len(llama_cluster.events("tiny")) == events


def test_restart_sends_no_status_patch_for_a_converged_deployment(llama_cluster, run_operator, emulator_thread):
    llama_cluster.add_nodes("mixed")
    first = run_operator(FAST)
    llama_cluster.create(example("chat.yaml"))
    llama_cluster.wait_phase("chat", "Pending")
    first.stop()
    mark = len(list(emulator_thread.emulator))
    state = run_operator(FAST).state_holder[0]
    wait_until(lambda: ("default", "chat") in set(state.metrics.deployments()), 15, "the restarted operator's pass")
    assert _writes(emulator_thread, mark) == []


def test_restart_in_the_middle_of_a_reconcile(llama_cluster, run_operator, kubelet):
    """The operator created the workload and died before writing status: the next one adopts it."""
    nodes = llama_cluster.add_nodes("mixed")
    manifest = example("chat.yaml")
    ld = llama_cluster.create(manifest)
    # What the first operator had written: the rendered plan, no status.
    spec = parse_spec(manifest["spec"])
    inventory = Inventory.from_manifests(cluster_nodes("mixed.yaml"), [])
    assert len(nodes) == len(inventory.nodes)
    plan = planner.plan(spec, inventory).chosen.to_chosen_plan()
    for obj in render(Owner(name="chat", namespace="default", uid=ld["metadata"]["uid"]), spec, plan):
        llama_cluster.api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(
            body=obj, namespace="default")
    assert llama_cluster.status("chat") == {}
    dep_uid = llama_cluster.deployment("chat")["metadata"]["uid"]
    wanted_hash = llama_cluster.deployment("chat")["metadata"]["annotations"][HASH_ANNOTATION]

    run_operator(FAST)
    st = llama_cluster.wait_phase("chat", "Ready")
    assert st["variant"] == plan.variant and st["observedGeneration"] == 1
    dep = only(llama_cluster.deployments(), "Deployment")
    only(llama_cluster.services(), "Service")
    assert dep["metadata"]["uid"] == dep_uid  # adopted, not re-created
    assert dep["metadata"]["annotations"][HASH_ANNOTATION] == wanted_hash  # and not rewritten
    assert len(llama_cluster.managed_pods("chat")) == 1


def test_restart_right_after_the_workload_was_created(llama_cluster, run_operator, kubelet):
    """Stopping as soon as the Deployment appears, wherever the first operator was, converges to one."""
    llama_cluster.add_nodes("mixed")
    first = run_operator(FAST)
    llama_cluster.create(example("chat.yaml"))
    wait_until(lambda: llama_cluster.deployment("chat"), 10, "the Deployment")
    first.stop()
    run_operator(FAST)
    st = llama_cluster.wait_phase("chat", "Ready")
    assert st["variant"] == "llama-3.1-8b-instruct/bf16"
    only(llama_cluster.deployments(), "Deployment")
    only(llama_cluster.services(), "Service")
    holds_for(lambda: llama_cluster.reasons("chat").count("Planned") <= 2, 0.5, "no repeated planning")


# --- what a new deployment costs the API server ---------------------------------------------------------

def test_a_new_deployment_costs_one_write_of_each_and_no_reads(llama_cluster, run_operator, emulator_thread):
    """Creating a LlamaDeployment: one create of its Deployment and Service, one Planned Event and one
    status write, and nothing read back (the operator watches what it owns). Its own writes, and the
    watch events they cause, do not set off another pass that writes again."""
    llama_cluster.add_nodes("mixed")
    run_operator(Settings(upgrade_delay=timedelta(seconds=1), resync_seconds=300))
    emulator = emulator_thread.emulator
    first = len(emulator._requests)
    llama_cluster.create(example("70b-tight-tpot.yaml"))  # a fallback: its Event says so
    wait_until(lambda: llama_cluster.status("assistant-70b").get("phase")
               and llama_cluster.deployment("assistant-70b"), 15, "the first pass")

    def operator_requests() -> list[str]:
        return [f"{getattr(r.method, 'value', r.method)} {r.url.path}"
                for r in list(emulator._requests)[first:] if (r.headers or {}).get("User-Agent") == "llama-operator"]

    holds_for(lambda: len(operator_requests()) <= 4, 2.0, "no further writes")  # no kubelet: nothing changes
    made = sorted(operator_requests())
    assert made == sorted([
        "POST /apis/apps/v1/namespaces/default/deployments",
        "POST /api/v1/namespaces/default/services",
        "POST /api/v1/namespaces/default/events",
        "PATCH /apis/llama-operator.dev/v1alpha1/namespaces/default/llamadeployments/assistant-70b/status",
    ]), made
    assert [e["reason"] for e in llama_cluster.events("assistant-70b")] == ["Planned"]


# --- competing deployments ---------------------------------------------------------------------------------

L40S = dict(product="NVIDIA-L40S", gpus=1, memory_mib=46068, compute="8.9", cpu="16", memory="64Gi")
L4 = dict(product="NVIDIA-L4", gpus=1, memory_mib=23034, compute="8.9", cpu="16", memory="64Gi")


def _assert_apart(llama_cluster, names: tuple[str, str]) -> dict[str, dict]:
    statuses = {n: llama_cluster.status(n) for n in names}
    on_l40s = [n for n, s in statuses.items() if (s.get("plan") or {}).get("gpuProduct") == "NVIDIA-L40S"]
    assert len(on_l40s) == 1, f"the single L40S was promised to {on_l40s}: {statuses}"
    other = statuses[next(n for n in names if n not in on_l40s)]
    assert other["phase"] == "Unschedulable" or other["plan"]["gpuProduct"] != "NVIDIA-L40S"
    return statuses


def _wait_both_planned(llama_cluster) -> None:
    def settled() -> bool:
        return all(llama_cluster.status(n).get("plan") or llama_cluster.status(n).get("phase") == "Unschedulable"
                   for n in ("first", "second"))
    wait_until(settled, 15, "both to be planned")


def test_two_deployments_are_not_planned_onto_the_same_gpu(llama_cluster, run_operator):
    """No kubelet: no pod ever holds the GPU, so only the operator's promises keep the two apart."""
    llama_cluster.add_nodes([node_manifest("l40s-1", **L40S), node_manifest("l4-1", **L4)])
    run_operator(FAST)
    manifest = example("chat.yaml")  # prefers the L40S (bf16); on an L4 only FP8 fits
    llama_cluster.create(manifest, name="first")
    st = llama_cluster.wait_status("first", lambda s: s.get("plan"), 10, "first to be planned")
    assert st["plan"]["gpuProduct"] == "NVIDIA-L40S"
    llama_cluster.create(manifest, name="second")
    _wait_both_planned(llama_cluster)
    holds_for(lambda: _assert_apart(llama_cluster, ("first", "second")), 2.0, "the two apart")
    statuses = _assert_apart(llama_cluster, ("first", "second"))
    assert statuses["first"]["plan"]["gpuProduct"] == "NVIDIA-L40S"  # the first keeps what it was promised
    assert statuses["second"]["plan"]["gpuProduct"] == "NVIDIA-L4"
    assert statuses["second"]["variant"] == "llama-3.1-8b-instruct/fp8"
    assert statuses["second"]["fallback"]["inForce"]
    products = sorted(gpu_product_affinity(d)[0] for d in llama_cluster.deployments())
    assert products == ["NVIDIA-L4", "NVIDIA-L40S"]
    assert llama_cluster.reasons("first") == ["Planned"]  # never bounced


def test_two_deployments_planned_at_the_same_time_settle_apart(llama_cluster, run_operator):
    llama_cluster.add_nodes([node_manifest("l40s-1", **L40S), node_manifest("l4-1", **L4)])
    manifest = example("chat.yaml")
    llama_cluster.create(manifest, name="first")
    llama_cluster.create(manifest, name="second")
    run_operator(FAST)  # both daemons start together and plan concurrently
    _wait_both_planned(llama_cluster)
    wait_until(lambda: _apart(llama_cluster), 5, "the two to settle apart")
    holds_for(lambda: _apart(llama_cluster), 2.0, "the two apart")
    replans = sum(llama_cluster.reasons(n).count("Replanned") for n in ("first", "second"))
    assert replans <= 1, f"{replans} Replanned events: the deployments bounce between the GPUs"


def _apart(llama_cluster) -> bool:
    try:
        _assert_apart(llama_cluster, ("first", "second"))
        return True
    except AssertionError:
        return False


def test_a_toleration_of_everything_does_not_reach_control_plane_nodes(llama_cluster, run_operator, kubelet):
    # The only L40S sits on a control-plane node; the spec tolerates every taint. The operator does not let
    # LlamaDeployments tolerate control-plane taints: it plans on the worker's L4, and the pods it renders
    # spell the key-less toleration out over the other taints only.
    control = node_manifest("cp", **L40S)
    control["spec"]["taints"].append({"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"})
    llama_cluster.add_nodes([control, node_manifest("worker", **L4)])
    run_operator(FAST)
    manifest = example("chat.yaml")
    llama_cluster.create(manifest, placement={"tolerations": [{"operator": "Exists"}]},
                         slo={"ttftP95": "10s", "tpotP95": "1s"}, memoryBudget="48Gi", contextLength=4096)
    st = llama_cluster.wait_phase("chat", "Ready")
    assert st["plan"]["gpuProduct"] == "NVIDIA-L4"
    assert any("node-role.kubernetes.io/control-plane" in n for n in st["notes"])
    tolerations = only(llama_cluster.deployments(), "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert all(t.get("key") for t in tolerations)  # no key-less toleration reaches the pod
    assert not any(t["key"] == "node-role.kubernetes.io/control-plane" for t in tolerations)


# --- access.allowedClients ----------------------------------------------------------------------------------

def _policy(llama_cluster, name: str) -> dict | None:
    return llama_cluster.read("networking.k8s.io/v1", "NetworkPolicy", name)


def test_removing_allowed_clients_deletes_the_network_policy_it_made_and_no_other(llama_cluster, run_operator,
                                                                                     kubelet):
    """A NetworkPolicy left behind would go on admitting only the clients once listed, where the spec now lets
    every client in. A policy of the same name that this LlamaDeployment does not control is someone else's."""
    llama_cluster.add_nodes("mixed")
    run_operator(FAST)
    chat = example("chat.yaml")
    chat["spec"]["access"] = {"allowedClients": [{"podLabels": {"app": "gateway"}}]}
    llama_cluster.create(chat)
    llama_cluster.wait_phase("chat", "Ready")
    policy = wait_until(lambda: _policy(llama_cluster, "chat"), 10, "the NetworkPolicy")
    ld = llama_cluster.get("chat")
    assert owned_by(policy, ld)

    llama_cluster.patch_spec("chat", {"access": None})
    llama_cluster.wait_status("chat", lambda s: s.get("observedGeneration") == 2 and s.get("phase") == "Ready",
                              20, "generation 2 to be Ready")
    wait_until(lambda: _policy(llama_cluster, "chat") is None, 10, "the NetworkPolicy to be deleted")
    assert llama_cluster.deployment("chat") is not None  # the model keeps serving

    # Someone's own policy carrying the operator's labels, under the name of a deployment without clients.
    foreign = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "tiny", "namespace": "default",
                            "labels": {"app.kubernetes.io/managed-by": "llama-operator",
                                       "llama-operator.dev/llamadeployment": "tiny"}},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    llama_cluster.resource("networking.k8s.io/v1", "NetworkPolicy").create(body=foreign, namespace="default")
    llama_cluster.create(example("tiny-cpu.yaml"))
    llama_cluster.wait_phase("tiny", "Ready")
    holds_for(lambda: _policy(llama_cluster, "tiny") is not None, 3.0, "someone else's policy kept")
