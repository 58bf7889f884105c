"""What the operator writes into the cluster for a plan: llama_operator.render.

Every case plans on a small cluster with the real planner (so the plan is one the operator would
choose), renders it, and checks what a user would see with `kubectl get deploy,svc,pvc,netpol -o yaml`:
the objects, their labels and selectors, owner references, the model server's command line, GPU
resources and placement, the HF token reference, probes and ports; that the content-hash annotation
only changes when the plan does; and that every manifest passes `kubernetes-validate --strict` for
Kubernetes 1.29 and 1.34 (the Python API for each manifest, and the CLI once over all of them).

Hardening (docs/security.md): every pod against the Pod Security Standard "restricted", rule by rule,
with the checker (kit/pod_security.py) the chart tests apply to the operator's own pod: the pods of
releases whose image runs as non-root break no rule, those that need root break only the non-root one.
The user, the read-only root and the API key's variable come from catalog/engines.yaml, each fact cited.
"""
from __future__ import annotations

import json

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from llama_operator import planner
from llama_operator.catalog import CATALOG_DIR, load_catalog
from llama_operator.engines import rejected_arguments, release, releases
from llama_operator.api import API_VERSION, KIND, LlamaDeploymentSpec
from llama_operator.status import ChosenPlan
from llama_operator.ownership import HASH_ANNOTATION, LABEL_DEPLOYMENT, LABEL_RUNTIME, content_hash, endpoint
from llama_operator.render import MODEL_SERVER_UID, Images, Owner, render

from kit.pod_security import violations as restricted_violations

