"""Rendering a plan into Kubernetes objects: one Jinja2 template per runtime.

Pure: a LlamaDeployment's identity, its spec and the chosen plan in, manifests out. Each manifest
carries a hash of itself in the annotation `llama-operator.dev/spec-hash`, so the operator writes an
object only when what it would write differs from what it wrote before.

Every pod is hardened as far as its image allows (docs/security.md): no service-account token, the
RuntimeDefault seccomp profile, no privilege escalation, no capabilities, and a non-root user wherever
the release's image runs as one (`runAs` in catalog/engines.yaml), with $HOME and /tmp on sized
emptyDirs. Optional, from `spec.access`: the OpenAI API key from a Secret (an environment variable the
engine reads, never an argument) and a NetworkPolicy admitting only the listed clients.
"""
from __future__ import annotations

import collections
import contextvars
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..api import API_VERSION, KIND, LlamaDeploymentSpec
from ..catalog import (GPU, GPU_PRODUCT_LABEL, GPU_PRODUCT_LABELS, GPU_RESOURCE, Model, Quantization, load_catalog,
                       load_yaml)
from ..engines import IMAGE_FLAVOURS, EngineRelease, kernel_for, release, release_for
from ..estimate import LLAMACPP_GPU_THREADS, host_requests, weights_bytes
from ..lora import peft_adapter_bytes
from ..ownership import GPU_PRODUCT_ANNOTATION, HASH_ANNOTATION, LABEL_RUNTIME, PORTS, content_hash, selector_labels
from ..placement import model_server_tolerations
from ..status import ChosenPlan
from ..ownership import group_name
from .multinode import GROUP_NAME_MARK, multinode_context
from .sources import finetune_context, is_custom
from .speculative import draft_args, draft_weights_bytes

TEMPLATES = Path(__file__).resolve().parent
GiB = 2**30
#: The user every non-root model server runs as: the UID vLLM's image creates for itself (catalog/engines.yaml,
#: vllm-0.34.0 runAs), also given to images that run as any UID (llama.cpp), so a cache claim several
#: deployments share is written by one user. Its group is its own, not the image's GID 0 (see _security).
MODEL_SERVER_UID = 2000
#: $HOME of the model server: an emptyDir, so caches (torch.compile, Triton, FlashInfer, CUDA's JIT cache) are
#: writable by any UID and bounded. vLLM's is its image user's home directory.
HOME = {"vllm": "/home/vllm", "llamacpp": "/home/llama"}
#: sizeLimit of the $HOME and /tmp emptyDirs. vLLM compiles and caches kernels there (vllm/envs.py:
#: VLLM_CACHE_ROOT ~/.cache/vllm, VLLM_RPC_BASE_PATH the temp dir); llama.cpp only CUDA's JIT cache.
SCRATCH = {"vllm": (8 * 2**30, 4 * 2**30), "llamacpp": (2**30, 2**30)}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # YAML, not HTML; values go through tojson
    auto_reload=False,  # templates ship with the package; no stat() per render
)
#: libyaml's loader where PyYAML was built with it (the same objects, several times faster).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Parsing the rendered YAML costs more than rendering it, and deployments alike in shape render alike
# but for their values. So `tojson` sets each value aside and writes a placeholder; the text with
# placeholders is parsed once per distinct shape (cached), and the values are put back into a copy.
# Every value the templates emit goes through tojson as a whole scalar, so the objects are the same
# as parsing the fully rendered text.
_SLOT = "\x01"  # starts every placeholder; template text never contains it
_slots: contextvars.ContextVar[list[Any]] = contextvars.ContextVar("render_slots")


def _tojson_slot(value: Any) -> str:
    slots = _slots.get()
    slots.append(json.loads(json.dumps(value)))  # a copy, as JSON carries it (tuples become lists)
    return f'"\\x01{len(slots) - 1}"'


_env.filters["tojson"] = _tojson_slot


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> tuple[Any, ...]:
    return tuple(d for d in yaml.load_all(text, Loader=_Loader) if d)


def _fill(node: Any, slots: list[Any], owner: "Owner") -> Any:
    """A fresh copy of a parsed document, placeholders replaced by their values, with `owner` where the
    rendering had the stand-in owner (see render)."""
    if isinstance(node, dict):
        return {k: _fill(v, slots, owner) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, slots, owner) for v in node]
    if isinstance(node, str) and node.startswith(_SLOT):
        return _owned(slots[int(node[1:])], owner)
    return node


