"""The floor for bench_operator.py: a bare kopf operator making the same kind of writes as llama-operator.

For every LlamaDeployment created it writes a fixed Deployment and Service (the size and shape of what
llama-operator renders for an 8B vLLM deployment, named after the object) and patches a fixed status,
through the official client's dynamic API in a worker thread, as llama_operator.kube.Writer does. No
inventory, no node or pod watches, no planning, no rendering. What this costs is what kopf and the
API cost; the gap to llama-operator is ours.

    python benchmarks/bare_operator.py --kubeconfig K [--health-port P] [--cprofile out.prof]

Note: kopf's on.create is a change-detection handler, so after it kopf also patches the object once
(its last-handled-configuration annotation); llama-operator, built on daemons and event handlers,
does not pay that patch. The floor is therefore slightly pessimistic (a little high).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
import threading
from typing import Any

import kopf
import kubernetes
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ConflictError

GROUP, VERSION, PLURAL = "llama-operator.dev", "v1alpha1", "llamadeployments"
PREFIX = "llama-operator.dev"

_LABELS = {
    "app.kubernetes.io/component": "model-server",
    "app.kubernetes.io/managed-by": "llama-operator",
    "app.kubernetes.io/name": "vllm",
    "llama-operator.dev/model": "llama-3.1-8b-instruct",
    "llama-operator.dev/quantization": "bf16",
    "llama-operator.dev/runtime": "vllm",
}

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"annotations": {"llama-operator.dev/spec-hash": "043b80d872ac3f86"}},
    "spec": {
        "replicas": 1, "revisionHistoryLimit": 3,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {"annotations": {"llama-operator.dev/variant": "llama-3.1-8b-instruct/bf16"}},
            "spec": {
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                                           "values": ["NVIDIA-A100-SXM4-40GB", "A100-SXM4-40GB"]}]}]}}},
                "tolerations": [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}],
                "containers": [{
                    "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                    "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--host", "0.0.0.0", "--port", "8000",
                             "--max-model-len", "8192", "--tensor-parallel-size", "1",
                             "--gpu-memory-utilization", "0.67", "--max-num-seqs", "8"],
                    "env": [{"name": "HF_HOME", "value": "/models"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}],
                    "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "3", "memory": "12288Mi", "nvidia.com/gpu": "1"},
                                  "limits": {"memory": "24576Mi", "nvidia.com/gpu": "1"}},
                    "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                                     "failureThreshold": 105},
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                                       "failureThreshold": 3},
                    "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 20,
                                      "timeoutSeconds": 5, "failureThreshold": 3},
                    "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
                }],
                "volumes": [{"name": "model-cache", "emptyDir": {}}],
            },
        },
    },
}

SERVICE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"annotations": {"llama-operator.dev/spec-hash": "d49fff6c17976cd0"}},
    "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]},
}

STATUS: dict[str, Any] = {
    "phase": "Progressing", "observedGeneration": 1, "variant": "llama-3.1-8b-instruct/bf16", "runtime": "vllm",
    "ready": "0/1", "message": "fixed status written by the bare benchmark operator",
    "plan": {"model": "llama-3.1-8b-instruct", "quantization": "bf16", "runtime": "vllm",
             "gpuProduct": "NVIDIA-A100-SXM4-40GB", "gpusPerReplica": 1, "kvCacheDtype": "auto",
             "weightsSource": "meta-llama/Llama-3.1-8B-Instruct", "gpuMemoryUtilization": 0.67,
             "predicted": {"memoryBytes": 19000000000, "ttftSeconds": 0.12, "tpotSeconds": 0.02}},
    "conditions": [{"type": "Ready", "status": "False", "reason": "Progressing", "message": "0/1 replicas ready"}],
}


def _objects(name: str, namespace: str, uid: str) -> list[dict]:
    labels = {**_LABELS, "app.kubernetes.io/instance": name, "llama-operator.dev/llamadeployment": name}
    selector = {"app.kubernetes.io/managed-by": "llama-operator", "llama-operator.dev/llamadeployment": name}
    owner = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaDeployment", "name": name, "uid": uid,
              "controller": True, "blockOwnerDeletion": True}]
    dep, svc = copy.deepcopy(DEPLOYMENT), copy.deepcopy(SERVICE)
    for obj in (dep, svc):
        obj["metadata"].update(name=name, namespace=namespace, labels=dict(labels), ownerReferences=owner)
    dep["spec"]["selector"] = {"matchLabels": selector}
    dep["spec"]["template"]["metadata"]["labels"] = dict(labels)
    svc["spec"]["selector"] = selector
    return [dep, svc]


class BareWriter:
    def __init__(self) -> None:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
        self._dyn = dynamic.DynamicClient(kubernetes.client.ApiClient(cfg))
        self._res: dict[tuple[str, str], Any] = {}
        self._discovery = threading.Lock()  # the discovery cache is not thread-safe (as kube.Writer)

    def _resource(self, api_version: str, kind: str):
        with self._discovery:
            if (api_version, kind) not in self._res:
                self._res[(api_version, kind)] = self._dyn.resources.get(api_version=api_version, kind=kind)
            return self._res[(api_version, kind)]

    def create(self, obj: dict) -> None:
        try:
            self._resource(obj["apiVersion"], obj["kind"]).create(body=obj, namespace=obj["metadata"]["namespace"])
        except ConflictError:
            pass

    def patch_status(self, namespace: str, name: str) -> None:
        self._resource(f"{GROUP}/{VERSION}", "LlamaDeployment").status.patch(
            body={"status": STATUS}, name=name, namespace=namespace, content_type="application/merge-patch+json")


def build_registry() -> tuple[kopf.OperatorRegistry, dict]:
    registry = kopf.OperatorRegistry()
    holder: dict = {}

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.watching.server_timeout = 300
        settings.posting.level = logging.WARNING
        holder["writer"] = BareWriter()

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    async def create(name: str, namespace: str, uid: str, **_):
        writer: BareWriter = holder["writer"]
        for obj in _objects(name, namespace, uid):
            await asyncio.to_thread(writer.create, obj)
        await asyncio.to_thread(writer.patch_status, namespace, name)

    return registry, holder


async def main_async(health_port: int | None) -> None:
    registry, _ = build_registry()
    await kopf.operator(
        registry=registry,
        clusterwide=True,
        standalone=True,
        liveness_endpoint=f"http://127.0.0.1:{health_port}/healthz" if health_port else None,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bare kopf operator (benchmark floor)")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--health-port", type=int, default=None)
    ap.add_argument("--cprofile", help="write cProfile stats of the main thread here on exit")
    args = ap.parse_args(argv)
    os.environ["KUBECONFIG"] = args.kubeconfig
    kopf.configure(verbose=False, log_format=kopf.LogFormat.FULL)
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        try:
            prof.runcall(asyncio.run, main_async(args.health_port))
        finally:
            prof.dump_stats(args.cprofile)
    else:
        asyncio.run(main_async(args.health_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
