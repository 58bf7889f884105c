"""Fixtures for the core's unit tests: small clusters built from Node/Pod manifests, and specs.

The helpers are exposed as fixtures (returning the function) so that no test module imports this file
by name (tests/chart has a conftest.py of its own).

* make_node(name, product=None, gpus=0, ...) -> a Node manifest shaped like `kubectl get node -o yaml`,
  with the labels NVIDIA GPU Feature Discovery writes (gpu.product, gpu.count, gpu.memory in MiB,
  gpu.compute.major/minor) when `product` is given.
* make_pod(node, gpus=0, ...) -> a bound Pod manifest holding GPUs/CPU/memory on `node`.
* make_inventory(*nodes, pods=()) -> llama_operator.inventory.Inventory.
* make_spec(**overrides) -> a parsed LlamaDeploymentSpec (deep-merged over a loose 8B request).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from llama_operator.api import parse_spec
from llama_operator.catalog import load_catalog
from llama_operator.inventory import Inventory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTERS = EXAMPLES / "clusters"

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}

#: A request every test starts from: Llama 3.1 8B, loose latency, a budget that is not the constraint.
BASE_SPEC = {
    "model": "llama-3.1-8b-instruct",
    "slo": {"ttftP95": "10s", "tpotP95": "1s"},
    "memoryBudget": "200Gi",
}


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
    """A GFD-labelled Node. For a catalog product, gpu.memory and the compute capability default to
    the catalog's numbers; for an unknown product pass memory_mib (and compute) yourself."""
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    allocatable: dict = {"cpu": cpu, "memory": memory, "pods": "110"}
    node_taints = list(taints or [])
    if product:
        gpu = load_catalog().find_gpu(product)
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
            node_taints.append(dict(GPU_TAINT))
    node_labels.update(labels or {})
    spec: dict = {}
    if node_taints:
        spec["taints"] = node_taints
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


def pod_manifest(node: str, gpus: int = 0, cpu: str | None = None, memory: str | None = None,
                 phase: str = "Running", name: str | None = None, resource: str = "nvidia.com/gpu") -> dict:
    """A Pod bound to `node` that holds GPUs (as limits, which is how GPU pods are written)."""
    limits: dict = {}
    requests: dict = {}
    if gpus:
        limits[resource] = str(gpus)
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = memory
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name or f"busy-{node}", "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                                                  "resources": {"limits": limits, "requests": requests}}]},
        "status": {"phase": phase},
    }


def deep_merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def make_node():
    return node_manifest


@pytest.fixture
def make_pod():
    return pod_manifest


@pytest.fixture
def make_inventory():
    def build(*nodes: dict, pods=()) -> Inventory:
        return Inventory.from_manifests(list(nodes), list(pods))
    return build


@pytest.fixture
def spec_dict():
    def build(**overrides) -> dict:
        return deep_merge(BASE_SPEC, overrides)
    return build


@pytest.fixture
def make_spec(spec_dict):
    def build(**overrides):
        return parse_spec(spec_dict(**overrides))
    return build
