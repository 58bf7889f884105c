"""One replica over several nodes (issue 14): what the renderer writes for a plan with nodesPerReplica > 1.

The plans are written by hand (the planner that makes them is issue 14's other half): Llama 3.1 405B in
bf16 on two nodes of eight H100s, vLLM 0.34.0. The LeaderWorkerSet is checked against LeaderWorkerSet's own
CRD (tests/vendor/lws, v0.10.0) with jsonschema, since kubernetes-validate has no schema for a custom
resource, and its leader and worker pod templates as core/v1 Pods with kubernetes-validate --strict and the
Pod Security Standard "restricted", like every other pod the operator renders (test_render.py).
"""
from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
from kit.crd_schema import crd_validator, map_key_problems
from kit.paths import ROOT
from kit.pod_security import violations as restricted_violations
from llama_operator.api import API_VERSION, KIND
from llama_operator.catalog import load_catalog
from llama_operator.engines import rejected_arguments, release
from llama_operator.ownership import GROUP_NAME_MAX, HASH_ANNOTATION, LABEL_DEPLOYMENT, group_name
from llama_operator.render import Owner, render
from llama_operator.render.multinode import LWS_NAME_LABEL, LWS_WORKER_INDEX_LABEL

#: The longest StatefulSet name whose pods' controller-revision-hash label (`<statefulset>-<10>`) fits 63.
STATEFULSET_NAME_MAX = 63 - 1 - 10
from llama_operator.status import ChosenPlan

