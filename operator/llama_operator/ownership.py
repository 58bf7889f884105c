"""How the operator marks what it owns, and how it names and reaches it: label and annotation keys, the
content hash, the finalizer, the Service's port and endpoint, and the controller uid of an object.

A ground-floor module: the renderer writes these marks, the Writer and the shell read them, the sandbox's
kubelet selects by them. It imports nothing of the project.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

LABEL_DEPLOYMENT = "llama-operator.dev/llamadeployment"
LABEL_RUNTIME = "llama-operator.dev/runtime"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llama-operator"}
#: The content hash of a rendered object, written on it so a pass knows what it last rendered.
HASH_ANNOTATION = "llama-operator.dev/spec-hash"
#: On a workload (Deployment, LeaderWorkerSet): the GPU product its pods run on, so that a plan moving to the
#: other kind knows whether the new workload needs the GPUs the old one holds (passes.py).
GPU_PRODUCT_ANNOTATION = "llama-operator.dev/gpu-product"
FINALIZER = "llama-operator.dev/finalizer"
#: Label and annotation keys the operator writes; others' keys on its objects are theirs (kubectl's,
#: the Deployment controller's revision, `kubectl rollout restart`'s restartedAt), and are left alone.
OUR_LABEL_PREFIXES = ("llama-operator.dev/", "app.kubernetes.io/")
OUR_ANNOTATION_PREFIXES = ("llama-operator.dev/",)
#: The port of each runtime's Service and container.
PORTS = {"vllm": 8000, "llamacpp": 8080}


def selector_labels(name: str) -> dict[str, str]:
    """What the Deployment and Service select on: stable across runtimes and variants."""
    return {LABEL_DEPLOYMENT: name, **MANAGED_BY}


#: A LeaderWorkerSet is named `<name>-group` (the client Service has the LlamaDeployment's name, and LWS makes a
#: headless Service named like the LeaderWorkerSet). LWS names the StatefulSets it makes `<lws>` and
#: `<lws>-<group>`, and a StatefulSet's pods carry controller-revision-hash = `<statefulset>-<10 characters>`, a
#: label value of at most 63: so a StatefulSet name over 52 characters leaves its pods uncreatable
#: (kubernetes/kubernetes#64023). With group indices of up to 6 digits (LWS allows 1000000 replicas,
#: leaderworkerset_webhook.go:130-137), the LeaderWorkerSet's name is at most 52 - 1 - 6 = 45 characters, and
#: every pod name (a hostname, in LWS_LEADER_ADDRESS) stays under 63. docs/multinode.md.
GROUP_SUFFIX = "-group"
GROUP_NAME_MAX = (63 - 1 - 10) - 1 - 6
_GROUP_HASH_DIGITS = 8


def group_name(deployment: str) -> str:
    """The LeaderWorkerSet of a LlamaDeployment whose replicas span nodes: `<name>-group`, or for a name over
    39 characters its first 30 (without a trailing '-'), 8 hex digits of the whole name's sha256 and -group."""
    if len(deployment) + len(GROUP_SUFFIX) <= GROUP_NAME_MAX:
        return deployment + GROUP_SUFFIX
    keep = GROUP_NAME_MAX - len(GROUP_SUFFIX) - 1 - _GROUP_HASH_DIGITS
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:_GROUP_HASH_DIGITS]
    return f"{deployment[:keep].rstrip('-')}-{digest}{GROUP_SUFFIX}"


def workload_names(deployment: str) -> tuple[str, str]:
    """The names of a LlamaDeployment's workloads: its Deployment (and Service, claim...) and its
    LeaderWorkerSet."""
    return deployment, group_name(deployment)


def endpoint(name: str, namespace: str, runtime: str) -> str:
    """The OpenAI-compatible base URL of a deployment's Service, inside the cluster."""
    return f"http://{name}.{namespace}.svc:{PORTS[runtime]}/v1"


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of a rendered object's controller (the LlamaDeployment it is rendered for)."""
    return next((r.get("uid") for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal objects, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


#: hashlib lets go of the GIL to hash 2048 bytes or more in one call. The operator hashes in the event loop's
#: thread, and taking the GIL back from a busy writer thread can cost it milliseconds per hash; pieces
#: below that size give the same digest without letting go.
_HASH_PIECE = 2047


def sha256_hex(text: str) -> str:
    """The sha256 of `text` (UTF-8), in hex, computed without releasing the GIL (see _HASH_PIECE)."""
    data = text.encode()
    digest = hashlib.sha256()
    for start in range(0, len(data), _HASH_PIECE):
        digest.update(data[start:start + _HASH_PIECE])
    return digest.hexdigest()


def content_hash(obj: dict) -> str:
    """sha256 of the object as written, without its own hash annotation."""
    if obj.get("metadata"):
        meta = dict(obj["metadata"])
        annotations = {k: v for k, v in (meta.pop("annotations", None) or {}).items() if k != HASH_ANNOTATION}
        if annotations:  # no annotations and an empty map hash alike
            meta["annotations"] = annotations
        obj = {**obj, "metadata": meta}
    return sha256_hex(canonical(obj))[:16]
