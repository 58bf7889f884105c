"""A Node manifest shaped like `kubectl get node -o yaml`, labelled as the GPU operators label it."""
from __future__ import annotations

from llama_operator.catalog import load_catalog

NVIDIA_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node_manifest(
    name: str,
    product: str | None = None,
    gpus: int = 0,
    memory_mib: int | None = None,
    cpu: str = "32",
    memory: str = "128Gi",
    labels: dict | None = None,
    taints: list | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    compute: str | None = None,
    gpu_taint: bool = True,
) -> dict:
    """A Node with `gpus` GPUs of `product` (none without one).

    An NVIDIA GPU carries the labels NVIDIA GPU Feature Discovery writes (gpu.product, gpu.count, gpu.memory
    in MiB, gpu.compute.major/minor) and the GPU operator's taint. For a catalog product, gpu.memory and the
    compute capability default to the catalog's numbers; for an unknown product pass memory_mib (and
    compute) yourself. An AMD GPU of the catalog carries what the AMD GPU operator's labeller and device
    plugin show: its product-name label, amd.com/gpu, and a taint of that key."""
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    allocatable: dict = {"cpu": cpu, "memory": memory, "pods": "110"}
    node_taints = list(taints or [])
    gpu = load_catalog().find_gpu(product) if product else None
    if gpu is not None and gpu.vendor == "amd":
        node_labels[gpu.label_key] = product
        allocatable[gpu.resource_name] = str(gpus)
        if gpu_taint:
            node_taints.append({"key": gpu.resource_name, "effect": "NoSchedule"})
    elif product:
        if memory_mib is None and gpu is not None:
            memory_mib = int(round(gpu.memory_gib * 1024))
        cc = compute or (gpu.compute_capability if gpu is not None else None)
        node_labels.update({
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
        })
        if memory_mib:
            node_labels["nvidia.com/gpu.memory"] = str(memory_mib)
        if cc:
            major, _, minor = cc.partition(".")
            node_labels["nvidia.com/gpu.compute.major"] = major
            node_labels["nvidia.com/gpu.compute.minor"] = minor or "0"
        allocatable["nvidia.com/gpu"] = str(gpus)
        if gpu_taint:
            node_taints.append(dict(NVIDIA_GPU_TAINT))
    node_labels.update(labels or {})
    spec: dict = {"taints": node_taints} if node_taints else {}
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels},
        "spec": spec,
        "status": {
            "capacity": dict(allocatable),
            "allocatable": allocatable,
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
        },
    }