LWS_CRD = ROOT / "tests" / "vendor" / "lws" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
K8S_VERSIONS = ("1.29", "1.34")
OWNER = Owner(name="chat", namespace="team-a", uid="6f1c2a9e-0b3d-4e21-9c1a-2f5d8e7b1a00")
SELECTOR = {LABEL_DEPLOYMENT: "chat", "app.kubernetes.io/managed-by": "llama-operator"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MODEL = "llama-3.1-405b-instruct"
REL = release("vllm-0.34.0")


def plan(nodes: int = 2, gpus: int = 8, **overrides) -> ChosenPlan:
    """405B bf16 over `nodes` nodes of `gpus` H100s, as the planner would write it (predictions made up)."""
    repo = load_catalog().model(MODEL).vllm_repos["bf16"]
    fields = {"model": MODEL, "quantization": "bf16", "runtime": "vllm", "engine": "vllm-0.34.0", "kernel": "bf16",
              "gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpusPerReplica": gpus, "nodesPerReplica": nodes,
              "weightsSource": repo, "gpuMemoryUtilization": 0.92,
              "predicted": {"memoryBytes": 1100 * 2**30, "perGpuBytes": 70 * 2**30, "ttftSeconds": 1.2,
                            "tpotSeconds": 0.06}}
    return ChosenPlan(**{**fields, **overrides})


@pytest.fixture
def spec405(make_spec):
    def build(**overrides):
        return make_spec(**{"model": MODEL, "memoryBudget": "2Ti", **overrides})
    return build


def kinds(objects: list[dict]) -> list[str]:
    return [o["kind"] for o in objects]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def templates(lws: dict) -> dict[str, dict]:
    lwt = lws["spec"]["leaderWorkerTemplate"]
    return {"leader": lwt["leaderTemplate"], "worker": lwt["workerTemplate"]}


def container(template: dict) -> dict:
    (c,) = template["spec"]["containers"]
    return c


def as_pod(template: dict) -> dict:
    """A pod template as the Pod the LeaderWorkerSet's StatefulSets would create from it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**copy.deepcopy(template["metadata"]), "name": "chat-group-0", "namespace": "team-a"},
            "spec": copy.deepcopy(template["spec"])}


@pytest.fixture
def rendered(spec405):
    return render(OWNER, spec405(), plan())


# --- the objects -------------------------------------------------------------------------------------------

def test_a_multinode_plan_renders_a_leaderworkerset_instead_of_a_deployment(rendered):
    assert kinds(rendered) == ["LeaderWorkerSet", "Service"]
    lws = rendered[0]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    meta = lws["metadata"]
    # Not the LlamaDeployment's name: the LeaderWorkerSet's headless Service takes the LeaderWorkerSet's.
    assert meta["name"] == "chat-group" != rendered[1]["metadata"]["name"] == "chat"
    assert meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [{"apiVersion": API_VERSION, "kind": KIND, "name": "chat", "uid": OWNER.uid,
                                        "controller": True, "blockOwnerDeletion": True}]
    assert SELECTOR.items() <= meta["labels"].items()
    assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"][HASH_ANNOTATION])
    spec = lws["spec"]
    assert spec["replicas"] == 1
    assert spec["startupPolicy"] == "LeaderCreated"  # LeaderReady would deadlock: the leader needs the workers
    assert spec["rolloutStrategy"] == {"type": "RollingUpdate",
                                       "rollingUpdateConfiguration": {"maxSurge": 1, "maxUnavailable": 0}}
    lwt = spec["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_replicas_are_groups(spec405):
    objs = render(OWNER, spec405(replicas=3), plan(nodes=4, gpus=4))
    lws = one(objs, "LeaderWorkerSet")
    assert lws["spec"]["replicas"] == 3 and lws["spec"]["leaderWorkerTemplate"]["size"] == 4


def test_a_one_node_plan_renders_a_deployment_as_before(spec405, make_spec):
    objs = render(OWNER, spec405(), plan(nodes=1))
    assert kinds(objs) == ["Deployment", "Service"]
    args = container(objs[0]["spec"]["template"])["args"]
    assert not {"--nnodes", "--node-rank", "--master-addr", "--headless", "--pipeline-parallel-size"} & set(args)
    assert objs[1]["spec"]["selector"] == SELECTOR
    # nodesPerReplica left out (a status written before the field) renders the same, hash and all.
    fields = plan(nodes=1).model_dump(exclude={"nodesPerReplica"})
    assert render(OWNER, spec405(), ChosenPlan(**fields)) == objs


def test_llamacpp_is_never_rendered_over_several_nodes(make_spec):
    gguf = ChosenPlan(model="llama-3.1-8b-instruct", quantization="q4_k_m", runtime="llamacpp",
                      engine="llamacpp-b11434", gpuProduct="NVIDIA-L4", gpusPerReplica=1, nodesPerReplica=2,
                      weightsSource="", predicted={"memoryBytes": 6 * 2**30, "ttftSeconds": 1, "tpotSeconds": 0.05})
    with pytest.raises(ValueError, match="several nodes"):
        render(OWNER, make_spec(runtime="llamacpp"), gguf)


# --- the command lines ---------------------------------------------------------------------------------------

def test_leader_and_worker_command_lines(spec405, rendered):
    """The one-node command line, plus pipeline parallelism over the group's nodes with the rank and the
    leader's address from LeaderWorkerSet's variables; the workers headless, without the API's flags."""
    t = templates(rendered[0])
    leader, worker = container(t["leader"])["args"], container(t["worker"])["args"]
    single = container(render(OWNER, spec405(), plan(nodes=1))[0]["spec"]["template"])["args"]
    flags = REL.multi_node.flags
    distributed = [flags["pipelineParallel"], "2", flags["executorBackend"], "mp", flags["nnodes"], "2",
                   flags["nodeRank"], "$(LWS_WORKER_INDEX)", flags["masterAddr"], "$(LWS_LEADER_ADDRESS)",
                   flags["masterPort"], "29501"]
    tp = single.index("--tensor-parallel-size") + 2
    assert leader == single[:tp] + distributed + single[tp:]
    api = ["--host", "0.0.0.0", "--port", "8000"]
    start = single.index("--host")
    assert single[start:start + 4] == api
    without_api = single[:start] + single[start + 4:]
    tp = without_api.index("--tensor-parallel-size") + 2
    assert worker == without_api[:tp] + distributed + ["--headless"] + without_api[tp:]
    # TP = the GPUs of a node, PP = the nodes (engines.yaml multiNode.layout).
    for args in (leader, worker):
        assert args[args.index("--tensor-parallel-size") + 1] == "8"
        assert args[args.index("--pipeline-parallel-size") + 1] == "2"
        assert args[0] == "meta-llama/Llama-3.1-405B-Instruct"


@pytest.mark.parametrize("overrides", [
    {},
    {"replicas": 2, "contextLength": 32768, "kvCacheDtype": "fp8"},
    {"adapters": [{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 16},
                  {"name": "sql", "source": "pvc://loras/sql", "rank": 8}]},
])
def test_every_leader_and_worker_command_line_is_one_the_release_accepts(spec405, overrides):
    kv = overrides.pop("kvCacheDtype", "auto")
    lws = one(render(OWNER, spec405(**overrides), plan(kvCacheDtype=kv)), "LeaderWorkerSet")
    for role, t in templates(lws).items():
        assert rejected_arguments(REL, container(t)["args"]) == [], role


# --- the pods -------------------------------------------------------------------------------------------------

def test_every_pod_of_the_group_holds_its_nodes_gpus_and_shared_memory(rendered):
    for role, t in templates(rendered[0]).items():
        c = container(t)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], role
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in t["spec"]["volumes"]
        assert {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]


