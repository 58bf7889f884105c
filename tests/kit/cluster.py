"""A cluster as the tests drive it: the `kubernetes` dynamic client on a kubeconfig (the API emulator's, or
a real cluster's)."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import NotFoundError

from llama_operator.api import API_VERSION, KIND
from llama_operator.ownership import LABEL_DEPLOYMENT, MANAGED_BY

from kit.examples import cluster_nodes
from kit.poll import wait_until


class Cluster:
    """What a test does to a cluster: add and remove Nodes; create, read, patch, delete and wait for
    LlamaDeployments; read the objects the operator owns and the Events it posts.

    A method works in the namespace it is given, else in `namespace`; with neither (a Cluster whose tests
    each name their own), a listing covers every namespace. With `retry_errors`, a wait reads again when a
    read fails (a cluster answering with injected faults)."""

    def __init__(self, kubeconfig: str | Path, namespace: str | None = "default", *, retry_errors: bool = False):
        self.kubeconfig = str(kubeconfig)
        self.namespace = namespace
        self.retry_errors = retry_errors
        self.client = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
        self.api = dynamic.DynamicClient(self.client)
        self.nodes = self.resource("v1", "Node")
        self.pods = self.resource("v1", "Pod")
        self._llamas = None

    def close(self) -> None:
        self.client.close()

    def resource(self, api_version: str, kind: str):
        return self.api.resources.get(api_version=api_version, kind=kind)

    @property
    def llamas(self):
        if self._llamas is None:  # discovered lazily: the CRD may be applied by the test itself
            self._llamas = self.resource(API_VERSION, KIND)
        return self._llamas

    # --- nodes ---

    def add_nodes(self, source: str | list[dict]) -> list[str]:
        """Create Nodes from examples/clusters/<source>.yaml (or manifests); returns their names."""
        docs = source if isinstance(source, list) else cluster_nodes(f"{source}.yaml")
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

    def create(self, manifest: dict, namespace: str | None = None, *, name: str | None = None, **spec: Any) -> dict:
        """Create `manifest` in `namespace` (its own namespace, if it names one, is dropped), renamed to
        `name` if given, with its spec's fields replaced by `spec`'s."""
        body = copy.deepcopy(manifest)
        body.setdefault("metadata", {}).pop("namespace", None)
        if name:
            body["metadata"]["name"] = name
        if spec:
            body["spec"] = {**body["spec"], **spec}
        return self.llamas.create(body=body, namespace=namespace or self.namespace).to_dict()

    def get(self, name: str, namespace: str | None = None) -> dict | None:
        return self.read(API_VERSION, KIND, name, namespace)

    def status(self, name: str, namespace: str | None = None) -> dict:
        return (self.get(name, namespace) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict, namespace: str | None = None) -> dict:
        return self.llamas.patch(name=name, namespace=namespace or self.namespace, body={"spec": spec},
                                 content_type="application/merge-patch+json").to_dict()

    def delete(self, name: str, namespace: str | None = None) -> None:
        self.llamas.delete(name=name, namespace=namespace or self.namespace)

    def wait_status(self, name: str, predicate: Callable[[dict], Any], timeout: float, what: str, *,
                    namespace: str | None = None) -> dict:
        """Wait until `predicate` holds for the status of `name`; returns that status."""
        def check(obj: dict) -> dict | None:
            st = obj.get("status") or {}
            return st if predicate(st) else None
        return self._wait_for(name, namespace, check, timeout, what)

    def wait_phase(self, name: str, phase: str, timeout: float = 20, *, namespace: str | None = None,
                   generation: bool = False) -> dict:
        """Wait until the status of `name` is in `phase` (with `generation`: a status written for the object's
        current generation); returns that status."""
        def check(obj: dict) -> dict | None:
            st = obj.get("status") or {}
            if st.get("phase") != phase:
                return None
            if generation and st.get("observedGeneration") != obj["metadata"].get("generation"):
                return None
            return st
        return self._wait_for(name, namespace, check, timeout, f"{name} to be {phase}")

    def _wait_for(self, name: str, namespace: str | None, check: Callable[[dict], Any], timeout: float,
                  what: str) -> Any:
        """Poll `check` on the LlamaDeployment `name` (while it exists) until it answers; a timeout says
        the last status."""
        def checked() -> Any:
            obj = self.get(name, namespace)
            return check(obj) if obj is not None else None
        try:
            return wait_until(checked, timeout, what, retry_errors=self.retry_errors)
        except AssertionError as timed_out:
            try:
                last = self.status(name, namespace)
            except Exception as unreadable:  # noqa: BLE001 - a read during a fault: say so
                last = f"unreadable ({unreadable!r})"
            raise AssertionError(f"{timed_out}; last status of {name}: {last}") from None

    # --- any kind; what the operator owns ---

    def list(self, api_version: str, kind: str, namespace: str | None = None, **query: Any) -> list[dict]:
        namespace = namespace or self.namespace
        res = self.resource(api_version, kind)
        found = res.get(namespace=namespace, **query) if namespace else res.get(**query)
        return found.to_dict()["items"]

    def read(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace or self.namespace).to_dict()
        except NotFoundError:
            return None

    def deployments(self) -> list[dict]:
        return self.list("apps/v1", "Deployment")

    def services(self) -> list[dict]:
        return self.list("v1", "Service")

    def pvcs(self) -> list[dict]:
        return self.list("v1", "PersistentVolumeClaim")

    def managed_pods(self, owner: str | None = None) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        if owner:
            selector += f",{LABEL_DEPLOYMENT}={owner}"
        return self.list("v1", "Pod", label_selector=selector)

    def deployment(self, name: str) -> dict | None:
        return self.read("apps/v1", "Deployment", name)

    def service(self, name: str) -> dict | None:
        return self.read("v1", "Service", name)

    def events(self, name: str | None = None, reason: str | None = None, *, namespace: str | None = None) -> list[dict]:
        """The Events of the namespace, oldest first; with `name`, those about the LlamaDeployment `name`;
        with `reason`, those of that reason."""
        items = [e for e in self.list("v1", "Event", namespace)
                 if (name is None or ((e.get("involvedObject") or {}).get("name") == name
                                      and (e.get("involvedObject") or {}).get("kind") == KIND))
                 and (reason is None or e.get("reason") == reason)]
        return sorted(items, key=lambda e: int((e.get("metadata") or {}).get("resourceVersion") or 0))

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]