def _owned(value: Any, owner: "Owner") -> Any:
    """A copy of a slot's value with the stand-in owner's fields replaced by `owner`'s."""
    if isinstance(value, str):
        if _STAND_IN_MARK not in value:
            return value
        return value.replace(GROUP_NAME_MARK, group_name(owner.name)).replace(_STAND_IN.name, owner.name) \
            .replace(_STAND_IN.namespace, owner.namespace).replace(_STAND_IN.uid, owner.uid)
    if isinstance(value, dict):
        return {k: _owned(v, owner) for k, v in value.items()}
    if isinstance(value, list):
        return [_owned(v, owner) for v in value]
    return value


@dataclass(frozen=True)
class Images:
    """Where to pull the pinned engine images from: `llama-operator run --image PINNED=MIRROR` replaces an
    image of catalog/engines.yaml by a copy of it (a private registry, a digest). The copy must be the same
    release: the command line is the one that release accepts.

    `PINNED=MIRROR=UID[:GID]` also says the mirror runs as that non-root user (a copy of a root-only image
    with a USER added, docs/security.md): its pods then run as UID:GID (GID defaults to UID) under the
    "restricted" Pod Security Standard. Image references never contain `=`."""

    mirrors: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for pinned, mirror in self.mirrors:
            _mirror_user(pinned, mirror)  # raises on a malformed user

    def resolve(self, pinned: str) -> str:
        mirror = dict(self.mirrors).get(pinned)
        return pinned if mirror is None else mirror.partition("=")[0]

    def user(self, pinned: str) -> tuple[int, int] | None:
        """The non-root UID and GID the mirror of `pinned` runs as, when its flag says so."""
        mirror = dict(self.mirrors).get(pinned)
        return None if mirror is None else _mirror_user(pinned, mirror)


def _mirror_user(pinned: str, mirror: str) -> tuple[int, int] | None:
    image, eq, user = mirror.partition("=")
    if not eq:
        return None
    uid, colon, gid = user.partition(":")
    if not image or not uid.isdigit() or (colon and not gid.isdigit()) or int(uid) == 0:
        raise ValueError(f"--image {pinned}={mirror}: expected PINNED=MIRROR or PINNED=MIRROR=UID[:GID] with a "
                         "non-root numeric UID, e.g. =2000:2000")
    return int(uid), int(gid) if colon else int(uid)


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


# Deployments alike in spec and plan render alike but for their owner (names, labels, owner reference),
# and every pass renders again. So a spec and plan are rendered once with a stand-in owner, whose fields
# are marked strings the owner's values then replace (they reach the output only as slot values: names,
# labels, the claim name and the owner reference are strings the templates emit whole or within).
_STAND_IN_MARK = "\x02"
_STAND_IN = Owner(name="\x02name\x02", namespace="\x02namespace\x02", uid="\x02uid\x02")


class _BoundedCache:
    """A least-recently-used map bounded both by entries and by the bytes they hold (as the caller
    estimates them). The operator renders every deployment on every pass, but keeps nothing of a deleted
    LlamaDeployment for long: its entry ages out, and what the entries hold stays under `max_bytes`
    whatever the specs carry."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


#: Renders kept, keyed by a digest of the spec and plan (not their text: the key would hold the spec's
#: strings a second time), at most this many and this many bytes of rendered text and values.
_RENDERED_LIMIT = 512
_RENDERED_BYTES = 8 * 2**20
_rendered = _BoundedCache(_RENDERED_LIMIT, _RENDERED_BYTES)


def cache_claim_name(owner: Owner, spec: LlamaDeploymentSpec) -> str | None:
    cache = spec.source.cache
    if cache.existingClaim:
        return cache.existingClaim
    if cache.size is not None:
        return f"{owner.name}-model-cache"
    return None


def _startup_failure_threshold(weights: int) -> int:
    """Probe attempts (10 s apart) before a starting server is restarted: 10 minutes, plus 30 s per GiB of
    weights to download (a 35 MB/s link), so a 140 GiB model gets 80 minutes on its first start."""
    return math.ceil((600 + 30 * weights / GiB) / 10)


def _gpu_affinity(product: str, gpu: GPU | None) -> list[dict]:
    if gpu is None:  # a product the catalog does not know: match the label as the node has it
        return [{"key": GPU_PRODUCT_LABEL["nvidia"], "operator": "In", "values": [product]}]
    values = [gpu.product] + [a for a in gpu.aliases if "-" in a or "_" in a]
    return [{"key": gpu.label_key, "operator": "In", "values": values}]


def _cpu_affinity(plan: ChosenPlan) -> list[dict]:
    cpu = load_catalog().cpu
    expressions = [{"key": label, "operator": "DoesNotExist"} for label in GPU_PRODUCT_LABELS]
    bandwidth = plan.cpuMemoryBandwidthGbps
    if bandwidth is not None and bandwidth != cpu.memory_bandwidth_gbps:
        # Planned on nodes labelled faster than the default: stay on them.
        expressions.append({"key": cpu.bandwidth_label, "operator": "In", "values": [f"{bandwidth:g}"]})
    return expressions


def _quantity(n_bytes: float) -> str:
    return f"{math.ceil(n_bytes / 2**20)}Mi"


def _download_bytes(weights: int) -> int:
    """What the model cache holds once the weights are downloaded: the weights, a tenth more for the
    download's temporary files and the repository's small files (config, tokenizer), and 1 GiB."""
    return int(weights * 1.1) + GiB


def _pinned_image(rel, vendor: str) -> str:
    image = rel.image(vendor)
    if image is None:  # the planner never plans one; a plan kept from an older catalog may name one
        raise ValueError(f"{rel.title} has no pinned image for {vendor} GPUs")
    return image


@functools.cache
def _release_facts(release_id: str) -> dict[str, Any]:
    """A release's entry in catalog/engines.yaml as written: the facts engines.py does not model (runAs, apiKey)."""
    return next(r for r in load_yaml("engines.yaml")["releases"] if r["id"] == release_id)