def test_one_gpu_per_node_still_gets_shared_memory(spec405):
    """The multiprocessing executor's message queue is shared memory even with one GPU worker per node."""
    lws = one(render(OWNER, spec405(), plan(nodes=2, gpus=1)), "LeaderWorkerSet")
    for t in templates(lws).values():
        assert any(v["name"] == "dshm" for v in t["spec"]["volumes"])


def test_the_leader_serves_and_is_probed_the_workers_are_not(rendered):
    t = templates(rendered[0])
    leader, worker = container(t["leader"]), container(t["worker"])
    assert leader["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                               {"name": "dist", "containerPort": 29501, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert leader[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert probe not in worker  # a headless worker serves no HTTP
    assert "ports" not in worker


def _but_distributed(c: dict) -> dict:
    return {k: v for k, v in c.items() if k not in {"args", "env", "ports", "startupProbe", "readinessProbe",
                                                     "livenessProbe"}}


def test_the_group_pods_are_the_one_node_pod_but_for_the_distributed_parts(spec405):
    """One container definition (render/_vllm.j2): scheduling, hardening, volumes, resources and the cache are
    the one-node Deployment's; only the arguments, VLLM_HOST_IP, the leader's port and the probes differ."""
    objs = render(OWNER, spec405(source={"hfTokenSecretRef": {"name": "hf"}}), plan())
    single = render(OWNER, spec405(source={"hfTokenSecretRef": {"name": "hf"}}), plan(nodes=1))
    pod = single[0]["spec"]["template"]
    for role, t in templates(one(objs, "LeaderWorkerSet")).items():
        if role == "leader":
            assert t["metadata"] == pod["metadata"]
        else:  # the workers' labels lack managed-by: the Service does not select them (the next tests)
            assert t["metadata"]["labels"] == {k: v for k, v in pod["metadata"]["labels"].items()
                                               if k != "app.kubernetes.io/managed-by"}
        assert {k: v for k, v in t["spec"].items() if k != "containers"} == \
            {k: v for k, v in pod["spec"].items() if k != "containers"}
        assert _but_distributed(container(t)) == _but_distributed(container(pod)), role
        assert [e for e in container(t)["env"] if e["name"] != "VLLM_HOST_IP"] == container(pod)["env"]


def test_placement_and_hardening_reach_both_templates(spec405):
    spec = spec405(placement={"nodeSelector": {"pool": "h100"},
                              "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                                               "effect": "NoSchedule"}]})
    lws = one(render(OWNER, spec, plan()), "LeaderWorkerSet")
    for t in templates(lws).values():
        pod = t["spec"]
        assert pod["nodeSelector"] == {"pool": "h100"}
        assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in pod["tolerations"]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert "NVIDIA-H100-80GB-HBM3" in term["matchExpressions"][0]["values"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsUser"] == 2000
        assert restricted_violations(pod) == []


def test_hub_sources_are_fetched_in_every_pod(spec405):
    """Every node loads the model: each pod runs the fetch init container (a marker per source on a shared
    claim: only the first fetches)."""
    spec = spec405(adapters=[{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 16}],
                   source={"cache": {"size": "2Ti"}})
    lws = one(render(OWNER, spec, plan()), "LeaderWorkerSet")
    for t in templates(lws).values():
        (init,) = t["spec"]["initContainers"]
        assert init["name"] == "fetch-sources" and "acme/support-lora" in init["command"]
        assert restricted_violations(t["spec"]) == []


# --- the Service, the claim, the NetworkPolicy -------------------------------------------------------------------

def test_the_service_sends_requests_to_the_leaders_only(rendered):
    """The Service selects as for a Deployment; the leaders carry the whole selector, the workers (no API) do
    not. So while one kind replaces the other, the ready pods of both serve, and a worker never gets a request."""
    svc = one(rendered, "Service")
    assert svc["metadata"]["name"] == "chat"
    assert svc["spec"]["selector"] == SELECTOR
    t = templates(rendered[0])
    assert SELECTOR.items() <= t["leader"]["metadata"]["labels"].items()
    assert not SELECTOR.items() <= t["worker"]["metadata"]["labels"].items()
    assert t["worker"]["metadata"]["labels"][LABEL_DEPLOYMENT] == "chat"  # whose GPUs they hold
    assert LWS_WORKER_INDEX_LABEL not in t["leader"]["metadata"]["labels"]


@pytest.mark.parametrize("replicas, nodes, mode", [(1, 2, "ReadWriteMany"), (2, 2, "ReadWriteMany"),
                                                    (1, 1, "ReadWriteOnce"), (2, 1, "ReadWriteMany")])
def test_the_cache_claim_is_read_write_many_when_several_pods_mount_it(spec405, replicas, nodes, mode):
    objs = render(OWNER, spec405(replicas=replicas, source={"cache": {"size": "2Ti"}}), plan(nodes=nodes))
    claim = one(objs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == [mode]
    workload = objs[0]
    pods = templates(workload).values() if nodes > 1 else [workload["spec"]["template"]]
    for t in pods:
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "chat-model-cache"}} in t["spec"]["volumes"]


def test_the_network_policy_admits_the_clients_and_the_group_to_itself(spec405):
    spec = spec405(access={"allowedClients": [{"podLabels": {"app": "chat-ui"}}]})
    objs = render(OWNER, spec, plan())
    assert kinds(objs) == ["LeaderWorkerSet", "Service", "NetworkPolicy"]
    policy = one(objs, "NetworkPolicy")["spec"]
    # every pod of the LlamaDeployment: leaders, workers (no managed-by label) and a Deployment's it replaces
    assert policy["podSelector"] == {"matchLabels": {LABEL_DEPLOYMENT: "chat"}}
    for t in templates(one(objs, "LeaderWorkerSet")).values():
        assert t["metadata"]["labels"][LABEL_DEPLOYMENT] == "chat"
    clients, group = policy["ingress"]
    assert clients == {"from": [{"podSelector": {"matchLabels": {"app": "chat-ui"}}}],
                       "ports": [{"port": 8000, "protocol": "TCP"}]}
    # The rendezvous, the engine's message queues and NCCL: every TCP port, from the same group's pods.
    assert group == {"from": [{"podSelector": {"matchLabels": {LWS_NAME_LABEL: "chat-group"}}}],
                     "ports": [{"protocol": "TCP"}]}


# --- names ----------------------------------------------------------------------------------------------------

LONG_NAMES = ["a" * 63, "a" * 40, "a" * 39, "m" + "-x" * 31, "llama-3-1-405b-instruct-for-the-support-team-in-emea-prod-01",
              "a23456789-123456789-123456789-123456789-123456789-123456789-12b"]


@pytest.mark.parametrize("name", LONG_NAMES + ["chat"])
def test_group_names_keep_every_pod_hostname_and_statefulset_within_bounds(name):
    assert len(name) <= 63 and DNS_1035.match(name)
    lws = group_name(name)
    assert DNS_1035.match(lws) and len(lws) <= GROUP_NAME_MAX == 45
    biggest_group, biggest_worker = 999_999, 9_999  # LeaderWorkerSet allows 1000000 replicas
    leader_sts, worker_sts = lws, f"{lws}-{biggest_group}"
    for sts in (leader_sts, worker_sts):
        # controller-revision-hash = <statefulset>-<10 characters> must be a label value
        assert len(sts) <= STATEFULSET_NAME_MAX == 52 and len(f"{sts}-0123456789") <= 63
    for pod in (f"{lws}-{biggest_group}", f"{lws}-{biggest_group}-{biggest_worker}"):
        assert len(pod) <= 63 and DNS_1035.match(pod)
    if len(name) <= 39:
        assert lws == f"{name}-group"
    else:
        assert lws.startswith(name[:20]) and lws.endswith("-group")


def test_long_names_that_share_a_prefix_get_different_groups():
    names = {group_name("a" * 40 + suffix) for suffix in ("", "b", "c", "-d", "e" * 23)}
    assert len(names) == 5


@pytest.mark.parametrize("name", ["a" * 63, "chat"])
def test_the_rendered_group_is_named_for_its_own_owner_even_from_the_cache(spec405, name):
    spec = spec405(access={"allowedClients": [{}]})
    render(OWNER, spec, plan())  # the shape is cached with a stand-in owner ...
    objs = render(Owner(name=name, namespace="team-b", uid="u-2"), spec, plan())  # ... and filled for this one
    lws = one(objs, "LeaderWorkerSet")
    assert lws["metadata"]["name"] == group_name(name)
    group_rule = one(objs, "NetworkPolicy")["spec"]["ingress"][1]
    assert group_rule["from"][0]["podSelector"]["matchLabels"] == {LWS_NAME_LABEL: group_name(name)}
    assert one(objs, "Service")["spec"]["selector"][LABEL_DEPLOYMENT] == name


# --- validation ------------------------------------------------------------------------------------------------

MATRIX = {
    "plain": ({}, {}),
    "everything": ({"replicas": 2, "source": {"cache": {"size": "2Ti"}, "hfTokenSecretRef": {"name": "hf"}},
                    "access": {"apiKeySecretRef": {"name": "key"}, "allowedClients": [{}]},
                    "adapters": [{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 16},
                                 {"name": "sql", "source": "pvc://loras/sql", "rank": 8}],
                    "placement": {"nodeSelector": {"pool": "h100"}}},
                   {"kvCacheDtype": "fp8"}),
    "four-nodes-of-four": ({}, {"nodes": 4, "gpus": 4}),
}


@pytest.fixture(params=list(MATRIX))
def matrix_objects(request, spec405):
    overrides, plan_overrides = MATRIX[request.param]
    return render(OWNER, spec405(**copy.deepcopy(overrides)), plan(**plan_overrides))


def test_kubernetes_validate_has_no_schema_for_a_leaderworkerset(rendered):
    """Why the LeaderWorkerSet is checked against its CRD here: kubernetes-validate knows built-in kinds only."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(rendered[0], "1.34", strict=True)


def test_every_leaderworkerset_validates_against_its_crd(matrix_objects):
    lws = one(matrix_objects, "LeaderWorkerSet")
    validator = crd_validator(LWS_CRD)
    errors = [f"{e.message} at {list(e.path)}" for e in validator.iter_errors(lws)]
    assert errors == []
    assert map_key_problems(LWS_CRD, lws) == []


@pytest.mark.parametrize("breakage", [
    "misspelt spec field", "misspelt container field", "unknown startup policy", "size as text",
    "a fraction for maxSurge", "duplicate container ports"])
def test_the_crd_validation_has_teeth(rendered, breakage):
    broken = copy.deepcopy(rendered[0])
    spec = broken["spec"]
    leader = spec["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    if breakage == "misspelt spec field":
        spec["startupPolicyy"] = spec.pop("startupPolicy")
    elif breakage == "misspelt container field":
        spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["argz"] = ["--headless"]
    elif breakage == "unknown startup policy":
        spec["startupPolicy"] = "LeaderStarted"
    elif breakage == "size as text":
        spec["leaderWorkerTemplate"]["size"] = "2"
    elif breakage == "a fraction for maxSurge":
        spec["rolloutStrategy"]["rollingUpdateConfiguration"]["maxSurge"] = 0.5
    else:
        leader["ports"].append(dict(leader["ports"][1]))
        assert map_key_problems(LWS_CRD, broken)
        return
    assert list(crd_validator(LWS_CRD).iter_errors(broken))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_leader_and_worker_pods_and_the_other_objects_validate_strictly(matrix_objects, version):
    lws = one(matrix_objects, "LeaderWorkerSet")
    # The LeaderWorkerSet's own metadata is ObjectMeta, which its CRD leaves unchecked: checked on a ConfigMap.
    checked = [as_pod(t) for t in templates(lws).values()] + \
        [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": lws["metadata"]}] + \
        [o for o in matrix_objects if o is not lws]
    for obj in checked:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} does not validate for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_the_pod_validation_has_teeth(rendered):
    pod = as_pod(templates(rendered[0])["worker"])
    pod["spec"]["containers"][0]["argz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.34", strict=True)


def test_leader_and_worker_pods_pass_restricted(matrix_objects):
    lws = one(matrix_objects, "LeaderWorkerSet")
    for role, t in templates(lws).items():
        assert restricted_violations(t["spec"]) == [], role
