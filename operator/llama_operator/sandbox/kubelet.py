"""A stand-in for the scheduler and kubelet, for the sandbox and the tests.

The emulator is an API server only: nothing schedules or runs pods. `SimulatedKubelet` binds the pods of
the operator's Deployments to nodes that satisfy their node affinity and resource requests, marks them
running, and reports the Deployment's status, so a person sees phases move as in a cluster. Each running
pod gets a loopback address of its own as its podIP, and a simulated model server there (engines.py)
answering /health and /metrics as the pod's engine would, so the SLO loop has latency and load to observe.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from datetime import datetime, timezone

from ..api import API_VERSION, KIND
from ..catalog import GPU_RESOURCES
from ..engines import EngineRelease, release, releases
from ..ownership import LABEL_DEPLOYMENT, MANAGED_BY, PORTS
from ..units import quantity_bytes, quantity_millis
from . import lws
from .engines import AddressPool, SimulatedEngines, traffic


#: llama.cpp's draft length when --spec-draft-n-max is not given (engines.yaml speculative.flagsSource: default 3).
LLAMACPP_DEFAULT_DRAFT_MAX = 3


def dynamic_client(kubeconfig: str, user_agent: str = "llama-operator-sandbox"):
    import urllib3
    from kubernetes import config, dynamic

    api = config.new_client_from_config(config_file=kubeconfig)
    api.user_agent = user_agent  # tells the operator's requests apart from the sandbox's own
    # Every request bounded: a request the emulator drops (one racing a kind being declared, say) fails and
    # the next round asks again, instead of holding the simulated kubelet for ever.
    api.rest_client.pool_manager.connection_pool_kw["timeout"] = urllib3.Timeout(connect=5, read=30)
    return dynamic.DynamicClient(api)


def _requests(pod_spec: dict) -> tuple[int, int, int]:
    gpus = cpu = mem = 0
    for c in pod_spec.get("containers") or []:
        r = {**((c.get("resources") or {}).get("limits") or {}), **((c.get("resources") or {}).get("requests") or {})}
        gpus += sum(quantity_bytes(r.get(k, 0)) for k in GPU_RESOURCES)
        cpu += quantity_millis(r["cpu"]) if "cpu" in r else 0
        mem += quantity_bytes(r["memory"]) if "memory" in r else 0
    return gpus, cpu, mem


def _tolerates(pod_spec: dict, taint: dict) -> bool:
    """Whether one of the pod's tolerations matches the taint (the scheduler's rule, for NoSchedule/NoExecute)."""
    for t in pod_spec.get("tolerations") or []:
        if t.get("key") and t["key"] != taint.get("key"):
            continue
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _affinity_ok(pod_spec: dict, node: dict) -> bool:
    """Whether the scheduler would place the pod on the node: its taints tolerated, its selector and affinity met."""
    labels = node["metadata"].get("labels") or {}
    taints = (node.get("spec") or {}).get("taints") or []
    if any(t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(pod_spec, t) for t in taints):
        return False
    if any(labels.get(k) != v for k, v in (pod_spec.get("nodeSelector") or {}).items()):
        return False
    terms = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    if not terms:
        return True
    for term in terms:
        ok = True
        for e in term.get("matchExpressions") or []:
            value = labels.get(e["key"])
            op = e["operator"]
            if op == "In" and value not in e.get("values", []) or op == "NotIn" and value in e.get("values", []) \
                    or op == "Exists" and value is None or op == "DoesNotExist" and value is not None:
                ok = False
        if ok:
            return True
    return False


class SimulatedKubelet:
    """Schedules and 'runs' the pods of llama-operator's Deployments, polling the API every `interval`;
    `engines` are the simulated model servers of the running pods."""

    def __init__(self, kubeconfig: str, interval: float = 0.3):
        self.dyn = dynamic_client(kubeconfig, user_agent="simulated-kubelet")
        self.interval = interval
        self.engines = SimulatedEngines()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="simulated-kubelet", daemon=True)

    def start(self) -> "SimulatedKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.engines.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the emulator may be stopping; try again
                pass
            self._stop.wait(self.interval)

    def step(self) -> None:
        api = self.dyn
        node_res = api.resources.get(api_version="v1", kind="Node")
        pod_res = api.resources.get(api_version="v1", kind="Pod")
        dep_res = api.resources.get(api_version="apps/v1", kind="Deployment")
        nodes = {n["metadata"]["name"]: n for n in node_res.get().to_dict()["items"]}
        # Every pod: a LeaderWorkerSet's workers are the operator's too, without its managed-by label (lws.py).
        pods = pod_res.get().to_dict()["items"]
        deployments = dep_res.get(label_selector=",".join(f"{k}={v}" for k, v in MANAGED_BY.items())).to_dict()["items"]
        # Pods on nodes that are gone are gone too (the node controller's eviction, at once).
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node and node not in nodes:
                pod_res.delete(name=p["metadata"]["name"], namespace=p["metadata"]["namespace"])
        pods = [p for p in pods if not (p.get("spec") or {}).get("nodeName") or p["spec"]["nodeName"] in nodes]
        used: dict[str, list[int]] = {name: [0, 0, 0] for name in nodes}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node:
                for i, v in enumerate(_requests(p["spec"])):
                    used[node][i] += v
        live = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in deployments}
        replica_set_pods = [p for p in pods if lws.NAME_LABEL not in (p["metadata"].get("labels") or {})
                            and (p["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT)]
        for p in replica_set_pods:  # pods whose Deployment is gone (garbage collection of ReplicaSets' pods)
            owner = (p["metadata"]["namespace"], p["metadata"]["labels"].get(LABEL_DEPLOYMENT))
            if owner not in live:
                pod_res.delete(name=p["metadata"]["name"], namespace=p["metadata"]["namespace"])
        for d in deployments:
            self._sync(d, [p for p in replica_set_pods if p["metadata"]["namespace"] == d["metadata"]["namespace"]
                           and p["metadata"]["labels"].get(LABEL_DEPLOYMENT) == d["metadata"]["labels"].get(
                               LABEL_DEPLOYMENT)], nodes, used, pod_res, dep_res)
        lws.sync_leaderworkersets(self.dyn, pods, lambda spec: _place(spec, nodes, used),
                                  lambda pod: bind_if_it_fits(pod, nodes, used, pod_res), pod_res)
        self._run_engines(pod_res)

    def _run_engines(self, pod_res) -> None:
        """Serve the engines of the running pods (stopping those of pods gone), record each pod's address
        and readiness in its status, and set what each serves from its LlamaDeployment."""
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        running = [p for p in pod_res.get(label_selector=selector).to_dict()["items"]
                   if (p.get("spec") or {}).get("nodeName") and (p.get("status") or {}).get("phase") == "Running"]
        self.engines.retire({(p["metadata"]["namespace"], p["metadata"]["name"]) for p in running})
        if not running:
            return
        owners = self._llamadeployments()
        serving: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        # pods that have an address first: one a pod already has is never handed to another
        for p in sorted(running, key=lambda p: _own_address(p) is None):
            ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
            owner = (ns, p["metadata"]["labels"].get(LABEL_DEPLOYMENT))
            rel = _release_of(p, owners.get(owner))
            if rel is None:
                continue
            address = self.engines.serve((ns, name), rel, _served_name(p, owner[1]), PORTS[rel.engine],
                                         _own_address(p), draft_length(_arguments(p), rel))
            if address is None:
                continue
            serving[owner].append((ns, name))
            status = p.get("status") or {}
            if status.get("podIP") != address or not _ready(status):
                pod_res.status.patch(body={"status": _running_status(p, address)}, name=name, namespace=ns,
                                     content_type="application/merge-patch+json")
        for owner, keys in serving.items():
            now = traffic(owners.get(owner), len(keys))
            for key in keys:
                self.engines.update(key, now)

    def _llamadeployments(self) -> dict[tuple[str, str], dict]:
        """Every LlamaDeployment by (namespace, name); none while the CRD is not declared."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            res = self.dyn.resources.get(api_version=API_VERSION, kind=KIND)
        except ResourceNotFoundError:
            return {}
        return {(i["metadata"]["namespace"], i["metadata"]["name"]): i for i in res.get().to_dict()["items"]}

    def _sync(self, d: dict, pods: list[dict], nodes: dict, used: dict, pod_res, dep_res) -> None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        template = d["spec"]["template"]
        revision = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        want = int(d["spec"].get("replicas", 1))
        current = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == revision]
        old = [p for p in pods if p not in current]
        for p in current:
            bind_if_it_fits(p, nodes, used, pod_res)  # still unscheduled: the scheduler's retry
        if len(current) > want:  # scaled in (the SLO loop does): unbound pods go first, then the newest
            newest = sorted(current, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
            for p in sorted(newest, key=lambda p: bool((p.get("spec") or {}).get("nodeName")))[:len(current) - want]:
                pod_res.delete(name=p["metadata"]["name"], namespace=ns)
                current.remove(p)
        for _ in range(max(0, want - len(current))):
            node = _place(template["spec"], nodes, used)
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": f"{name}-{revision}-", "namespace": ns,
                             "labels": {**template["metadata"]["labels"], "pod-template-hash": revision}},
                "spec": {**template["spec"], **({"nodeName": node} if node else {})},
                "status": {"phase": "Running" if node else "Pending"},
            }
            pod_res.create(body=pod, namespace=ns)
            if node:
                current.append(pod)
        ready_new = sum(1 for p in current if (p.get("spec") or {}).get("nodeName"))
        if ready_new >= want:  # the new revision is up: retire the old pods (maxUnavailable 0)
            for p in old:
                if p["metadata"].get("name"):
                    pod_res.delete(name=p["metadata"]["name"], namespace=ns)
            old = []
        ready_old = sum(1 for p in old if (p.get("spec") or {}).get("nodeName"))
        status = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": len(current) + len(old),
            "updatedReplicas": len(current),
            "readyReplicas": min(want, ready_new) + ready_old,
            "availableReplicas": min(want, ready_new) + ready_old,
            "conditions": [{"type": "Available", "status": "True" if ready_new + ready_old >= want else "False"}],
        }
        if d.get("status") != status:
            dep_res.status.patch(body={"status": status}, name=name, namespace=ns,
                                 content_type="application/merge-patch+json")


