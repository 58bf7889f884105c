"""Synthetic clusters and LlamaDeployments for the benchmarks (not tests).

`cluster(n)` returns `n` Node manifests shaped like `kubectl get nodes -o yaml` output, spread over
20 shapes (GPU products from the catalog with different counts, CPU shapes, some taints and labels;
one zone per shape so the 20 really are 20), with about 1% of nodes NotReady or cordoned, and the Pod
manifests of workloads already running on them (some take GPUs). Deterministic for a given `n` and
`seed`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
AMD_TAINT = {"key": "amd.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class ShapeSpec:
    prefix: str
    weight: int  # relative share of the cluster's nodes
    instance_type: str
    cpu: str
    memory: str
    product: str | None = None
    gpus: int = 0
    gpu_memory_mib: int = 0
    compute: str | None = None
    amd: bool = False
    taints: tuple[dict, ...] = ()
    labels: dict = field(default_factory=dict)


SHAPES: tuple[ShapeSpec, ...] = (
    ShapeSpec("l4x1", 12, "g6.xlarge", "3910m", "15602810Ki", "NVIDIA-L4", 1, 23034, "8.9", taints=(GPU_TAINT,)),
    ShapeSpec("l4x4", 6, "g6.12xlarge", "47810m", "186646292Ki", "NVIDIA-L4", 4, 23034, "8.9", taints=(GPU_TAINT,)),
    ShapeSpec("l4x8", 2, "g6.48xlarge", "191450m", "760132904Ki", "NVIDIA-L4", 8, 23034, "8.9", taints=(GPU_TAINT,)),
    ShapeSpec("a10gx1", 8, "g5.xlarge", "3920m", "15284604Ki", "NVIDIA-A10G", 1, 23028, "8.6", taints=(GPU_TAINT,)),
    ShapeSpec("a10gx4", 4, "g5.12xlarge", "47810m", "186646292Ki", "NVIDIA-A10G", 4, 23028, "8.6",
              taints=(GPU_TAINT,)),
    ShapeSpec("t4x1", 6, "g4dn.xlarge", "3920m", "15284604Ki", "Tesla-T4", 1, 15360, "7.5", taints=(GPU_TAINT,)),
    ShapeSpec("l40sx2", 3, "onprem-l40s-2", "63500m", "263841912Ki", "NVIDIA-L40S", 2, 46068, "8.9",
              taints=(GPU_TAINT,), labels={"eks.amazonaws.com/compute-type": "hybrid"}),
    ShapeSpec("l40sx4", 2, "onprem-l40s-4", "95500m", "395921912Ki", "NVIDIA-L40S", 4, 46068, "8.9",
              taints=(GPU_TAINT, {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}),
              labels={"dedicated": "ml"}),
    ShapeSpec("a100-40x8", 2, "p4d.24xlarge", "95690m", "1176319348Ki", "NVIDIA-A100-SXM4-40GB", 8, 40960, "8.0",
              taints=(GPU_TAINT,)),
    ShapeSpec("a100-80x8", 1, "p4de.24xlarge", "95690m", "1176319348Ki", "NVIDIA-A100-SXM4-80GB", 8, 81920, "8.0",
              taints=(GPU_TAINT,)),
    ShapeSpec("h100x8", 1, "p5.48xlarge", "191450m", "2046364588Ki", "NVIDIA-H100-80GB-HBM3", 8, 81559, "9.0",
              taints=(GPU_TAINT, {"key": "reserved", "value": "training", "effect": "NoSchedule"}),
              labels={"workload": "training"}),
    ShapeSpec("h100pciex2", 1, "onprem-h100-2", "63500m", "263841912Ki", "NVIDIA-H100-PCIe", 2, 81559, "9.0",
              taints=(GPU_TAINT,)),
    ShapeSpec("a100pciex1", 1, "onprem-a100-1", "31500m", "131841912Ki", "NVIDIA-A100-80GB-PCIe", 1, 81920, "8.0",
              taints=(GPU_TAINT,)),
    ShapeSpec("mi300x8", 1, "onprem-mi300x", "191450m", "2046364588Ki", "AMD_Instinct_MI300X_OAM", 8, 196608, None,
              amd=True, taints=(AMD_TAINT,)),
    ShapeSpec("rtx4090x1", 2, "workstation-4090", "23500m", "64841912Ki", "NVIDIA-GeForce-RTX-4090", 1, 24564, "8.9",
              labels={"lab": "edge"}),
    ShapeSpec("v100x8", 1, "p3.16xlarge", "63690m", "480319348Ki", "Tesla-V100-SXM2-16GB", 8, 16384, "7.0",
              taints=(GPU_TAINT,)),
    ShapeSpec("cpu-m6i-2xl", 20, "m6i.2xlarge", "7910m", "31205621Ki"),
    ShapeSpec("cpu-m7i-8xl", 10, "m7i.8xlarge", "31750m", "127053172Ki",
              labels={"llama-operator.dev/memory-bandwidth-gbps": "150"}),
    ShapeSpec("cpu-r7i-16xl", 4, "r7i.16xlarge", "63750m", "518053172Ki",
              labels={"llama-operator.dev/memory-bandwidth-gbps": "230"}),
    ShapeSpec("cpu-c7i-4xl-spot", 12, "c7i.4xlarge", "15890m", "31205621Ki",
              taints=({"key": "spot", "value": "true", "effect": "NoSchedule"},),
              labels={"eks.amazonaws.com/capacityType": "SPOT"}),
)


def _node(spec: ShapeSpec, index: int, zone: str, ready: bool, cordoned: bool) -> dict:
    name = f"{spec.prefix}-{index:05d}.internal"
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "node.kubernetes.io/instance-type": spec.instance_type,
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": zone,
        **spec.labels,
    }
    allocatable = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "96625420948"}
    if spec.product and spec.amd:
        labels["amd.com/gpu.product-name"] = spec.product
        allocatable["amd.com/gpu"] = str(spec.gpus)
    elif spec.product:
        major, minor = (spec.compute or "0.0").split(".")
        labels.update({
            "nvidia.com/gpu.product": spec.product,
            "nvidia.com/gpu.count": str(spec.gpus),
            "nvidia.com/gpu.memory": str(spec.gpu_memory_mib),
            "nvidia.com/gpu.compute.major": major,
            "nvidia.com/gpu.compute.minor": minor,
            "nvidia.com/gpu.present": "true",
        })
        allocatable["nvidia.com/gpu"] = str(spec.gpus)
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": f"aws:///{zone}/i-{index:017x}"},
        "status": {
            "allocatable": allocatable,
            "capacity": dict(allocatable),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    if spec.taints:
        node["spec"]["taints"] = [dict(t) for t in spec.taints]
    if cordoned:
        node["spec"]["unschedulable"] = True
    return node


def _pod(node: dict, i: int, gpus: int, cpu: str, memory: str, gpu_key: str = "nvidia.com/gpu") -> dict:
    resources: dict = {"requests": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"] = {gpu_key: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"work-{i:06d}", "namespace": "apps", "labels": {"app": "work"}},
        "spec": {"nodeName": node["metadata"]["name"],
                 "containers": [{"name": "main", "image": "example/app:1", "resources": resources}]},
        "status": {"phase": "Running"},
    }


def cluster(n: int, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """`n` Node manifests over the 20 shapes (by weight; every shape present once n >= 20) and the Pods on them."""
    rng = random.Random(seed)
    total = sum(s.weight for s in SHAPES)
    # Largest-remainder apportionment by weight, at least one node per shape while n allows.
    counts = [1 if n >= len(SHAPES) else 0 for _ in SHAPES]
    rest = n - sum(counts)
    quotas = [rest * s.weight / total for s in SHAPES]
    counts = [c + int(q) for c, q in zip(counts, quotas)]
    order = sorted(range(len(SHAPES)), key=lambda i: -(quotas[i] - int(quotas[i])))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    zones = ("us-east-1a", "us-east-1b", "us-east-1c")
    nodes, pods = [], []
    for si, (spec, count) in enumerate(zip(SHAPES, counts)):
        zone = zones[si % len(zones)]
        for j in range(count):
            roll = rng.random()
            node = _node(spec, j, zone, ready=roll >= 0.01, cordoned=0.01 <= roll < 0.015)
            nodes.append(node)
            # Workloads already running: about a third of GPU nodes have some GPUs taken, most nodes
            # run a few small CPU pods (daemons, apps).
            if spec.gpus and rng.random() < 0.33:
                taken = rng.randint(1, spec.gpus)
                pods.append(_pod(node, len(pods), taken, "2", "8Gi",
                                 "amd.com/gpu" if spec.amd else "nvidia.com/gpu"))
            for _ in range(rng.choice((0, 1, 2))):
                pods.append(_pod(node, len(pods), 0, rng.choice(("250m", "500m", "1")),
                                 rng.choice(("512Mi", "1Gi", "2Gi"))))
    return nodes, pods


def deployment_specs() -> dict[str, dict]:
    """Representative LlamaDeployment specs, by name."""
    return {
        "70b-mixed": {
            "model": "llama-3.3-70b-instruct",
            "slo": {"ttftP95": "1s", "tpotP95": "30ms", "promptTokens": 1024, "concurrency": 4},
            "memoryBudget": "320Gi", "contextLength": 16384,
        },
        "90b-vision-fallback": {
            "model": "llama-3.2-90b-vision-instruct",
            "slo": {"ttftP95": "2s", "tpotP95": "100ms", "promptTokens": 1024},
            "memoryBudget": "160Gi", "contextLength": 8192,
            # single-L4 nodes only: 90B cannot fit, the ladder steps down to 11B Vision
            "placement": {"nodeSelector": {"node.kubernetes.io/instance-type": "g6.xlarge"},
                          "gpuProducts": ["NVIDIA-L4"]},
        },
        "1b-cpu": {
            "model": "llama-3.2-1b-instruct",
            "slo": {"ttftP95": "3s", "tpotP95": "100ms", "promptTokens": 256},
            "memoryBudget": "8Gi", "contextLength": 4096, "runtime": "llamacpp",
            "fallback": {"allowCPU": True},
        },
        "8b-chat": {
            "model": "llama-3.1-8b-instruct",
            "slo": {"ttftP95": "1s", "tpotP95": "80ms", "promptTokens": 512, "concurrency": 8},
            "memoryBudget": "40Gi", "contextLength": 8192, "replicas": 2,
        },
        "impossible": {
            "model": "llama-3.1-405b-instruct",
            "slo": {"ttftP95": "500ms", "tpotP95": "20ms"},
            "memoryBudget": "16Gi",
            "fallback": {"allowSmallerModels": False},
        },
    }


def operator_specs(count: int) -> list[tuple[str, str, dict]]:
    """`count` (namespace, name, spec) for the operator benchmark: a varied mix that a 500-node synthetic
    cluster can place (no Unschedulable by design, so both operators write a Deployment for each)."""
    base = deployment_specs()
    templates = [
        base["8b-chat"],
        base["1b-cpu"],
        base["90b-vision-fallback"],
        {**base["8b-chat"], "replicas": 1, "slo": {"ttftP95": "2s", "tpotP95": "100ms", "concurrency": 4}},
        {"model": "llama-3.2-3b-instruct", "slo": {"ttftP95": "2s", "tpotP95": "100ms"}, "memoryBudget": "24Gi"},
        {"model": "llama-3.2-11b-vision-instruct", "slo": {"ttftP95": "1500ms", "tpotP95": "50ms",
                                                           "promptTokens": 1024, "concurrency": 4},
         "memoryBudget": "24Gi", "contextLength": 8192},
        {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "3s", "tpotP95": "200ms"}, "memoryBudget": "16Gi",
         "runtime": "llamacpp", "placement": {"tolerations": [{"key": "spot", "operator": "Exists"}]}},
        {"model": "llama-3.3-70b-instruct", "slo": {"ttftP95": "2s", "tpotP95": "80ms"}, "memoryBudget": "200Gi",
         "contextLength": 8192},
    ]
    out = []
    namespaces = ("default", "team-a", "team-b", "team-c")
    for i in range(count):
        out.append((namespaces[i % len(namespaces)], f"ld-{i:03d}", templates[i % len(templates)]))
    return out
