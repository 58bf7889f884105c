"""Talking to the Kubernetes API: connection settings, and writing the objects a plan renders.

The operator reaches any API server through a kubeconfig or in-cluster config; kopf gets the same
credentials through a login handler. Writes go through the official client's dynamic API (in a worker
thread, so kopf's event loop keeps serving) and only happen when the rendered object's hash differs
from the one already on the server.
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import kopf
import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from .api import API_VERSION, KIND
from .render import HASH_ANNOTATION


USER_AGENT = "llama-operator"


class ConfigError(Exception):
    """No way to reach a cluster: neither in-cluster config nor a usable kubeconfig."""


def load_client_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In-cluster config when running in a pod, else the kubeconfig (`kubeconfig`, $KUBECONFIG, ~/.kube/config).

    $KUBECONFIG is read now, not when the kubernetes package was imported.
    """
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            return cfg
        except kubernetes.config.ConfigException:
            pass
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    path = path.split(os.pathsep)[0]
    try:
        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
    except (kubernetes.config.ConfigException, FileNotFoundError, OSError, TypeError) as e:
        raise ConfigError(f"cannot load kubeconfig {path}: {e}") from None
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client's configuration (token, client certificates, CA)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


class Writer:
    """Creates and patches the objects a LlamaDeployment owns, and its status."""

    def __init__(self, cfg: kubernetes.client.Configuration):
        self._api = kubernetes.client.ApiClient(cfg)
        self._api.user_agent = USER_AGENT
        self._dyn: dynamic.DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}

    def _resource(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self._resources:
            if self._dyn is None:
                self._dyn = dynamic.DynamicClient(self._api)
            self._resources[key] = self._dyn.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    # --- sync bodies, run in a worker thread ---

    def _get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def _apply(self, obj: dict) -> str:
        """Create, or patch when the content hash differs. Returns created | patched | unchanged."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        meta = obj["metadata"]
        res = self._resource(api_version, kind)
        live = self._get(api_version, kind, meta["namespace"], meta["name"])
        if live is None:
            try:
                res.create(body=obj, namespace=meta["namespace"])
                return "created"
            except ConflictError:  # created by an earlier pass whose answer we did not see
                live = self._get(api_version, kind, meta["namespace"], meta["name"])
                if live is None:
                    raise
        want = meta["annotations"][HASH_ANNOTATION]
        if ((live.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION) == want:
            return "unchanged"
        if kind == "PersistentVolumeClaim":
            return "unchanged"  # a claim's spec is immutable once bound; size changes are left to people
        body: Any
        if kind == "Deployment":
            # Replace the whole spec (JSON patch), so fields the new render drops really go away;
            # labels and annotations are merged key by key so others' keys survive.
            body = [{"op": "replace", "path": "/spec", "value": obj["spec"]}]
            for section in ("labels", "annotations"):
                if not (live.get("metadata") or {}).get(section):
                    body.append({"op": "add", "path": f"/metadata/{section}", "value": {}})
                for k, v in meta.get(section, {}).items():
                    body.append({"op": "add", "path": f"/metadata/{section}/{_escape(k)}", "value": v})
            res.patch(body=body, name=meta["name"], namespace=meta["namespace"],
                      content_type="application/json-patch+json")
        else:
            # Services keep server-assigned fields (clusterIP): merge only what we own.
            body = {"metadata": {"labels": meta.get("labels", {}), "annotations": meta.get("annotations", {})},
                    "spec": {k: obj["spec"][k] for k in ("type", "selector", "ports") if k in obj["spec"]}}
            res.patch(body=body, name=meta["name"], namespace=meta["namespace"],
                      content_type="application/merge-patch+json")
        return "patched"

    def _patch_status(self, namespace: str, name: str, status: dict) -> None:
        res = self._resource(API_VERSION, KIND)
        res.status.patch(body={"status": status}, name=name, namespace=namespace,
                         content_type="application/merge-patch+json")

    # --- async API for handlers ---

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        return await asyncio.to_thread(self._get, api_version, kind, namespace, name)

    async def apply(self, objects: list[dict]) -> list[str]:
        return [await asyncio.to_thread(self._apply, obj) for obj in objects]

    async def patch_status(self, namespace: str, name: str, status: dict) -> None:
        await asyncio.to_thread(self._patch_status, namespace, name, status)


def _escape(key: str) -> str:
    """JSON pointer escaping (RFC 6901) for label keys like llama-operator.dev/model."""
    return key.replace("~", "~0").replace("/", "~1")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