def _place(pod_spec: dict, nodes: dict, used: dict) -> str | None:
    """The first node (by name) the pod fits, its requests then counted as used there; None: none fits."""
    need = _requests(pod_spec)
    node = next((n for n, obj in sorted(nodes.items()) if _affinity_ok(pod_spec, obj) and all(
        used[n][i] + need[i] <= cap for i, cap in enumerate(_capacity(obj)))), None)
    if node is not None:
        for i, v in enumerate(need):
            used[node][i] += v
    return node


def bind_if_it_fits(pod: dict, nodes: dict, used: dict, pod_res) -> None:
    """Bind a pod still unscheduled to a node it fits now (the scheduler retrying); left as it is otherwise, so
    an unschedulable pod costs no writes."""
    if (pod.get("spec") or {}).get("nodeName") or not pod["metadata"].get("name"):
        return
    node = _place(pod["spec"], nodes, used)
    if node is not None:
        pod_res.patch(body={"spec": {"nodeName": node}}, name=pod["metadata"]["name"],
                      namespace=pod["metadata"]["namespace"], content_type="application/merge-patch+json")
        pod_res.status.patch(body={"status": {"phase": "Running"}}, name=pod["metadata"]["name"],
                             namespace=pod["metadata"]["namespace"], content_type="application/merge-patch+json")
        pod["spec"]["nodeName"] = node


