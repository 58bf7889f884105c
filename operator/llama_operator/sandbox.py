"""`llama-operator sandbox`: the operator against an API emulator on 127.0.0.1, with example nodes.

The emulator (llama_operator.emulator) is an API server only: nothing schedules or runs pods. The
sandbox adds a small stand-in for the scheduler and kubelet (`SimulatedKubelet`) that binds the pods of
the operator's Deployments to nodes that satisfy their node affinity and resource requests, marks them
running, and reports the Deployment's status, so a person sees phases move as in a cluster. It never
starts a model server. Only the sandbox and the tests use this module.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import yaml

from .api import API_VERSION, KIND
from .crd import crd_manifest
from .state import Settings
from .inventory import GPU_RESOURCES
from .ownership import LABEL_DEPLOYMENT, MANAGED_BY
from .runner import RunOptions, run_async
from .units import quantity_bytes, quantity_millis

#: The example LlamaDeployments and clusters the sandbox uses by default: package data, so an installed
#: package has them too (the repository's top-level examples/ links to these files).
EXAMPLES = Path(__file__).resolve().parent / "examples"


def shown(path: Path) -> str:
    """How the sandbox names a file it read: a bundled example by its place among the examples."""
    try:
        return f"examples/{path.resolve().relative_to(EXAMPLES).as_posix()}"
    except ValueError:
        return str(path)


def _client(kubeconfig: str, user_agent: str = "llama-operator-sandbox"):
    from kubernetes import config, dynamic

    api = config.new_client_from_config(config_file=kubeconfig)
    api.user_agent = user_agent  # tells the operator's requests apart from the sandbox's own
    return dynamic.DynamicClient(api)


def _requests(pod_spec: dict) -> tuple[int, int, int]:
    gpus = cpu = mem = 0
    for c in pod_spec.get("containers") or []:
        r = {**((c.get("resources") or {}).get("limits") or {}), **((c.get("resources") or {}).get("requests") or {})}
        gpus += sum(quantity_bytes(r.get(k, 0)) for k in GPU_RESOURCES)
        cpu += quantity_millis(r["cpu"]) if "cpu" in r else 0
        mem += quantity_bytes(r["memory"]) if "memory" in r else 0
    return gpus, cpu, mem


def _affinity_ok(pod_spec: dict, node: dict) -> bool:
    labels = node["metadata"].get("labels") or {}
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
    """Schedules and 'runs' the pods of llama-operator's Deployments, polling the API every `interval`."""

    def __init__(self, kubeconfig: str, interval: float = 0.3):
        self.dyn = _client(kubeconfig, user_agent="simulated-kubelet")
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="simulated-kubelet", daemon=True)

    def start(self) -> "SimulatedKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

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
        pods = pod_res.get(label_selector=",".join(f"{k}={v}" for k, v in MANAGED_BY.items())).to_dict()["items"]
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
        for p in pods:  # pods whose Deployment is gone (garbage collection of ReplicaSets' pods)
            owner = (p["metadata"]["namespace"], p["metadata"]["labels"].get(LABEL_DEPLOYMENT))
            if owner not in live:
                pod_res.delete(name=p["metadata"]["name"], namespace=p["metadata"]["namespace"])
        for d in deployments:
            self._sync(d, [p for p in pods if p["metadata"]["namespace"] == d["metadata"]["namespace"]
                           and p["metadata"]["labels"].get(LABEL_DEPLOYMENT) == d["metadata"]["labels"].get(
                               LABEL_DEPLOYMENT)], nodes, used, pod_res, dep_res)

    def _sync(self, d: dict, pods: list[dict], nodes: dict, used: dict, pod_res, dep_res) -> None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        template = d["spec"]["template"]
        revision = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        want = int(d["spec"].get("replicas", 1))
        current = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == revision]
        old = [p for p in pods if p not in current]
        need = _requests(template["spec"])
        for _ in range(max(0, want - len(current))):
            node = next((n for n, obj in sorted(nodes.items()) if _affinity_ok(template["spec"], obj) and all(
                used[n][i] + need[i] <= cap for i, cap in enumerate(_capacity(obj)))), None)
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": f"{name}-{revision}-", "namespace": ns,
                             "labels": {**template["metadata"]["labels"], "pod-template-hash": revision}},
                "spec": {**template["spec"], **({"nodeName": node} if node else {})},
                "status": {"phase": "Running" if node else "Pending"},
            }
            pod_res.create(body=pod, namespace=ns)
            if node:
                for i, v in enumerate(need):
                    used[node][i] += v
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


