"""Helpers for running the operator against an API server (the emulator, or a real cluster).

`Cluster` wraps the `kubernetes` dynamic client for what the tests do to a cluster: add and remove
Nodes, create, patch and delete LlamaDeployments, read the objects the operator owns and the Events
it posts. `wait_until` polls with a deadline, so no test waits blindly or forever.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import NotFoundError

from llama_operator.api import API_VERSION, KIND
from llama_operator.ownership import LABEL_DEPLOYMENT, MANAGED_BY
from llama_operator.sandbox.demo import load_docs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTERS = EXAMPLES / "clusters"
CRD_FILE = ROOT / "crds" / "llamadeployments.yaml"

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def holds_for(predicate: Callable[[], Any], seconds: float, what: str, interval: float = 0.1) -> None:
    """Check that `predicate` stays true over a bounded window (for 'nothing more happens' assertions)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"no longer true: {what}"
        time.sleep(interval)


def example(name: str) -> dict:
    """The LlamaDeployment of examples/<name>.yaml."""
    docs = [d for d in load_docs(EXAMPLES / name) if d.get("kind") == KIND]
    assert len(docs) == 1
    return docs[0]


def gpu_node(name: str, product: str, gpus: int, *, memory_mib: int, compute: str, cpu: str = "16",
             memory: str = "64Gi") -> dict:
    """A GPU Node as the NVIDIA GPU Operator labels and taints it."""
    major, minor = compute.split(".")
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(memory_mib), "nvidia.com/gpu.compute.major": major,
            "nvidia.com/gpu.compute.minor": minor,
        }},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)},
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


class Cluster:
    """What a test does to a cluster, through the official client and a kubeconfig."""

    def __init__(self, kubeconfig: str | Path, namespace: str = "default"):
        self.kubeconfig = str(kubeconfig)
        self.client = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
        self.api = dynamic.DynamicClient(self.client)
        self.namespace = namespace
        self.nodes = self.api.resources.get(api_version="v1", kind="Node")
        self.pods = self.api.resources.get(api_version="v1", kind="Pod")
        self.events_api = self.api.resources.get(api_version="v1", kind="Event")
        self.deployments_api = self.api.resources.get(api_version="apps/v1", kind="Deployment")
        self.services_api = self.api.resources.get(api_version="v1", kind="Service")
        self.pvcs_api = self.api.resources.get(api_version="v1", kind="PersistentVolumeClaim")
        self._llamas = None

    def close(self) -> None:
        self.client.close()

    @property
    def llamas(self):
        if self._llamas is None:  # discovered lazily: the CRD may be applied by the test itself
            self._llamas = self.api.resources.get(api_version=API_VERSION, kind=KIND)
        return self._llamas

    # --- nodes ---

    def add_nodes(self, source: str | Path | list[dict]) -> list[str]:
        """Create Nodes from examples/clusters/<source>.yaml (or manifests); returns their names."""
        docs = source if isinstance(source, list) else load_docs(CLUSTERS / f"{source}.yaml")
        names = []
        for n in docs:
            body = {k: v for k, v in copy.deepcopy(n).items() if k != "metadata"}
            body["metadata"] = {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}
            self.nodes.create(body=body)
            names.append(n["metadata"]["name"])
        return names

    def remove_nodes(self, names: list[str]) -> None:
        for name in names:
            self.nodes.delete(name=name)

    # --- LlamaDeployments ---

    def create(self, manifest: dict, name: str | None = None, **spec: Any) -> dict:
        body = copy.deepcopy(manifest)
        body["metadata"] = {"name": name or body["metadata"]["name"], "namespace": self.namespace}
        body["spec"] = {**body["spec"], **spec}
        return self.llamas.create(body=body, namespace=self.namespace).to_dict()

    def get(self, name: str) -> dict | None:
        try:
            return self.llamas.get(name=name, namespace=self.namespace).to_dict()
        except NotFoundError:
            return None

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.llamas.patch(name=name, namespace=self.namespace, body={"spec": spec},
                                 content_type="application/merge-patch+json").to_dict()

    def delete(self, name: str) -> None:
        self.llamas.delete(name=name, namespace=self.namespace)

    def wait_status(self, name: str, predicate: Callable[[dict], Any], timeout: float, what: str) -> dict:
        def check():
            st = self.status(name)
            return st if predicate(st) else None
        try:
            return wait_until(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; last status of {name}: {self.status(name)}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict:
        return self.wait_status(name, lambda s: s.get("phase") == phase, timeout, f"{name} to be {phase}")

    # --- what the operator owns ---

    def _list(self, res, **kw) -> list[dict]:
        return res.get(namespace=self.namespace, **kw).to_dict()["items"]

    def deployments(self) -> list[dict]:
        return self._list(self.deployments_api)

    def services(self) -> list[dict]:
        return self._list(self.services_api)

    def pvcs(self) -> list[dict]:
        return self._list(self.pvcs_api)

    def managed_pods(self, owner: str | None = None) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        if owner:
            selector += f",{LABEL_DEPLOYMENT}={owner}"
        return self._list(self.pods, label_selector=selector)

    def deployment(self, name: str) -> dict | None:
        try:
            return self.deployments_api.get(name=name, namespace=self.namespace).to_dict()
        except NotFoundError:
            return None

    def service(self, name: str) -> dict | None:
        try:
            return self.services_api.get(name=name, namespace=self.namespace).to_dict()
        except NotFoundError:
            return None

    def events(self, name: str, reason: str | None = None) -> list[dict]:
        """Events about the LlamaDeployment `name`, oldest first."""
        items = [e for e in self._list(self.events_api)
                 if (e.get("involvedObject") or {}).get("name") == name
                 and (e.get("involvedObject") or {}).get("kind") == KIND
                 and (reason is None or e.get("reason") == reason)]
        return sorted(items, key=lambda e: int((e.get("metadata") or {}).get("resourceVersion") or 0))

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]


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


def crd_manifest_from_file() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())
