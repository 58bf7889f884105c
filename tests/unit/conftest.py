"""Fixtures for the core's unit tests: small clusters built from Node/Pod manifests, and specs.

The helpers are exposed as fixtures (returning the function) so that no test module imports this file
by name (tests/chart has a conftest.py of its own).

* make_node(name, product=None, gpus=0, ...) -> kit.nodes.node_manifest: a Node manifest shaped like
  `kubectl get node -o yaml`, labelled as the GPU operators label it when `product` is given.
* make_pod(node, gpus=0, ...) -> a bound Pod manifest holding GPUs/CPU/memory on `node`.
* make_inventory(*nodes, pods=()) -> llama_operator.inventory.Inventory.
* make_spec(**overrides) -> a parsed LlamaDeploymentSpec (deep-merged over a loose 8B request).
"""
from __future__ import annotations

import copy

import pytest

from llama_operator.api import parse_spec
from llama_operator.inventory import Inventory

from kit.nodes import node_manifest

#: A request every test starts from: Llama 3.1 8B, loose latency, a budget that is not the constraint.
BASE_SPEC = {
    "model": "llama-3.1-8b-instruct",
    "slo": {"ttftP95": "10s", "tpotP95": "1s"},
    "memoryBudget": "200Gi",
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