K8S_VERSIONS = ("1.29", "1.34")
OWNER = Owner(name="chat", namespace="team-a", uid="6f1c2a9e-0b3d-4e21-9c1a-2f5d8e7b1a00")
SELECTOR = {LABEL_DEPLOYMENT: "chat", "app.kubernetes.io/managed-by": "llama-operator"}
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass
class Case:
    spec: LlamaDeploymentSpec
    plan: ChosenPlan
    objects: list[dict]

    def kind(self, kind: str) -> dict:
        found = [o for o in self.objects if o["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {[o['kind'] for o in self.objects]}"
        return found[0]

    @property
    def deployment(self) -> dict:
        return self.kind("Deployment")

    @property
    def service(self) -> dict:
        return self.kind("Service")

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        containers = self.pod["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def args(self) -> list[str]:
        return self.container["args"]

    def arg(self, flag: str) -> str:
        args = self.args
        assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
        return args[args.index(flag) + 1]


# name -> (spec overrides, nodes as make_node keyword arguments)
CASES: dict[str, tuple[dict, list[dict]]] = {
    "vllm-tp2": (
        {"model": "llama-3.3-70b-instruct", "memoryBudget": "400Gi"},
        [dict(name="a100", product="NVIDIA-A100-SXM4-80GB", gpus=8, cpu="96", memory="1024Gi")],
    ),
    "vllm-tp1": ({}, [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "vllm-awq": (  # a quantized checkpoint vLLM must be told about (Marlin kernels on Ampere and newer)
        {"model": "llama-3.3-70b-instruct", "memoryBudget": "320Gi", "contextLength": 16384,
         "slo": {"ttftP95": "5s", "tpotP95": "30ms", "promptTokens": 1024, "concurrency": 4}},
        [dict(name="a10g", product="NVIDIA-A10G", gpus=4, cpu="48", memory="192Gi")],
    ),
    "vllm-fp8": (  # an FP8 checkpoint carries its own quantization config: no --quantization flag
        {"model": "llama-3.2-11b-vision-instruct", "memoryBudget": "24Gi",
         "slo": {"ttftP95": "1500ms", "tpotP95": "50ms", "promptTokens": 1024, "concurrency": 4}},
        [dict(name="l4", product="NVIDIA-L4", gpus=1, cpu="8", memory="32Gi")],
    ),
    "vllm-kv8": (
        {"contextLength": 65536, "slo": {"concurrency": 4},
         "fallback": {"allowSmallerModels": False, "quantizations": ["bf16", "f16"]}},
        [dict(name="l40s", product="NVIDIA-L40S", gpus=1)],
    ),
    "llamacpp-cuda": ({"runtime": "llamacpp", "slo": {"concurrency": 2}},
                      [dict(name="l4", product="NVIDIA-L4", gpus=1, cpu="8", memory="32Gi")]),
    "llamacpp-cuda-kv8": (
        {"runtime": "llamacpp", "contextLength": 65536, "slo": {"concurrency": 4},
         "fallback": {"allowSmallerModels": False, "quantizations": ["f16"]}},
        [dict(name="l40s", product="NVIDIA-L40S", gpus=1)],
    ),
    "llamacpp-cpu": ({"model": "llama-3.2-1b-instruct", "contextLength": 4096, "slo": {"concurrency": 3}},
                     [dict(name="cpu-1", cpu="32", memory="128Gi")]),
    "hf-token": ({"source": {"hfTokenSecretRef": {"name": "hf-token", "key": "token"}}},
                 [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "cache-pvc": ({"replicas": 2, "source": {"cache": {"size": "200Gi", "storageClassName": "fast-ssd"}}},
                  [dict(name="l40s-1", product="NVIDIA-L40S", gpus=1), dict(name="l40s-2", product="NVIDIA-L40S", gpus=1)]),
    "cache-existing": ({"source": {"cache": {"existingClaim": "shared-models", "size": "200Gi"}}},
                       [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "llamacpp-cpu-cache-pvc": ({"model": "llama-3.2-1b-instruct", "runtime": "llamacpp",
                                "source": {"cache": {"size": "20Gi"}}},
                               [dict(name="cpu-1", cpu="32", memory="128Gi")]),
    "vllm-access": ({"access": {"apiKeySecretRef": {"name": "chat-api-key"},
                                "allowedClients": [{"podLabels": {"app": "chat-ui"}},
                                                   {"podLabels": {"app.kubernetes.io/name": "prometheus"},
                                                    "namespaceLabels": {"kubernetes.io/metadata.name": "monitoring"}}]}},
                    [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "llamacpp-access": ({"model": "llama-3.2-1b-instruct", "runtime": "llamacpp",
                         "access": {"apiKeySecretRef": {"name": "keys", "key": "llama"},
                                    "allowedClients": [{}, {"podLabels": {"role": "scraper"}, "namespaceLabels": {}}]}},
                        [dict(name="cpu-1", cpu="32", memory="128Gi")]),
    # Fine-tunes (issue 13): adapters from the Hub and from a claim; a full fine-tune in bf16, quantized in
    # flight to FP8, and as one GGUF file.
    "vllm-lora": ({"adapters": [{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 16},
                                {"name": "sql", "source": "pvc://loras/sql", "rank": 8},
                                {"name": "legal", "source": "hf://acme/loras/legal", "rank": 32}]},
                  [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "vllm-weights-bf16": ({"weights": {"source": "hf://acme/llama-8b-support@v3"},
                           "fallback": {"quantizations": ["bf16"]}},
                          [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "vllm-weights-fp8": ({"weights": {"source": "pvc://finetunes/llama-8b-support"},
                          "adapters": [{"name": "support", "source": "hf://acme/support-lora", "rank": 16}],
                          "fallback": {"quantizations": ["fp8"]}},
                         [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "llamacpp-lora": ({"model": "llama-3.2-1b-instruct", "runtime": "llamacpp",
                       "adapters": [{"name": "support", "source": "hf://acme/tiny-lora@v1/support.gguf", "rank": 8},
                                    {"name": "sql", "source": "pvc://loras/sql/adapter.gguf", "rank": 8}]},
                      [dict(name="cpu-1", cpu="32", memory="128Gi")]),
    "llamacpp-weights-gguf": ({"model": "llama-3.2-1b-instruct", "runtime": "llamacpp",
                               "weights": {"gguf": "hf://acme/llama-1b-support/llama-1b-support-Q8_0.gguf"},
                               "adapters": [{"name": "support", "source": "hf://acme/tiny-lora/support.gguf"}]},
                              [dict(name="cpu-1", cpu="32", memory="128Gi")]),
    # Speculative decoding (issue 18): a draft the planner adds where bf16 misses its time per output token, and
    # llama.cpp drafting on a GPU, with an 8-bit KV cache (the draft's cache types follow the target's).
    "vllm-draft": ({"slo": {"tpotP95": "16.5ms"}, "fallback": {"quantizations": ["bf16"], "allowSmallerModels": False}},
                   [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
    "llamacpp-cuda-draft": ({"runtime": "llamacpp", "slo": {"concurrency": 2}, "speculative": {"mode": "On"}},
                            [dict(name="l4", product="NVIDIA-L4", gpus=1, cpu="8", memory="32Gi")]),
    "llamacpp-cuda-kv8-draft": (
        {"runtime": "llamacpp", "contextLength": 65536, "slo": {"concurrency": 4}, "speculative": {"mode": "On"},
         "fallback": {"allowSmallerModels": False, "quantizations": ["f16"]}},
        [dict(name="l40s", product="NVIDIA-L40S", gpus=1)]),
}


def _plan(make_spec, make_node, make_inventory, overrides: dict, nodes: list[dict]) -> tuple[LlamaDeploymentSpec, ChosenPlan]:
    spec = make_spec(**overrides)
    result = planner.plan(spec, make_inventory(*(make_node(**n) for n in nodes)))
    assert result.chosen is not None, result.fallback_reason
    return spec, result.chosen.to_chosen_plan()


@pytest.fixture
def case(request, make_spec, make_node, make_inventory) -> Case:
    spec, plan = _plan(make_spec, make_node, make_inventory, *CASES[request.param])
    return Case(spec, plan, render(OWNER, spec, plan))


@pytest.fixture
def all_cases(make_spec, make_node, make_inventory) -> dict[str, Case]:
    out = {}
    for name, (overrides, nodes) in CASES.items():
        spec, plan = _plan(make_spec, make_node, make_inventory, overrides, nodes)
        out[name] = Case(spec, plan, render(OWNER, spec, plan))
    return out


def cases(*names: str):
    return pytest.mark.parametrize("case", names or list(CASES), indirect=True)


# --- what every rendering has in common -------------------------------------------------------------

@cases()
def test_objects_identity_labels_selector_and_owner(case: Case):
    kinds = [o["kind"] for o in case.objects]
    assert kinds[:2] == ["Deployment", "Service"]
    creates_claim = case.spec.source.cache.size is not None and not case.spec.source.cache.existingClaim
    restricts_clients = case.spec.access.allowedClients is not None
    assert kinds[2:] == (["PersistentVolumeClaim"] if creates_claim else []) + \
        (["NetworkPolicy"] if restricts_clients else [])

    for obj in case.objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        # The LlamaDeployment is the controller of everything it renders: deleting it deletes them
        # (the API server refuses an ownerReference without uid).
        assert meta["ownerReferences"] == [{"apiVersion": API_VERSION, "kind": KIND, "name": "chat",
                                            "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True}]
        assert SELECTOR.items() <= meta["labels"].items()
        assert meta["labels"][LABEL_RUNTIME] == case.plan.runtime
        assert meta["labels"]["llama-operator.dev/model"] == case.plan.model
        assert meta["labels"]["llama-operator.dev/quantization"] == case.plan.quantization
        for key, value in meta["labels"].items():  # the API server would reject a bad label value
            assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)

    dep, svc = case.deployment, case.service
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "chat"
    assert dep["spec"]["replicas"] == case.spec.replicas
    # Selectors are the stable labels only, so a change of variant or runtime never orphans pods.
    assert dep["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert svc["spec"]["selector"] == SELECTOR
    assert SELECTOR.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Rolling updates never take the only model server down before its replacement is up.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@cases()
def test_port_probes_and_service(case: Case):
    port = 8000 if case.plan.runtime == "vllm" else 8080
    c = case.container
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600  # slow downloads
    assert case.service["spec"]["type"] == "ClusterIP"
    assert case.service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
    assert endpoint("chat", "team-a", case.plan.runtime) == f"http://chat.team-a.svc:{port}/v1"


@cases()
def test_gpu_resources_affinity_and_toleration(case: Case):
    resources = case.container["resources"]
    terms = case.pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 1
    expressions = terms[0]["matchExpressions"]
    tolerations = case.pod.get("tolerations", [])
    if case.plan.gpuProduct is not None:
        n = str(case.plan.gpusPerReplica)
        assert resources["requests"]["nvidia.com/gpu"] == n and resources["limits"]["nvidia.com/gpu"] == n
        product = next(e for e in expressions if e["key"] == "nvidia.com/gpu.product")
        assert product["operator"] == "In" and case.plan.gpuProduct in product["values"]
        # Only names of that very GPU (GFD spellings of it), never a neighbour such as L4 for L40S.
        assert {load_catalog().find_gpu(v).product for v in product["values"]} == {case.plan.gpuProduct}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    else:
        assert not any("gpu" in k for k in resources["requests"]) and not any("gpu" in k for k in resources["limits"])
        assert {"key": "nvidia.com/gpu.product", "operator": "DoesNotExist"} in expressions
        assert not any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
        assert resources["requests"]["cpu"] == str(case.plan.cpuThreads)
        requested = int(resources["requests"]["memory"].removesuffix("Mi")) * 2**20
        assert requested >= case.plan.predicted.memoryBytes  # the weights stay resident in RAM


# --- vLLM ------------------------------------------------------------------------------------------

@cases("vllm-tp2", "vllm-tp1", "vllm-awq", "vllm-fp8", "vllm-kv8", "hf-token", "cache-pvc", "cache-existing")
def test_vllm_command_line(case: Case):
    plan = case.plan
    assert plan.runtime == "vllm"
    rel = release(plan.engine)
    assert case.container["image"] == rel.images["cuda"] == f"vllm/vllm-openai:v{rel.version}"
    assert case.container["command"] == ["vllm", "serve"]
    assert case.args[0] == plan.weightsSource  # `vllm serve MODEL`: --model is deprecated there
    assert "--model" not in case.args
    assert case.arg("--served-model-name") == "chat"
    assert case.arg("--port") == "8000"
    assert case.arg("--max-model-len") == str(case.spec.contextLength)
    assert case.arg("--tensor-parallel-size") == str(plan.gpusPerReplica)
    assert float(case.arg("--gpu-memory-utilization")) == pytest.approx(plan.gpuMemoryUtilization)
    assert 0 < plan.gpuMemoryUtilization < 1
    assert case.arg("--max-num-seqs") == str(case.spec.slo.concurrency)
    if plan.kvCacheDtype == "auto":
        assert "--kv-cache-dtype" not in case.args
    else:
        assert case.arg("--kv-cache-dtype") == "fp8"


def test_vllm_tensor_parallel_gets_gpus_and_shared_memory(make_spec, make_node, make_inventory):
    spec, plan = _plan(make_spec, make_node, make_inventory, *CASES["vllm-tp2"])
    assert plan.gpusPerReplica > 1  # the case really is tensor-parallel
    c = Case(spec, plan, render(OWNER, spec, plan))
    assert c.arg("--tensor-parallel-size") == str(plan.gpusPerReplica)
    assert c.container["resources"]["limits"]["nvidia.com/gpu"] == str(plan.gpusPerReplica)
    dshm = [v for v in c.pod["volumes"] if v["name"] == "dshm"]
    assert dshm == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c.container["volumeMounts"]
    assert c.args[0] == "meta-llama/Llama-3.3-70B-Instruct"
    assert "--quantization" not in c.args and "--dtype" not in c.args  # bf16 on Ampere: nothing to tell vLLM


@cases()
def test_shared_memory_volume_only_with_tensor_parallelism(case: Case):
    tensor_parallel = case.plan.runtime == "vllm" and case.plan.gpusPerReplica > 1
    has_volume = any(v["name"] == "dshm" for v in case.pod["volumes"])
    has_mount = any(m["mountPath"] == "/dev/shm" for m in case.container["volumeMounts"])
    assert has_volume == has_mount == tensor_parallel


def test_the_cases_cover_both_sides_of_the_shared_memory_rule(all_cases):
    assert {c.plan.gpusPerReplica > 1 for c in all_cases.values() if c.plan.runtime == "vllm"} == {True, False}


@pytest.mark.parametrize(("name", "quantization", "flag"), [
    ("vllm-tp1", "bf16", None),
    ("vllm-fp8", "fp8", None),
    ("vllm-awq", "awq-int4", "awq_marlin"),
])
def test_vllm_quantization_flag_only_when_needed(name, quantization, flag, make_spec, make_node, make_inventory):
    spec, plan = _plan(make_spec, make_node, make_inventory, *CASES[name])
    assert plan.quantization == quantization
    c = Case(spec, plan, render(OWNER, spec, plan))
    if flag is None:
        assert "--quantization" not in c.args
    else:
        assert c.arg("--quantization") == flag


@pytest.mark.parametrize("product, quantization, flag", [
    ("Tesla-T4", "awq-int4", "awq_marlin"),  # vLLM 0.34.0: AutoAWQConfig (awq and awq_marlin) from 7.5
    ("Tesla-T4", "gptq-int4", "gptq_marlin"),  # AutoGPTQConfig from 6.0
    ("AMD_Instinct_MI300X_OAM", "awq-int4", "awq"),  # ROCm: no Marlin kernels
    ("AMD_Instinct_MI300X_OAM", "gptq-int4", "gptq"),
])
def test_quantized_checkpoints_select_the_kernel_the_gpu_runs(product, quantization, flag, make_spec, make_node,
                                                                make_inventory):
    if product.startswith("AMD"):
        node = make_node("g", labels={"amd.com/gpu.product-name": product})
        node["status"]["allocatable"]["amd.com/gpu"] = "1"
    else:
        node = make_node("g", product, 1)
    spec = make_spec(runtime="vllm", fallback={"quantizations": [quantization]})
    p = planner.plan(spec, make_inventory(node))
    plan = p.chosen.to_chosen_plan()
    c = Case(spec, plan, render(OWNER, spec, plan))
    assert c.arg("--quantization") == flag
    if product.startswith("AMD"):
        assert c.container["image"] == release(plan.engine).images["rocm"]
        assert c.container["resources"]["limits"]["amd.com/gpu"] == "1"


@pytest.mark.parametrize("model, product", [("llama-3.2-3b-instruct", "Tesla-T4"),
                                            ("llama-3.2-11b-vision-instruct", "Tesla-V100-SXM2-32GB")])
def test_16bit_weights_below_compute_capability_8_0_render_as_half(model, product, make_spec, make_node,
                                                                   make_inventory):
    spec, plan = _plan(make_spec, make_node, make_inventory, {"model": model, "runtime": "vllm",
                                                              "fallback": {"allowSmallerModels": False}},
                       [dict(name="g", product=product, gpus=1)])
    assert (plan.quantization, plan.kernel) == ("bf16", "fp16-cast")
    assert Case(spec, plan, render(OWNER, spec, plan)).arg("--dtype") == "half"


def test_fp8_on_ampere_renders_weight_only_without_flags(make_spec, make_node, make_inventory):
    # vLLM reads the checkpoint's FP8 config and picks Marlin W8A16 below 8.9 by itself: nothing to add.
    spec, plan = _plan(make_spec, make_node, make_inventory,
                       {"model": "llama-3.3-70b-instruct", "runtime": "vllm", "fallback": {"allowSmallerModels": False}},
                       [dict(name="a", product="NVIDIA-A100-SXM4-80GB", gpus=1)])
    assert (plan.quantization, plan.kernel) == ("fp8", "fp8-marlin-w8a16")
    c = Case(spec, plan, render(OWNER, spec, plan))
    assert "--quantization" not in c.args and "--dtype" not in c.args


def test_vision_renders_on_the_release_that_serves_mllama(all_cases):
    c = all_cases["vllm-fp8"]
    assert c.plan.model == "llama-3.2-11b-vision-instruct"
    rel = release(c.plan.engine)
    assert "MllamaForConditionalGeneration" in rel.architectures
    assert c.container["image"] == rel.images["cuda"]
    assert c.container["image"] != all_cases["vllm-tp1"].container["image"]


def test_a_plan_from_an_older_catalog_renders_on_the_current_release(all_cases):
    c = all_cases["vllm-tp1"]
    old = c.plan.model_copy(update={"engine": "vllm-0.0.1", "kernel": None})
    assert render(OWNER, c.spec, old) == c.objects


# --- llama.cpp --------------------------------------------------------------------------------------

@cases("llamacpp-cuda", "llamacpp-cuda-kv8", "llamacpp-cpu", "llamacpp-cpu-cache-pvc")
def test_llamacpp_command_line(case: Case):
    plan, spec = case.plan, case.spec
    assert plan.runtime == "llamacpp"
    repo, _, file = plan.weightsSource.rpartition("/")
    assert case.arg("--hf-repo") == repo and case.arg("--hf-file") == file and file.endswith(".gguf")
    # Every one of the --parallel slots gets the whole contextLength.
    assert case.arg("--ctx-size") == str(spec.contextLength * spec.slo.concurrency)
    assert case.arg("--parallel") == str(spec.slo.concurrency)
    assert case.arg("--port") == "8080"
    assert case.arg("--alias") == "chat"
    assert "--metrics" in case.args
    rel = release(plan.engine)
    assert case.container["command"] == list(rel.command)
    if plan.gpuProduct is None:
        assert case.container["image"] == rel.images["cpu"]
        assert case.arg("--n-gpu-layers") == "0"
        assert case.arg("--threads") == str(plan.cpuThreads) and plan.cpuThreads >= 1
    else:
        assert case.container["image"] == rel.images["cuda"]
        assert int(case.arg("--n-gpu-layers")) >= 999  # every layer offloaded
        assert int(case.arg("--threads")) >= 1
    if plan.kvCacheDtype == "auto":
        assert "--cache-type-k" not in case.args and "--cache-type-v" not in case.args
    else:
        assert case.arg("--cache-type-k") == case.arg("--cache-type-v") == "q8_0"
        assert case.arg("--flash-attn") == "on"  # llama.cpp quantizes the V cache only with flash attention


@pytest.mark.parametrize(("name", "kv"), [("vllm-kv8", "fp8"), ("llamacpp-cuda-kv8", "q8_0")])
def test_an_8bit_kv_cache_is_planned_and_rendered(name, kv, make_spec, make_node, make_inventory):
    spec, plan = _plan(make_spec, make_node, make_inventory, *CASES[name])
    assert plan.kvCacheDtype == kv
    c = Case(spec, plan, render(OWNER, spec, plan))
    flag = "--kv-cache-dtype" if plan.runtime == "vllm" else "--cache-type-k"
    assert c.arg(flag) == kv


# --- the token, the model cache -----------------------------------------------------------------------

@cases()
def test_hf_token_only_ever_a_secret_reference(case: Case):
    env = case.container["env"]
    token = [e for e in env if e["name"] == "HF_TOKEN"]
    ref = case.spec.source.hfTokenSecretRef
    if ref is None:
        assert token == []
    else:
        assert token == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]
    assert all("value" not in e for e in token)  # never a literal token in the pod spec


def test_hf_token_uses_the_key_given(all_cases):
    c = all_cases["hf-token"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in c.container["env"]


def test_cache_claim_created_with_size_storage_class_and_owner(all_cases):
    c = all_cases["cache-pvc"]
    pvc = c.kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "chat-model-cache"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # two replicas share it
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid  # deleted with the LlamaDeployment
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "chat-model-cache"}} in c.pod["volumes"]
    assert {"name": "model-cache", "mountPath": "/models"} in c.container["volumeMounts"]

    single = all_cases["llamacpp-cpu-cache-pvc"].kind("PersistentVolumeClaim")
    assert single["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in single["spec"]


def test_existing_claim_is_mounted_not_created(all_cases):
    c = all_cases["cache-existing"]
    assert [o["kind"] for o in c.objects] == ["Deployment", "Service"]  # the user's claim is not ours
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-models"}} in c.pod["volumes"]


def test_without_a_cache_the_model_goes_to_a_sized_empty_dir(all_cases):
    c = all_cases["vllm-tp1"]
    (volume,) = [v for v in c.pod["volumes"] if v["name"] == "model-cache"]
    limit = _bytes(volume["emptyDir"]["sizeLimit"])
    weights = 2 * 8.03e9  # Llama 3.1 8B in bf16
    assert weights < limit < 1.5 * weights
    assert {"name": "HF_HOME", "value": "/models"} in c.container["env"]
    # The pod requests what its emptyDirs may hold on the node's disk: the weights, $HOME and /tmp.
    assert _bytes(c.container["resources"]["requests"]["ephemeral-storage"]) == _on_disk(c)
    # With a claim, the weights land there: only $HOME and /tmp count.
    pvc = all_cases["cache-pvc"]
    assert _bytes(pvc.container["resources"]["requests"]["ephemeral-storage"]) == _on_disk(pvc) < limit


def _on_disk(c: "Case") -> int:
    return sum(_bytes(v["emptyDir"]["sizeLimit"]) for v in c.pod["volumes"]
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")


# --- the content hash -----------------------------------------------------------------------------------

def test_hash_is_stable_and_follows_the_content(make_spec, make_node, make_inventory):
    overrides, nodes = CASES["vllm-tp1"]
    spec, plan = _plan(make_spec, make_node, make_inventory, overrides, nodes)
    first = render(OWNER, spec, plan)
    again = render(OWNER, *_plan(make_spec, make_node, make_inventory, overrides, nodes))
    assert first == again  # byte-for-byte the same objects, so the operator writes nothing
    for obj in first:
        assert re.fullmatch(r"[0-9a-f]{16}", obj["metadata"]["annotations"][HASH_ANNOTATION])
    # Recomputing it from the Deployment as written gives the same value.
    assert first[0]["metadata"]["annotations"][HASH_ANNOTATION] == content_hash(first[0])

    def hashes(objs: list[dict]) -> dict[str, str]:
        return {o["kind"]: o["metadata"]["annotations"][HASH_ANNOTATION] for o in objs}

    # A different plan (the same spec on another GPU) changes the Deployment's hash.
    _, on_l4 = _plan(make_spec, make_node, make_inventory, {"slo": {"concurrency": 1}, "contextLength": 4096},
                     [dict(name="l4", product="NVIDIA-L4", gpus=1)])
    spec_l4 = make_spec(slo={"concurrency": 1}, contextLength=4096)
    assert on_l4.gpuProduct == "NVIDIA-L4"
    assert hashes(render(OWNER, spec_l4, on_l4))["Deployment"] != hashes(render(OWNER, spec_l4, plan))["Deployment"]
    # A different context length changes the Deployment, not the Service.
    longer = make_spec(**{**overrides, "contextLength": 16384})
    changed = hashes(render(OWNER, longer, plan))
    assert changed["Deployment"] != hashes(first)["Deployment"]
    assert changed["Service"] == hashes(first)["Service"]
    # A different runtime changes the Service too (its port).
    cpu = render(OWNER, *_plan(make_spec, make_node, make_inventory, *CASES["llamacpp-cpu"]))
    assert hashes(cpu)["Service"] != hashes(first)["Service"]


def test_the_images_can_come_from_a_mirror(all_cases):
    c = all_cases["vllm-tp1"]
    pinned = c.container["image"]
    custom = render(OWNER, c.spec, c.plan, Images(((pinned, "registry.local/vllm:pinned"),)))
    assert custom[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/vllm:pinned"
    assert custom[0]["metadata"]["annotations"][HASH_ANNOTATION] != c.deployment["metadata"]["annotations"][HASH_ANNOTATION]


def test_spec_tolerations_and_node_selector_pass_through(make_spec, make_node, make_inventory):
    taint = {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}
    spec, plan = _plan(make_spec, make_node, make_inventory,
                       {"placement": {"nodeSelector": {"pool": "llm"},
                                      "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                                                       "effect": "NoSchedule"}]}},
                       [dict(name="l40s", product="NVIDIA-L40S", gpus=1, labels={"pool": "llm"}, taints=[taint])])
    c = Case(spec, plan, render(OWNER, spec, plan))
    assert c.pod["nodeSelector"] == {"pool": "llm"}
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in c.pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in c.pod["tolerations"]


def test_values_that_look_like_yaml_come_back_as_written(make_spec, make_node, make_inventory):
    """Values are set aside while the YAML is parsed (render caches the parse per shape): a selector value
    YAML would read as a bool, a null or a number stays the string the user wrote."""
    tricky = {"pool": "yes", "tier": "null", "rack": "1e3", "hex": "0x1F", "octal": "010", "flag": "on"}
    spec, plan = _plan(make_spec, make_node, make_inventory, {"placement": {"nodeSelector": tricky}},
                       [dict(name="l40s", product="NVIDIA-L40S", gpus=1, labels=tricky)])
    assert Case(spec, plan, render(OWNER, spec, plan)).pod["nodeSelector"] == tricky


def test_renders_of_the_same_shape_share_nothing(all_cases):
    """Two deployments alike but for their names: the second render is not the first one's objects."""
    c = all_cases["vllm-tp1"]
    first = render(OWNER, c.spec, c.plan)
    other = render(Owner(name="chat-2", namespace="team-b", uid="uid-2"), c.spec, c.plan)
    first[0]["metadata"]["labels"]["edited"] = "yes"
    first[0]["spec"]["template"]["spec"]["containers"][0]["args"].append("--edited")
    assert "edited" not in other[0]["metadata"]["labels"]
    assert "--edited" not in other[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert other[0]["metadata"]["name"] == "chat-2" and other[0]["metadata"]["namespace"] == "team-b"
    assert render(OWNER, c.spec, c.plan) == c.objects  # and the cache still gives the pristine objects


def test_a_render_from_the_cache_carries_its_own_owner_everywhere(all_cases):
    """A spec and plan are rendered once with a stand-in owner; every name, label, claim and owner
    reference of a later deployment alike must be its own, with no trace of the stand-in."""
    c = all_cases["vllm-tp1"]
    render(OWNER, c.spec, c.plan)
    owner = Owner(name="support-bot", namespace="team-b", uid="uid-2")
    deployment, service = render(owner, c.spec, c.plan)[:2]
    assert "\x02" not in json.dumps([deployment, service])
    assert OWNER.name not in json.dumps([deployment, service])
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid-2"
    assert deployment["spec"]["selector"]["matchLabels"]["llama-operator.dev/llamadeployment"] == "support-bot"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert "support-bot" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]  # served name


# --- hardening: who the server runs as, what it may write, who may call it ------------------------------------

ENGINE_FACTS = {r["id"]: r for r in yaml.safe_load((CATALOG_DIR / "engines.yaml").read_text())["releases"]}
FLAVOURS = {"nvidia": "cuda", "amd": "rocm", None: "cpu"}


def _amd_node(make_node, runtime_gpus: int = 1) -> dict:
    node = make_node("mi300x", labels={"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"})
    node["status"]["allocatable"]["amd.com/gpu"] = str(runtime_gpus)
    return node


def _vendor(plan: ChosenPlan) -> str | None:
    if plan.gpuProduct is None:
        return None
    return load_catalog().find_gpu(plan.gpuProduct).vendor


def _image_user(plan: ChosenPlan):
    """What catalog/engines.yaml says the plan's image runs as: a UID, `any` or `root`."""
    return ENGINE_FACTS[plan.engine]["runAs"].get(FLAVOURS[_vendor(plan)], "root")


def test_every_release_says_who_its_images_run_as_and_where_it_read_it():
    for rel in releases():
        facts = ENGINE_FACTS[rel.id]
        run_as = facts["runAs"]
        for flavour in rel.images:
            user = run_as[flavour]
            assert user in ("any", "root") or (isinstance(user, int) and user > 0), (rel.id, flavour, user)
        assert isinstance(run_as["readOnlyRootFilesystem"], bool)
        assert len(run_as["source"]) > 100 and "Dockerfile" in run_as["source"], rel.id
        api_key = facts["apiKey"]
        assert re.fullmatch(r"[A-Z_]+_API_KEY", api_key["env"]) and isinstance(api_key["metricsNeedKey"], bool)
        assert api_key["env"] in api_key["source"]
        assert "--api-key" in rel.options  # the option the variable stands for exists in the release
    # The facts as read: vLLM 0.34.0's CUDA image has its user, 0.10.2's none; llama.cpp runs as any UID.
    assert ENGINE_FACTS["vllm-0.34.0"]["runAs"]["cuda"] == 2000 == MODEL_SERVER_UID
    assert ENGINE_FACTS["vllm-0.10.2"]["runAs"]["cuda"] == "root"
    assert set(ENGINE_FACTS["llamacpp-b11434"]["runAs"][f] for f in ("cpu", "cuda", "rocm")) == {"any"}


@cases()
def test_every_pod_is_hardened(case: Case):
    pod, c = case.pod, case.container
    assert pod["automountServiceAccountToken"] is False  # the server never calls the Kubernetes API
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged")
    assert not any(k in pod for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all(set(v) - {"name"} <= {"emptyDir", "persistentVolumeClaim"} for v in pod["volumes"])


@cases()
def test_pods_run_as_non_root_where_the_image_allows_and_pass_restricted(case: Case):
    user = _image_user(case.plan)
    psc = case.pod["securityContext"]
    if user == "root":  # the image prepares no other user: only the non-root rule is broken
        assert "runAsUser" not in psc and "runAsNonRoot" not in psc
        assert restricted_violations(case.pod) == [f"{case.container['name']}: runAsNonRoot is not true"]
        return
    uid = MODEL_SERVER_UID if user == "any" else user
    # A group of its own, never the image's GID 0 (root's group may write /etc/passwd in vLLM's image).
    assert (psc["runAsNonRoot"], psc["runAsUser"], psc["runAsGroup"], psc["fsGroup"]) == (True, uid, uid, uid)
    assert psc["fsGroupChangePolicy"] == "OnRootMismatch"  # no chown of a 100 GiB cache on every start
    assert restricted_violations(case.pod) == []


def test_the_cases_cover_both_non_root_and_root_images(all_cases):
    users = {_image_user(c.plan) for c in all_cases.values()}
    assert {2000, "any", "root"} <= users  # vLLM 0.34.0, llama.cpp, vLLM 0.10.2 (the vision case)


@cases()
def test_home_and_tmp_are_sized_empty_dirs_and_the_root_is_read_only_where_shown(case: Case):
    c, pod = case.container, case.pod
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for path in (env["HOME"], "/tmp"):
        volume = volumes[mounts[path]]
        assert _bytes(volume["emptyDir"]["sizeLimit"]) >= 2**30, path
    read_only = ENGINE_FACTS[case.plan.engine]["runAs"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is read_only
    assert read_only is (case.plan.runtime == "llamacpp")
    # What the engine writes lands on a volume: its downloads, $HOME, the temp dir.
    cache = env["LLAMA_CACHE"] if case.plan.runtime == "llamacpp" else env["HF_HOME"]
    assert {cache, env["HOME"], "/tmp"} <= set(mounts)


@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_amd_gpu_pods_run_as_root_with_everything_else_restricted(runtime, make_spec, make_node, make_inventory):
    """/dev/kfd and /dev/dri/renderD* are root:render 0660 on the node, and the render group's id differs per
    node OS, so a non-root pod could not open them: AMD pods keep root, and nothing else."""
    spec = make_spec(runtime=runtime)
    plan = planner.plan(spec, make_inventory(_amd_node(make_node))).chosen.to_chosen_plan()
    c = Case(spec, plan, render(OWNER, spec, plan))
    assert c.container["image"] == release(plan.engine).images["rocm"]
    assert restricted_violations(c.pod) == [f"{c.container['name']}: runAsNonRoot is not true"]
    assert c.pod["automountServiceAccountToken"] is False
    for obj in c.objects:
        kubernetes_validate.validate(obj, "1.34", strict=True)


def test_a_mirror_with_a_user_runs_a_root_only_release_under_restricted(all_cases):
    c = all_cases["vllm-fp8"]  # Llama 3.2 Vision: vLLM 0.10.2, whose image runs as root only
    assert _image_user(c.plan) == "root" and restricted_violations(c.pod)
    pinned = c.container["image"]
    images = Images(((pinned, "registry.local/vllm-openai:v0.10.2-nonroot=1000:3000"),))
    mirrored = Case(c.spec, c.plan, render(OWNER, c.spec, c.plan, images))
    assert mirrored.container["image"] == "registry.local/vllm-openai:v0.10.2-nonroot"
    psc = mirrored.pod["securityContext"]
    assert (psc["runAsUser"], psc["runAsGroup"], psc["fsGroup"]) == (1000, 3000, 3000)
    assert restricted_violations(mirrored.pod) == []
    # A mirror without a user is the same image elsewhere: it runs as the pinned one does.
    plain = render(OWNER, c.spec, c.plan, Images(((pinned, "registry.local/vllm-openai:v0.10.2"),)))
    assert plain[0]["spec"]["template"]["spec"]["securityContext"] == c.pod["securityContext"]
    uid_only = Images(((pinned, "registry.local/x:v0.10.2=1500"),))
    assert uid_only.user(pinned) == (1500, 1500) and uid_only.resolve(pinned) == "registry.local/x:v0.10.2"


@pytest.mark.parametrize("mirror", ["registry.local/x=0", "registry.local/x=abc", "registry.local/x=1000:",
                                    "=1000", "registry.local/x=1000:g"])
def test_a_malformed_mirror_user_is_refused_up_front(mirror):
    with pytest.raises(ValueError, match="non-root numeric UID"):
        Images((("vllm/vllm-openai:v0.10.2", mirror),))


@cases("vllm-access", "llamacpp-access")
def test_the_api_key_comes_from_the_secret_as_the_engine_variable_never_an_argument(case: Case):
    ref = case.spec.access.apiKeySecretRef
    env_name = ENGINE_FACTS[case.plan.engine]["apiKey"]["env"]
    assert env_name == {"vllm": "VLLM_API_KEY", "llamacpp": "LLAMA_API_KEY"}[case.plan.runtime]
    keys = [e for e in case.container["env"] if e["name"] == env_name]
    assert keys == [{"name": env_name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]
    assert not any(a.startswith("--api-key") for a in case.args)
    assert rejected_arguments(release(case.plan.engine), case.args) == []
    # The probes stay on /health, which neither engine guards with the key.
    assert case.container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_api_key_secret_key_defaults_and_no_key_without_the_field(all_cases):
    assert all_cases["vllm-access"].spec.access.apiKeySecretRef.key == "API_KEY"
    for c in all_cases.values():
        if c.spec.access.apiKeySecretRef is None:
            assert not any(e["name"].endswith("_API_KEY") for e in c.container["env"])


@cases("vllm-access", "llamacpp-access")
def test_the_network_policy_admits_only_the_listed_clients_to_the_server_port(case: Case):
    policy = case.kind("NetworkPolicy")
    assert policy["metadata"]["name"] == "chat"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid  # deleted with the LlamaDeployment
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": SELECTOR} == case.deployment["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open: the weights are downloaded
    (rule,) = spec["ingress"]
    port = case.container["ports"][0]["containerPort"]
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    expected = []
    for client in case.spec.access.allowedClients:
        peer = {"podSelector": {"matchLabels": client.podLabels} if client.podLabels else {}}
        if client.namespaceLabels is not None:
            peer["namespaceSelector"] = {"matchLabels": client.namespaceLabels} if client.namespaceLabels else {}
        expected.append(peer)
    assert rule["from"] == expected


def test_network_policy_peers_as_written(all_cases):
    (vllm_rule,) = all_cases["vllm-access"].kind("NetworkPolicy")["spec"]["ingress"]
    assert vllm_rule["from"] == [
        {"podSelector": {"matchLabels": {"app": "chat-ui"}}},  # same namespace only
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
         "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    (cpp_rule,) = all_cases["llamacpp-access"].kind("NetworkPolicy")["spec"]["ingress"]
    assert cpp_rule["from"] == [{"podSelector": {}},  # every pod of the namespace
                                {"podSelector": {"matchLabels": {"role": "scraper"}}, "namespaceSelector": {}}]
    assert cpp_rule["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_an_empty_client_list_is_refused(make_spec):
    from llama_operator.api import SpecError, parse_spec
    with pytest.raises(SpecError, match="allowedClients"):
        parse_spec({**make_spec().model_dump(mode="json", exclude_none=True), "access": {"allowedClients": []}})


def test_access_changes_the_deployment_hash_only_through_the_key(all_cases, make_spec, make_node, make_inventory):
    base = all_cases["vllm-tp1"]
    spec, plan = _plan(make_spec, make_node, make_inventory, {"access": {"allowedClients": [{}]}},
                       [dict(name="l40s", product="NVIDIA-L40S", gpus=1)])
    objs = render(OWNER, spec, plan)
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "NetworkPolicy"]
    # A policy alone leaves the pods as they were: no rollout.
    assert objs[0]["metadata"]["annotations"][HASH_ANNOTATION] == \
        base.deployment["metadata"]["annotations"][HASH_ANNOTATION]


# --- schema validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@cases()
def test_every_manifest_validates_strictly(case: Case, version: str):
    for obj in case.objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} does not validate for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_validation_would_catch_an_unknown_field(all_cases):
    """The check above has teeth: --strict rejects a misspelt field."""
    broken = yaml.safe_load(yaml.safe_dump(all_cases["vllm-tp1"].deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["argz"] = ["--model"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.34", strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_validate_cli_accepts_every_manifest(all_cases, version, tmp_path: Path):
    docs = [obj for c in all_cases.values() for obj in c.objects]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "kubernetes_validate"]
    result = subprocess.run([*argv, "--strict", "--quiet", "-k", version, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the pod must fit the node it was planned for ------------------------------------------------------------

def _millis(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def _bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


SMALL_GPU_NODES = {
    # AWS g6.xlarge: 1x L4, 4 vCPU, 16 GiB (allocatable as in examples/clusters/mixed.yaml)
    "vllm-on-g6.xlarge": ({}, dict(name="g6", product="NVIDIA-L4", gpus=1, cpu="3910m", memory="15602810Ki"), "vllm"),
    # AWS g4dn.xlarge: 1x T4, 4 vCPU, 16 GiB: vLLM serves the 16-bit 1B as fp16 there
    "vllm-on-g4dn.xlarge": (
        {"model": "llama-3.2-1b-instruct", "fallback": {"allowCPU": False}},
        dict(name="g4dn", product="Tesla-T4", gpus=1, cpu="3910m", memory="15602810Ki"), "vllm"),
    "llamacpp-on-g4dn.xlarge": (
        {"model": "llama-3.2-1b-instruct", "runtime": "llamacpp", "fallback": {"allowCPU": False}},
        dict(name="g4dn", product="Tesla-T4", gpus=1, cpu="3910m", memory="15602810Ki"), "llamacpp"),
}


@pytest.mark.parametrize("name", [
    "vllm-on-g6.xlarge",
    "vllm-on-g4dn.xlarge",
    "llamacpp-on-g4dn.xlarge",
])
def test_rendered_pod_fits_the_node_it_was_planned_for(name, make_spec, make_node, make_inventory):
    overrides, node, runtime = SMALL_GPU_NODES[name]
    spec, plan = _plan(make_spec, make_node, make_inventory, overrides, [node])
    assert plan.runtime == runtime and plan.gpuProduct == node["product"]
    requests = Case(spec, plan, render(OWNER, spec, plan)).container["resources"]["requests"]
    assert _millis(requests["cpu"]) <= _millis(node["cpu"]), f"requests {requests['cpu']} CPU on a {node['cpu']} node"
    assert _bytes(requests["memory"]) <= _bytes(node["memory"])


# --- fine-tunes: what the engines are given (issue 13) --------------------------------------------------

@cases()
def test_every_rendered_command_line_is_one_its_release_accepts(case: Case):
    """The engine flag check (engines.rejected_arguments, from each release's own option list) over every
    case, the fine-tunes' adapters, custom weights and in-flight quantization included."""
    assert rejected_arguments(release(case.plan.engine), case.args) == []


def registered_lora_modules(args: list[str]) -> list[str]:
    """The adapters `vllm serve` registers from these arguments: --lora-modules takes every value up to the
    next option (nargs "+") and its action replaces the list on every occurrence (engines.yaml
    lora.adapters.syntax: LoRAParserAction, `setattr(namespace, self.dest, lora_list)`), so only the last
    occurrence counts."""
    registered: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--lora-modules":
            values = []
            for value in args[i + 1:]:
                if value.startswith("-"):
                    break
                values.append(value)
            registered = values  # replaced, not extended
    return registered


def test_a_repeated_lora_modules_would_register_only_its_last_adapters():
    one_flag = ["m", "--enable-lora", "--lora-modules", "a=/x/a", "b=/x/b", "--max-loras", "2"]
    repeated = ["m", "--enable-lora", "--lora-modules", "a=/x/a", "--lora-modules", "b=/x/b", "--max-loras", "2"]
    assert registered_lora_modules(one_flag) == ["a=/x/a", "b=/x/b"]
    assert registered_lora_modules(repeated) == ["b=/x/b"]  # adapter a is lost ...
    # ... and the release's own option list takes both as valid: only the count of the flag tells them apart.
    assert rejected_arguments(release("vllm-0.34.0"), repeated) == []
    assert repeated.count("--lora-modules") == 2


@cases("vllm-lora", "vllm-weights-fp8")
def test_vllm_gets_every_adapter_after_one_lora_modules(case: Case):
    assert case.args.count("--lora-modules") == 1
    registered = registered_lora_modules(case.args)
    assert [m.split("=", 1)[0] for m in registered] == [a.name for a in case.spec.adapters]
    assert case.arg("--max-loras") and case.args.count("--enable-lora") == 1


@pytest.mark.parametrize(("case", "quant"), [("vllm-lora", None), ("vllm-weights-bf16", "bf16"),
                                              ("vllm-weights-fp8", "fp8"), ("llamacpp-lora", None),
                                              ("llamacpp-weights-gguf", "q8_0")], indirect=["case"])
def test_fine_tunes_render_their_weights_and_adapters_as_local_paths(case: Case, quant: str | None):
    """Every fine-tune file is read from the model cache (fetched) or a claim (mounted), never downloaded by
    the engine; the variant is the one the case names."""
    args = case.args
    if quant is not None:
        assert case.plan.quantization == quant
    if case.plan.runtime == "vllm":
        weights = args[0]
        for module in registered_lora_modules(args):
            assert module.split("=", 1)[1].startswith(("/models/llama-operator/sources/", "/sources/")), module
        if case.spec.weights is not None:
            assert weights.startswith(("/models/llama-operator/sources/", "/sources/")), weights
        if quant == "fp8":  # in flight, on a 16-bit fine-tune (engines.yaml inFlightQuantization)
            assert case.arg("--quantization") == "fp8_per_tensor"
        else:
            assert "--quantization" not in args
    else:
        assert "--hf-repo" not in args if case.spec.weights is not None else "--model" not in args
        if case.spec.weights is not None:
            assert case.arg("--model").endswith("/llama-1b-support-Q8_0.gguf")
        lora = [args[i + 1] for i, a in enumerate(args) if a in ("--lora", "--lora-scaled")]
        assert len(lora) == len(case.spec.adapters)
        if len(lora) > 1:  # loaded at scale 0: applied only when a request names the adapter by id
            assert all(v.endswith(":0") for v in lora) and "--lora" not in args
        assert "--lora-init-without-apply" not in args  # no effect on requests (tests/engines)


@pytest.mark.parametrize("name", ["vllm-draft", "llamacpp-cuda-draft", "llamacpp-cuda-kv8-draft"])
def test_a_plan_with_a_draft_tells_the_server_and_sizes_the_download(all_cases, name):
    """The draft's arguments are the pinned release's (render/speculative.py); the pod's scratch for the download
    and its start-up allowance count the draft's weights too."""
    c = all_cases[name]
    s = c.plan.speculative
    assert s is not None, name
    args = c.container["args"]
    if c.plan.runtime == "vllm":
        config = json.loads(args[args.index("--speculative-config") + 1])
        assert config["method"] == "draft_model" and config["model"] == s.draftWeightsSource
    else:
        assert args[args.index("--spec-type") + 1] == "draft-simple"
        assert args[args.index("--spec-draft-n-max") + 1] == str(s.numSpeculativeTokens)
        assert args[args.index("--spec-draft-ngl") + 1] == "999"
        kv = c.plan.kvCacheDtype
        assert ("--spec-draft-type-k" in args) is (kv != "auto")
        if kv != "auto":
            assert args[args.index("--spec-draft-type-v") + 1] == kv
    assert rejected_arguments(release(c.plan.engine), args) == []
    without = c.plan.model_copy(update={"speculative": None})
    plain = Case(c.spec, without, render(OWNER, c.spec, without))
    probe = lambda case: case.container["startupProbe"]["failureThreshold"]  # noqa: E731
    assert probe(c) >= probe(plain)