def _capacity(node: dict) -> tuple[int, int, int]:
    alloc = (node.get("status") or {}).get("allocatable") or {}
    return (sum(quantity_bytes(alloc.get(k, 0)) for k in GPU_RESOURCES),
            quantity_millis(alloc.get("cpu", 0)), quantity_bytes(alloc.get("memory", 0)))


class SandboxOperator:
    """The operator in a background thread, stoppable."""

    def __init__(self, kubeconfig: str, settings: Settings):
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.options = RunOptions(kubeconfig=kubeconfig, metrics_port=None, health_port=None, settings=settings,
                                  watch_timeout=60)
        self.state_holder: list = []
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        asyncio.run(run_async(self.options, stop_flag=self._stop, ready_flag=self._ready,
                              state_holder=self.state_holder))

    def start(self, timeout: float = 20) -> "SandboxOperator":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the operator did not become ready")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)


def printer_table(items: list[dict]) -> str:
    """What `kubectl get llamadeployments` prints (the CRD's printer columns)."""
    rows = [("NAME", "MODEL", "VARIANT", "RUNTIME", "READY", "PHASE")]
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        st = item.get("status") or {}
        rows.append((item["metadata"]["name"], item["spec"]["model"], st.get("variant") or "", st.get("runtime") or "",
                     st.get("ready") or "", st.get("phase") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def workload_summary(deployments: list[dict]) -> str:
    lines = []
    for d in sorted(deployments, key=lambda x: x["metadata"]["name"]):
        c = d["spec"]["template"]["spec"]["containers"][0]
        limits = (c.get("resources") or {}).get("limits") or {}
        gpus = next((f"{v} {k}" for k, v in limits.items() if k in GPU_RESOURCES), "no GPU")
        lines.append(f"{d['metadata']['name']}: {c['image']} ({gpus})")
        args = c.get("args") or []
        pairs = []
        i = 0
        while i < len(args):
            if i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                pairs.append(f"{args[i]} {args[i + 1]}")
                i += 2
            else:
                pairs.append(str(args[i]))
                i += 1
        lines.append("    " + " ".join([*(c.get("command") or []), *pairs]))
    return "\n".join(lines)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` every `interval` seconds until it is true or `timeout` has passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out = []
    for d in docs:
        out.extend(d["items"] if d.get("kind", "").endswith("List") else [d])
    return out


#: The Events of a deployment moving to another variant, which the scenario shows.
MOVE_REASONS = ("Upgraded", "Replanned", "UpgradePending")


def _events(api, reasons: tuple[str, ...]) -> list[str]:
    evs = api.resources.get(api_version="v1", kind="Event").get().to_dict()["items"]
    evs.sort(key=lambda e: (e.get("metadata") or {}).get("resourceVersion", "0").zfill(20))
    return [f"  {e['involvedObject']['name']}: {e['reason']}: {e['message']}" for e in evs
            if e.get("reason") in reasons]


def _scenario(api, ld_res, join: Path, items: Callable[[], list[dict]], upgrade_delay: float, timeout: float,
              out: Callable[[str], None]) -> None:
    """Nodes join, the deployments move up once the capacity has been stable; the nodes leave, they fall back."""
    node_res = api.resources.get(api_version="v1", kind="Node")
    joined = load_docs(join)
    seen = len(_events(api, MOVE_REASONS))
    before = {i["metadata"]["name"]: (i.get("status") or {}).get("variant") for i in items()}
    for n in joined:
        node_res.create(body={k: v for k, v in n.items() if k != "metadata"} | {
            "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
    out("")
    out(f"--- {len(joined)} node(s) join from {shown(join)}; upgrades wait {upgrade_delay:g}s for the capacity to "
        "stay ---")

    def moved() -> bool:
        now = items()
        changed = any((i.get("status") or {}).get("variant") != before.get(i["metadata"]["name"]) for i in now)
        calm = all((i.get("status") or {}).get("phase") in ("Ready", "Unschedulable", "Invalid")
                   and not (i.get("status") or {}).get("pendingChange") for i in now)
        return changed and calm

    wait_for(moved, timeout + upgrade_delay)
    time.sleep(1.0)
    out("$ kubectl get llamadeployments")
    out(printer_table(items()))
    out("Events:")
    out("\n".join(_events(api, MOVE_REASONS)[seen:]) or "  (none)")
    seen = len(_events(api, MOVE_REASONS))
    for n in joined:
        node_res.delete(name=n["metadata"]["name"])
    out("")
    out(f"--- the {len(joined)} node(s) leave again: deployments that ran there fall back at once ---")
    wait_for(lambda: all((i.get("status") or {}).get("variant") == before.get(i["metadata"]["name"])
                      and (i.get("status") or {}).get("phase") in ("Ready", "Unschedulable") for i in items()), timeout)
    out("$ kubectl get llamadeployments")
    out(printer_table(items()))
    out("Events:")
    out("\n".join(_events(api, MOVE_REASONS)[seen:]) or "  (none)")


def run_sandbox(cluster: Path, deployments: list[Path], *, serve: bool, kubeconfig_path: Path | None,
                upgrade_delay: float, timeout: float, join: Path | None = None,
                out: Callable[[str], None] = print) -> int:
    import logging

    from .emulator import EmulatorThread, declare_crd

    logging.getLogger("kopf").setLevel(logging.ERROR)  # the sandbox prints its own story
    with EmulatorThread() as emu:
        declare_crd(emu.emulator, crd_manifest())
        kubeconfig = str(emu.write_kubeconfig(kubeconfig_path or Path(tempfile.mkdtemp()) / "kubeconfig"))
        api = _client(kubeconfig)
        node_res = api.resources.get(api_version="v1", kind="Node")
        nodes = load_docs(cluster)
        for n in nodes:
            node_res.create(body={k: v for k, v in n.items() if k != "metadata"} | {
                "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
        out(f"API emulator at {emu.url}; loaded the CRD and {len(nodes)} nodes from {shown(cluster)}")
        kubelet = SimulatedKubelet(kubeconfig).start()
        operator = SandboxOperator(kubeconfig, Settings(upgrade_delay=timedelta(seconds=upgrade_delay),
                                                        resync_seconds=30)).start()
        ld_res = api.resources.get(api_version=API_VERSION, kind=KIND)
        names = []
        try:
            for path in deployments:
                for doc in load_docs(path):
                    if doc.get("kind") == KIND:
                        ns = doc["metadata"].get("namespace", "default")
                        ld_res.create(body=doc, namespace=ns)
                        names.append((ns, doc["metadata"]["name"]))
            out(f"applied {len(names)} LlamaDeployments from {', '.join(shown(p) for p in deployments)}")

            def items() -> list[dict]:
                return ld_res.get().to_dict()["items"]

            def settled() -> bool:
                return all((i.get("status") or {}).get("phase") in ("Ready", "Unschedulable", "Invalid", "Degraded")
                           for i in items()) and len(items()) == len(names)

            wait_for(settled, timeout)
            out("")
            out("$ kubectl get llamadeployments")
            out(printer_table(items()))
            out("")
            out("Rendered workloads (key arguments):")
            deps = api.resources.get(api_version="apps/v1", kind="Deployment").get().to_dict()["items"]
            out(workload_summary(deps))
            out("")
            out("Why (status.fallback.reason of deployments in fallback):")
            for i in sorted(items(), key=lambda i: i["metadata"]["name"]):
                st = i.get("status") or {}
                fb = st.get("fallback") or {}
                if fb.get("inForce") or st.get("phase") in ("Unschedulable", "Invalid"):
                    reason = fb.get("reason") or st.get("message") or ""
                    out(f"  {i['metadata']['name']}: " + reason.replace(" | ", "\n      "))
            if join is not None:
                _scenario(api, ld_res, join, items, upgrade_delay, timeout, out)
            if serve:
                out("")
                out(f"Serving until Ctrl-C. Try: kubectl --kubeconfig {kubeconfig} get llamadeployments")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return 0 if settled() else 1
        finally:
            operator.stop()
            kubelet.stop()