def _capacity(node: dict) -> tuple[int, int, int]:
    alloc = (node.get("status") or {}).get("allocatable") or {}
    return (sum(quantity_bytes(alloc.get(k, 0)) for k in GPU_RESOURCES),
            quantity_millis(alloc.get("cpu", 0)), quantity_bytes(alloc.get("memory", 0)))


def _own_address(pod: dict) -> str | None:
    """The loopback address a pod was given earlier (by this kubelet or one before it), if any."""
    ip = (pod.get("status") or {}).get("podIP")
    return ip if ip and AddressPool.index(ip) is not None else None


def _release_of(pod: dict, owner: dict | None) -> EngineRelease | None:
    """The engine release the pod runs: the one whose image it runs, else the one its owner's plan names."""
    image = ((pod["spec"].get("containers") or [{}])[0]).get("image")
    found = next((r for r in releases() if image in r.images.values()), None)
    engine = (((owner or {}).get("status") or {}).get("plan") or {}).get("engine")
    return found or (release(engine) if engine else None)


def _arguments(pod: dict) -> list[str]:
    """The server container's command and arguments."""
    container = (pod["spec"].get("containers") or [{}])[0]
    return [str(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]


def draft_length(args: list[str], release: EngineRelease) -> int | None:
    """Tokens the server drafts per step, from its arguments as the renderer writes them (render/speculative.py):
    vLLM's --speculative-config JSON, llama.cpp's --spec-type draft-simple and --spec-draft-n-max; None: it
    decodes without a draft (or the release does not draft)."""
    support = release.speculative
    if support is None:
        return None
    args = [str(a) for a in args]

    def value(flag: str | None) -> str | None:
        return args[args.index(flag) + 1] if flag and flag in args[:-1] else None

    if release.engine == "vllm":
        config = value(support.flags.get("config"))
        try:
            k = json.loads(config).get("num_speculative_tokens") if config else None
        except (ValueError, AttributeError):
            return None
        return int(k) if isinstance(k, int) and k > 0 else None
    if support.method not in (value(support.flags.get("type")) or "").split(","):
        return None
    k = value(support.flags.get("draftMax"))
    return int(k) if k is not None and k.isdigit() and int(k) > 0 else LLAMACPP_DEFAULT_DRAFT_MAX


def _served_name(pod: dict, deployment: str) -> str:
    """The model name the server answers to (vLLM --served-model-name, llama.cpp --alias); the renderer
    passes the LlamaDeployment's name."""
    args = _arguments(pod)
    for flag in ("--served-model-name", "--alias"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return deployment


def _ready(status: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _running_status(pod: dict, address: str) -> dict:
    """A running pod's status as a kubelet reports it once the readiness probe (/health) passes."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "phase": "Running", "podIP": address, "podIPs": [{"ip": address}], "startTime": now,
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                       for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": c.get("name"), "image": c.get("image"), "ready": True, "started": True,
                               "restartCount": 0, "state": {"running": {"startedAt": now}}}
                              for c in pod["spec"].get("containers") or []],
    }