def _security(rel: EngineRelease, vendor: str, user: tuple[int, int] | None) -> tuple[dict, dict]:
    """The pod's and the container's securityContext: the most restrictive the release's image runs under.

    Non-root as the image allows (engines.yaml `runAs` per image flavour): its own UID, or MODEL_SERVER_UID
    for an image that runs as any UID, always with a group of its own rather than the image's: vLLM's image
    user has GID 0, but nothing the server needs is readable only by group 0, while /etc/passwd and /etc/group
    are group-0-writable there (docker/Dockerfile:889-890 of 0.34.0). Root where the image prepares no other
    user, and on AMD GPUs: /dev/kfd and /dev/dri/renderD* are root:render 0660 on the node and the render
    group's id differs per node OS (docs/security.md). A mirror with its own user (Images.user) wins."""
    facts = _release_facts(rel.id)["runAs"]
    if user is None:
        image_user = facts.get(IMAGE_FLAVOURS[vendor], "root")
        if vendor != "amd" and image_user != "root":
            uid = MODEL_SERVER_UID if image_user == "any" else int(image_user)
            user = (uid, uid)
    pod: dict[str, Any] = {}
    if user is not None:
        uid, gid = user
        # OnRootMismatch: the kubelet gives the volumes to the group once, not file by file on every start.
        pod = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
               "fsGroupChangePolicy": "OnRootMismatch"}
    pod["seccompProfile"] = {"type": "RuntimeDefault"}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                 "readOnlyRootFilesystem": bool(facts.get("readOnlyRootFilesystem", False))}
    return pod, container


def _network_policy_peers(spec: LlamaDeploymentSpec) -> list[dict] | None:
    """The NetworkPolicy's `from`: one peer per allowed client (None: no NetworkPolicy)."""
    clients = spec.access.allowedClients
    if clients is None:
        return None
    peers = []
    for client in clients:
        peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(client.podLabels)} if client.podLabels else {}}
        if client.namespaceLabels is not None:  # {}: every namespace; unset: the deployment's own only
            peer["namespaceSelector"] = {"matchLabels": dict(client.namespaceLabels)} if client.namespaceLabels \
                else {}
        peers.append(peer)
    return peers


def _accelerator(plan: ChosenPlan) -> tuple[GPU | None, str]:
    """The plan's GPU as the catalog knows it (None on CPU, or for a product the catalog lacks), and the
    vendor whose image and GPU resource the pod uses: nvidia, amd, or cpu (nvidia for an unknown product)."""
    if plan.gpuProduct is None:
        return None, "cpu"
    gpu = load_catalog().find_gpu(plan.gpuProduct)
    return gpu, gpu.vendor if gpu else "nvidia"


def _labels(owner: Owner, plan: ChosenPlan) -> dict[str, str]:
    return {
        **selector_labels(owner.name),
        "app.kubernetes.io/name": "vllm" if plan.runtime == "vllm" else "llama-cpp",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": "model-server",
        LABEL_RUNTIME: plan.runtime,
        "llama-operator.dev/model": plan.model,
        "llama-operator.dev/quantization": plan.quantization,
    }


def _llamacpp_threads(plan: ChosenPlan) -> int:
    """llama.cpp's --threads: a few beside GPUs that hold every layer, the planned cores on CPU (0: vLLM)."""
    if plan.runtime == "vllm":
        return 0
    return LLAMACPP_GPU_THREADS if plan.gpuProduct is not None else (plan.cpuThreads or 1)


def _resources(plan: ChosenPlan, gpu_resource: str | None, threads: int, weights: int,
               claim: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The container's requests and limits: host CPU and memory as the planner counted them, the GPUs, and
    what the pod may write to the node's disk ($HOME and /tmp, and the weights when no claim holds them)."""
    gpus = plan.gpusPerReplica if gpu_resource is not None else 0
    cpu_millis, memory = host_requests(plan.runtime, gpus, threads, plan.predicted.memoryBytes)
    requests = {"cpu": str(cpu_millis // 1000) if cpu_millis % 1000 == 0 else f"{cpu_millis}m",
                "memory": _quantity(memory)}
    # vLLM and llama.cpp on GPUs may burst above their request; a CPU replica is capped at a quarter more.
    limits = {"memory": _quantity(memory * (2 if gpu_resource is not None else 1.25))}
    if gpu_resource is not None:
        requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    on_disk = sum(SCRATCH[plan.runtime])
    if claim is None:
        on_disk += _download_bytes(weights)
    requests["ephemeral-storage"] = _quantity(on_disk)
    return requests, limits


def _serving_release(plan: ChosenPlan, model: Model) -> EngineRelease:
    """The release the plan names, or, for a plan from an older catalog, its model's current release."""
    rel = release(plan.engine or "")
    if rel is None or not rel.serves(model):
        rel = release_for(model, plan.runtime)
    assert rel is not None, f"no engine release serves {model.id}"  # the planner never plans one
    return rel


def _kernel_args(plan: ChosenPlan, rel: EngineRelease, model: Model, quant: Quantization,
                 gpu: GPU | None) -> tuple[str, ...]:
    """vLLM's arguments selecting the kernel. The planner names the kernel (it saw the GPU's compute
    capability, even for a product the catalog lacks); a plan without one (an older operator's) gets the
    first this GPU can run."""
    if plan.runtime != "vllm":
        return ()
    kernel = rel.kernels.get(plan.kernel or "") or kernel_for(rel, model, quant, gpu)
    return kernel.args if kernel is not None else ()


def _weights_location(plan: ChosenPlan, model: Model) -> tuple[str, str | None]:
    """(repository, file in it): vLLM loads a whole repository, llama.cpp one GGUF file of one."""
    if plan.runtime == "vllm" or is_custom(plan.weightsSource):
        return plan.weightsSource, None
    assert model.gguf is not None
    return model.gguf.repo, plan.weightsSource[len(model.gguf.repo) + 1:]


def build_context(owner: Owner, spec: LlamaDeploymentSpec, plan: ChosenPlan, images: Images) -> dict[str, Any]:
    """What the templates read: every value of the objects, worked out here."""
    catalog = load_catalog()
    model = catalog.model(plan.model)
    quant = catalog.quantizations[plan.quantization]
    on_gpu = plan.gpuProduct is not None
    gpu, vendor = _accelerator(plan)
    gpu_resource = GPU_RESOURCE[vendor] if on_gpu else None
    weights = weights_bytes(model, quant) + draft_weights_bytes(plan)  # downloaded, and loaded, together
    threads = _llamacpp_threads(plan)
    gpu_layers = 999 if on_gpu else 0  # llama.cpp: every layer on the GPUs (and the draft's too)
    claim = cache_claim_name(owner, spec)
    requests, limits = _resources(plan, gpu_resource, threads, weights, claim)
    rel = _serving_release(plan, model)
    weights_repo, weights_file = _weights_location(plan, model)
    home_size, tmp_size = SCRATCH[plan.runtime]
    cache = spec.source.cache
    token = spec.source.hfTokenSecretRef
    pinned = _pinned_image(rel, vendor)
    pod_security, container_security = _security(rel, vendor, images.user(pinned))
    api_key = spec.access.apiKeySecretRef
    finetune = finetune_context(spec, plan, rel, quant)
    if finetune["custom_weights_path"]:  # a fine-tune: the engine loads the fetched or mounted copy
        weights_repo, weights_file = finetune["custom_weights_path"], None
    return {
        **finetune,
        **multinode_context(owner.name, plan, rel, _labels(owner, plan), stand_in=owner is _STAND_IN),
        "name": owner.name,
        "namespace": owner.namespace,
        "owner": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid},
        "labels": _labels(owner, plan),
        "selector": selector_labels(owner.name),
        "annotations": {GPU_PRODUCT_ANNOTATION: plan.gpuProduct} if plan.gpuProduct else {},
        "pod_annotations": {"llama-operator.dev/variant": f"{plan.model}/{plan.quantization}"},
        "replicas": spec.replicas,
        "image": images.resolve(pinned),
        "command": list(rel.command),
        "kernel_args": list(_kernel_args(plan, rel, model, quant, gpu)),
        "draft_args": draft_args(plan, rel, gpu_layers),
        "port": PORTS[plan.runtime],
        "weights_repo": weights_repo,
        "weights_file": weights_file,
        "served_model_name": owner.name,
        "context_length": spec.contextLength,
        "concurrency": spec.slo.concurrency,
        "gpus": plan.gpusPerReplica if on_gpu else 0,
        "gpu_layers": gpu_layers,
        "threads": threads,
        "gpu_memory_utilization": plan.gpuMemoryUtilization if plan.gpuMemoryUtilization is not None else 0.9,
        "kv_cache_dtype": plan.kvCacheDtype,
        "requests": requests,
        "limits": limits,
        "node_selector": dict(spec.placement.nodeSelector),
        "node_affinity": _gpu_affinity(plan.gpuProduct, gpu) if on_gpu else _cpu_affinity(plan),
        "tolerations": model_server_tolerations(spec, gpu_resource),
        "shm_size": "8Gi",
        "startup_failure_threshold": _startup_failure_threshold(weights),
        "hf_token_secret": token.name if token else None,
        "hf_token_key": token.key if token else None,
        "cache_claim_name": claim,
        "cache_claim_create": bool(cache.size is not None and not cache.existingClaim),
        "cache_size": str(cache.size) if cache.size is not None else None,
        "scratch_size": _quantity(_download_bytes(weights) + sum(
            peft_adapter_bytes(model.arch, a.rank, dtype_bytes=4) for a in spec.adapters)),
        "cache_storage_class": cache.storageClassName,
        # Several pods mount the claim (replicas, or the nodes of a replica): ReadWriteMany.
        "cache_access_mode": "ReadWriteOnce" if spec.replicas * plan.nodesPerReplica == 1 else "ReadWriteMany",
        "pod_security": pod_security,
        "container_security": container_security,
        "home": HOME[plan.runtime],
        "home_size": _quantity(home_size),
        "tmp_size": _quantity(tmp_size),
        "api_key_env": _release_facts(rel.id)["apiKey"]["env"] if api_key else None,
        "api_key_secret": api_key.name if api_key else None,
        "api_key_key": api_key.key if api_key else None,
        "network_policy_peers": _network_policy_peers(spec),
    }


def render(owner: Owner, spec: LlamaDeploymentSpec, plan: ChosenPlan, images: Images = Images()) -> list[dict]:
    """The objects one LlamaDeployment owns: Deployment (a LeaderWorkerSet when a replica spans several nodes),
    Service, and a model-cache claim and a NetworkPolicy when asked."""
    digest = hashlib.sha256(spec.model_dump_json().encode())
    digest.update(b"\0" + plan.model_dump_json().encode())
    key = (digest.digest(), images)
    shape = _rendered.get(key)
    if shape is None:
        template = _env.get_template("llamacpp.yaml.j2" if plan.runtime != "vllm" else
                                     "vllm.yaml.j2" if plan.nodesPerReplica == 1 else "vllm-lws.yaml.j2")
        slots: list[Any] = []
        token = _slots.set(slots)
        try:
            text = template.render(w=build_context(_STAND_IN, spec, plan, images))
        finally:
            _slots.reset(token)
        shape = (_parse(text), slots)
        # What the entry holds: the parsed shape (shared between renders of one shape, but counted), and
        # the values, as JSON text; Python objects take a few times that, and the bound is on this.
        _rendered.put(key, shape, len(text) + len(json.dumps(slots)))
    docs, slots = shape
    objects = [_fill(doc, slots, owner) for doc in docs]
    for obj in objects:
        obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = content_hash(obj)
    return objects

