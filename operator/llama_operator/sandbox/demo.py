"""`llama-operator sandbox`: the operator against the API emulator on 127.0.0.1, with example nodes.

The operator runs in a thread (`SandboxOperator`) beside the emulator and a `SimulatedKubelet`; the demo
applies example LlamaDeployments, prints what `kubectl get llamadeployments` would, the workloads
rendered and why some fell back, then plays a scenario: nodes join (deployments move up once the
capacity has stayed), the nodes leave (they fall back at once); then the SLO loop (docs/slo-loop.md) on
examples/slo-loop.yaml: a slow engine corrected and re-planned, a busy one scaled out, one left alone; then
fine-tuned models (docs/adapters.md) on examples/adapters.yaml: LoRA adapters and a full fine-tune. On a sandbox
of their own (cli.py): speculative decoding (docs/speculative.md) on examples/speculative.yaml, two deployments
planned with a draft, the SLO loop turning off the one whose engine accepts too few drafted tokens (DraftOff) and
re-planning it; then replicas across nodes (docs/multinode.md).
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from ..api import API_VERSION, KIND
from ..catalog import GPU_RESOURCES
from ..ownership import LABEL_DEPLOYMENT
from ..crd import crd_manifest
from ..runner import RunOptions, run_async
from ..slo import SloSettings
from ..state import Settings
from .emulator import declare_crd
from . import lws
from .engines import DRAFT_ACCEPTANCE
from .kubelet import SimulatedKubelet, dynamic_client
from .server import EmulatorThread
from .show import (EXAMPLES, apply_file, create_nodes, display_path, events, load_docs, printer_table,  # noqa: F401
                   wait_for, workload_summary)  # EXAMPLES, load_docs, wait_for: the sandbox's, for cli.py and tests


class SandboxOperator:
    """The operator in a background thread, stoppable."""

    def __init__(self, kubeconfig: str, settings: Settings, slo_source: str = "off"):
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.options = RunOptions(kubeconfig=kubeconfig, metrics_port=None, health_port=None, settings=settings,
                                  watch_timeout=60, slo_source=slo_source)
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


#: The SLO loop with short windows, so a breach and the reaction to it show within a minute (docs/slo-loop.md).
SANDBOX_SLO = SloSettings(window=timedelta(seconds=6), cooldown=timedelta(seconds=10),
                          calm_window=timedelta(seconds=20), correction_ttl=timedelta(hours=1), min_samples=5)
SANDBOX_SLO_INTERVAL = 1.0

#: The Events of a deployment moving to another variant, which the scenario shows.
MOVE_REASONS = ("Upgraded", "Replanned", "UpgradePending")


def _scenario(api, join: Path, items: Callable[[], list[dict]], upgrade_delay: float, timeout: float) -> None:
    """Nodes join, the deployments move up once the capacity has been stable; the nodes leave, they fall back."""
    node_res = api.resources.get(api_version="v1", kind="Node")
    joined = load_docs(join)
    seen = len(events(api, MOVE_REASONS))
    before = {i["metadata"]["name"]: (i.get("status") or {}).get("variant") for i in items()}
    for n in joined:
        node_res.create(body={k: v for k, v in n.items() if k != "metadata"} | {
            "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
    print()
    print(f"--- {len(joined)} node(s) join from {display_path(join)}; upgrades wait {upgrade_delay:g}s for the "
          "capacity to stay ---")

    def moved() -> bool:
        now = items()
        changed = any((i.get("status") or {}).get("variant") != before.get(i["metadata"]["name"]) for i in now)
        calm = all((i.get("status") or {}).get("phase") in ("Ready", "Unschedulable", "Invalid")
                   and not (i.get("status") or {}).get("pendingChange") for i in now)
        return changed and calm

    wait_for(moved, timeout + upgrade_delay)
    time.sleep(1.0)
    print("$ kubectl get llamadeployments")
    print(printer_table(items()))
    print("Events:")
    print("\n".join(events(api, MOVE_REASONS)[seen:]) or "  (none)")
    seen = len(events(api, MOVE_REASONS))
    for n in joined:
        node_res.delete(name=n["metadata"]["name"])
    print()
    print(f"--- the {len(joined)} node(s) leave again: deployments that ran there fall back at once ---")
    wait_for(lambda: all((i.get("status") or {}).get("variant") == before.get(i["metadata"]["name"])
                         and (i.get("status") or {}).get("phase") in ("Ready", "Unschedulable") for i in items()), timeout)
    print("$ kubectl get llamadeployments")
    print(printer_table(items()))
    print("Events:")
    print("\n".join(events(api, MOVE_REASONS)[seen:]) or "  (none)")


#: The SLO loop's Events, which the SLO scenario shows.
SLO_REASONS = ("SLOBreached", "ScaledOut", "ScaledIn", "Replanned", "Degraded")
LATENCY_FACTOR = "sandbox.llama-operator.dev/latency-factor"
LOAD_FACTOR = "sandbox.llama-operator.dev/load-factor"


def _slo_settled(item: dict) -> bool:
    """Whether the SLO loop has done what the scenario shows for this deployment."""
    st = item.get("status") or {}
    notes = (item["metadata"].get("annotations") or {})
    met = next((c for c in st.get("conditions") or [] if c.get("type") == "SLOMet"), {})
    if st.get("phase") not in ("Ready", "Degraded"):
        return False
    if notes.get(LATENCY_FACTOR, "1") not in ("1", "1.0"):  # corrected, and observed again since
        return bool(st.get("corrections")) and met.get("reason") not in (None, "NoData")
    if notes.get(LOAD_FACTOR, "1") not in ("1", "1.0"):
        return ((st.get("slo") or {}).get("replicas") or 1) > item["spec"].get("replicas", 1)
    return met.get("status") == "True"


def _slo_table(items: list[dict]) -> str:
    rows = [("NAME", "VARIANT", "READY", "SLOMET", "OBSERVED TTFT / TPOT", "TARGET")]
    for i in sorted(items, key=lambda i: i["metadata"]["name"]):
        st = i.get("status") or {}
        ob = st.get("observed") or {}
        met = next((c for c in st.get("conditions") or [] if c.get("type") == "SLOMet"), {})
        word = "mean" if ob.get("statistic") == "mean from counters" else "p95"
        seen = (f"{word} {ob['ttftP95Seconds']:.3g}s / {ob['tpotP95Seconds'] * 1000:.3g}ms"
                if ob.get("ttftP95Seconds") is not None and ob.get("tpotP95Seconds") is not None else "-")
        rows.append((i["metadata"]["name"], st.get("variant") or "", st.get("ready") or "",
                     f"{met.get('status', '')} {met.get('reason', '')}".strip(), seen,
                     f"{i['spec']['slo']['ttftP95']} / {i['spec']['slo']['tpotP95']}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _slo_scenario(api, ld_res, deployments: Path, nodes: Path, timeout: float) -> bool:
    """The SLO loop: deployments whose simulated engines run slower or busier than planned; whether each did
    what the scenario shows in time."""
    create_nodes(api.resources.get(api_version="v1", kind="Node"), nodes)
    names = apply_file(ld_res, deployments)
    print()
    print(f"--- the SLO loop: {', '.join(sorted(names))} from {display_path(deployments)} on the nodes of "
          f"{display_path(nodes)}; their simulated engines serve /metrics on 127.0.x.y with latency = the plan's "
          f"estimate x {LATENCY_FACTOR} and load = slo.concurrency x replicas x {LOAD_FACTOR}; the operator "
          f"observes every {SANDBOX_SLO_INTERVAL:g}s over a {SANDBOX_SLO.window.total_seconds():g}s window ---")

    def ours() -> list[dict]:
        return [i for i in ld_res.get().to_dict()["items"] if i["metadata"]["name"] in names]

    settled = wait_for(lambda: all(_slo_settled(i) for i in ours()), timeout)
    print("$ kubectl get llamadeployments (with status.observed and the SLOMet condition)")
    print(_slo_table(ours()))
    print("Events:")
    print("\n".join(line for line in events(api, SLO_REASONS) if line.split(":")[0].strip() in names) or "  (none)")
    for i in sorted(ours(), key=lambda i: i["metadata"]["name"]):
        for c in (i.get("status") or {}).get("corrections") or []:
            print(f"  {i['metadata']['name']}: correction {c['variant']} on {c['hardware']}: TTFT x{c['ttftFactor']:g}, "
                  f"TPOT x{c['tpotFactor']:g} ({c['samples']} samples)")
    return settled


def _finetune_scenario(api, ld_res, deployments: Path, nodes: Path, timeout: float) -> bool:
    """Fine-tuned models (docs/adapters.md): LoRA adapters and a full fine-tune on their own nodes; whether
    every one of them was planned and rolled out in time."""
    create_nodes(api.resources.get(api_version="v1", kind="Node"), nodes)
    names = apply_file(ld_res, deployments)
    print()
    print(f"--- fine-tuned models: {', '.join(sorted(names))} from {display_path(deployments)} on the nodes of "
          f"{display_path(nodes)}; adapters and custom weights pin the base model ---")

    def ours() -> list[dict]:
        return [i for i in ld_res.get().to_dict()["items"] if i["metadata"]["name"] in names]

    settled = wait_for(lambda: len(ours()) == len(names) and all(
        (i.get("status") or {}).get("phase") == "Ready" for i in ours()), timeout)
    print("$ kubectl get llamadeployments")
    print(printer_table(ours()))
    print()
    print("Rendered workloads (key arguments):")
    deps = [d for d in api.resources.get(api_version="apps/v1", kind="Deployment").get().to_dict()["items"]
            if d["metadata"]["name"] in names]
    for d in sorted(deps, key=lambda d: d["metadata"]["name"]):
        print(workload_summary([d]))
        for init in d["spec"]["template"]["spec"].get("initContainers") or []:
            fetched = init["command"][4:]
            repos = [f"{fetched[i + 1]}@{fetched[i + 2]}" + (f"/{fetched[i + 3]}" if fetched[i + 3] else "")
                     for i in range(0, len(fetched), 4)]
            print(f"    init container {init['name']} fetches into the model cache: {', '.join(repos)}")
    print()
    print("Adapters (status.adapters) and why:")
    for i in sorted(ours(), key=lambda i: i["metadata"]["name"]):
        st = i.get("status") or {}
        for a in st.get("adapters") or []:
            print(f"  {i['metadata']['name']}: {a['name']} [{a['state']}] {a['call']}")
        reason = (st.get("fallback") or {}).get("reason")
        if reason:
            print(f"  {i['metadata']['name']}: " + reason.replace(" | ", "\n      "))
    return settled


#: The Events of a deployment's draft, which the speculative scenario shows.
DRAFT_REASONS = ("Planned", "DraftOff", "Replanned", "UpgradePending", "Upgraded", "SLOBreached")


def _speculative_config(api, names: set[str]) -> list[str]:
    """Each Deployment's draft arguments, as rendered (vLLM --speculative-config, llama.cpp --spec-*)."""
    lines = []
    for d in sorted(api.resources.get(api_version="apps/v1", kind="Deployment").get().to_dict()["items"],
                    key=lambda d: d["metadata"]["name"]):
        if d["metadata"]["name"] in names:
            args = [str(a) for a in d["spec"]["template"]["spec"]["containers"][0].get("args") or []]
            draft = [f"{a} {b}" for a, b in zip(args, args[1:]) if a.startswith(("--speculative", "--spec-"))]
            lines.append(f"  {d['metadata']['name']}: {' '.join(draft) or 'no draft'}")
    return lines


def _draft_figures(item: dict, rates: dict[str, float]) -> str:
    """status.plan.speculative and status.observed's draft figures (or status.slo.draftsOff) of one deployment."""
    st = item.get("status") or {}
    s, ob, name = (st.get("plan") or {}).get("speculative"), st.get("observed") or {}, item["metadata"]["name"]
    if s is None:
        seen = f"; last observed {rates[name]:.0%} of drafted tokens accepted" if name in rates else ""
        return f"  {name}: {st.get('variant')}, no draft{seen}; status.slo.draftsOff: " \
               f"{(st.get('slo') or {}).get('draftsOff') or '-'}"
    rate, drafted = ob.get("draftAcceptanceRate"), ob.get("draftedTokensPerSecond")
    least = f"{s['minAcceptanceRate']:.0%}" if s.get("minAcceptanceRate") is not None else "-"
    return (f"  {name}: {st.get('variant')}, {s['numSpeculativeTokens']} tokens per step, predicted "
            f"{s['predictedSpeedup']:g}x at {s['acceptance']:g} per token ({s.get('acceptanceSource') or '-'}); pays "
            f"above {least} accepted, up to {s.get('paysUpToConcurrency') or '-'} requests per replica; observed "
            + (f"{rate:.0%} accepted, {drafted or 0:.4g} drafted tokens/s" if rate is not None else "-"))


def _speculative_scenario(api, ld_res, deployments: Path, nodes: Path, timeout: float) -> bool:
    """Speculative decoding (docs/speculative.md): deployments planned with a draft; the one whose engine accepts
    few drafted tokens (DRAFT_ACCEPTANCE) has its draft turned off by the SLO loop and re-planned, the others keep
    theirs. Whether both steps happened in time."""
    create_nodes(api.resources.get(api_version="v1", kind="Node"), nodes)
    names = apply_file(ld_res, deployments)
    print()
    print(f"--- speculative decoding: {', '.join(sorted(names))} from {display_path(deployments)} on the nodes of "
          f"{display_path(nodes)}; their simulated engines count drafted and accepted tokens at the plan's "
          f"predicted acceptance, or {DRAFT_ACCEPTANCE} ---")

    def ours() -> list[dict]:
        return [i for i in ld_res.get().to_dict()["items"] if i["metadata"]["name"] in names]

    def poor(item: dict) -> bool:  # the engine accepts fewer drafted tokens than the plan predicts
        return DRAFT_ACCEPTANCE in (item["metadata"].get("annotations") or {})

    first: list[dict] = []  # the deployments as they were when all served with a draft

    def drafting() -> bool:
        items = ours()
        if len(items) == len(names) and all((i.get("status") or {}).get("phase") == "Ready" and (
                (i.get("status") or {}).get("plan") or {}).get("speculative") for i in items):
            first[:] = items
        return bool(first)

    planned = wait_for(drafting, timeout, interval=0.5)
    print("$ kubectl get llamadeployments")
    print(printer_table(first or ours()))
    print("Rendered draft arguments:")
    print("\n".join(_speculative_config(api, names)))
    print(f"--- the SLO loop counts accepted over drafted tokens every {SANDBOX_SLO_INTERVAL:g}s over a "
          f"{SANDBOX_SLO.window.total_seconds():g}s window; below the plan's minAcceptanceRate for the window, it "
          "turns the draft off ---")
    rates: dict[str, float] = {}

    def settled_one(item: dict) -> bool:
        st, name = item.get("status") or {}, item["metadata"]["name"]
        if ((st.get("observed") or {}).get("draftAcceptanceRate")) is not None:
            rates[name] = st["observed"]["draftAcceptanceRate"]
        off, drafts = bool((st.get("slo") or {}).get("draftsOff")), bool((st.get("plan") or {}).get("speculative"))
        ready = st.get("phase") == "Ready" and not st.get("pendingChange")
        return ready and off and not drafts if poor(item) else ready and drafts and not off and name in rates

    # From the deployments' status only: listing every Event at each poll would load the emulator.
    done = wait_for(lambda: all([settled_one(i) for i in ours()]), timeout, interval=0.5)
    print("$ kubectl get llamadeployments")
    print(printer_table(ours()))
    print("Events:")
    shown = [line for line in events(api, DRAFT_REASONS) if line.split(":")[0].strip() in names]
    print("\n".join(shown) or "  (none)")
    print("Drafts (status.plan.speculative, status.observed):")
    print("\n".join(_draft_figures(i, rates) for i in sorted(ours(), key=lambda i: i["metadata"]["name"])))
    off = {line.split(":")[0].strip() for line in shown if line.split(":")[1].strip() == "DraftOff"}
    return planned and done and off == {i["metadata"]["name"] for i in first if poor(i)}


def _install_leaderworkerset(emulator, api) -> None:
    """LeaderWorkerSet, as `kubectl apply` of its release makes it: the kind served, its CRD listed (which the
    operator watches to know it may plan replicas across nodes); sandbox/lws.py plays its controller."""
    declare_crd(emulator, lws.minimal_crd())
    api.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition").create(
        body=lws.minimal_crd())


def _group_summary(api, names: set[str]) -> str:
    """What `kubectl get leaderworkersets` and the leader's and a worker's arguments would show."""
    lines = []
    for s in api.resources.get(api_version=lws.API_VERSION, kind=lws.KIND).get().to_dict()["items"]:
        if (s["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT) not in names:
            continue
        t = s["spec"]["leaderWorkerTemplate"]
        st = s.get("status") or {}
        lines.append(f"LeaderWorkerSet {s['metadata']['name']}: {s['spec'].get('replicas', 1)} group(s) of "
                     f"{t.get('size')} pods, {st.get('readyReplicas', 0)} ready")
        for role, template in (("leader", t.get("leaderTemplate") or t["workerTemplate"]),
                               ("worker", t["workerTemplate"])):
            c = template["spec"]["containers"][0]
            gpus = next((f"{v} {k}" for k, v in ((c.get("resources") or {}).get("limits") or {}).items()
                         if k in GPU_RESOURCES), "no GPU")
            lines.append(f"    {role} ({gpus}): " + " ".join(str(a) for a in [*(c.get("command") or []),
                                                                               *(c.get("args") or [])]))
    return "\n".join(lines) or "  (no LeaderWorkerSet)"


def _multinode_scenario(emulator, api, ld_res, deployments: Path, pair: Path, timeout: float) -> bool:
    """Replicas that span nodes (docs/multinode.md): 405B in bf16 needs two 8x H100 nodes; they join, the
    operator runs it as one LeaderWorkerSet group; one leaves, it falls back at once to FP8 on the node left,
    a Deployment, and removes the group once that serves. Whether each step happened in time."""
    node_res = api.resources.get(api_version="v1", kind="Node")
    _install_leaderworkerset(emulator, api)
    names = apply_file(ld_res, deployments)

    def ours() -> list[dict]:
        return [i for i in ld_res.get().to_dict()["items"] if i["metadata"]["name"] in names]

    def phase(want: str, nodes: int | None) -> bool:
        return all((i.get("status") or {}).get("phase") == want and (
            nodes is None or ((i.get("status") or {}).get("plan") or {}).get("nodesPerReplica") == nodes)
            for i in ours())

    print()
    print(f"--- replicas across nodes: {', '.join(sorted(names))} from {display_path(deployments)}; "
          "LeaderWorkerSet is installed now (its CRD appears; sandbox/lws.py plays its controller) ---")
    wait_for(lambda: phase("Unschedulable", None), timeout)
    print(printer_table(ours()))
    # Nodes join one by one: the first takes FP8 (one node), and the plan moves up to bf16 across both once the
    # second has stayed for the upgrade delay (the FP8 Deployment gives the GPUs it holds back at once).
    joined = create_nodes(node_res, pair)
    print(f"--- {len(joined)} 8x H100 nodes join from {display_path(pair)} ---")
    spanned = wait_for(lambda: phase("Ready", 2), timeout)
    print(printer_table(ours()))
    print(_group_summary(api, names))
    leaving = joined[-1]["metadata"]["name"]
    node_res.delete(name=leaving)
    print(f"--- node {leaving} leaves: the group has lost a node ---")
    fell_back = wait_for(lambda: phase("Ready", 1) and _group_summary(api, names) == "  (no LeaderWorkerSet)",
                         timeout)
    print(printer_table(ours()))
    print("Events:")
    print("\n".join(line for line in events(api, MOVE_REASONS + ("Planned", "Unschedulable"))
                    if line.split(":")[0].strip() in names) or "  (none)")
    return spanned and fell_back


def _print_first_plans(api, items: list[dict]) -> None:
    """What the first plans came to: the printer table, the rendered workloads and why each fell back."""
    print()
    print("$ kubectl get llamadeployments")
    print(printer_table(items))
    print()
    print("Rendered workloads (key arguments):")
    deps = api.resources.get(api_version="apps/v1", kind="Deployment").get().to_dict()["items"]
    print(workload_summary(deps))
    print()
    print("Why (status.fallback.reason of deployments in fallback):")
    for i in sorted(items, key=lambda i: i["metadata"]["name"]):
        st = i.get("status") or {}
        fb = st.get("fallback") or {}
        if fb.get("inForce") or st.get("phase") in ("Unschedulable", "Invalid"):
            reason = fb.get("reason") or st.get("message") or ""
            print(f"  {i['metadata']['name']}: " + reason.replace(" | ", "\n      "))


def run_sandbox(cluster: Path, deployments: list[Path], *, serve: bool, kubeconfig_path: Path | None,
                upgrade_delay: float, timeout: float, join: Path | None = None,
                slo: tuple[Path, Path] | None = None, finetunes: tuple[Path, Path] | None = None,
                speculative: tuple[Path, Path] | None = None, multinode: tuple[Path, Path] | None = None) -> int:
    logging.getLogger("kopf").setLevel(logging.ERROR)  # the sandbox prints its own story
    with EmulatorThread() as emu:
        declare_crd(emu.emulator, crd_manifest())
        kubeconfig = str(emu.write_kubeconfig(kubeconfig_path or Path(tempfile.mkdtemp()) / "kubeconfig"))
        api = dynamic_client(kubeconfig)
        node_res = api.resources.get(api_version="v1", kind="Node")
        nodes = [d for d in load_docs(cluster) if d.get("kind") == "Node"]
        for n in nodes:
            node_res.create(body={k: v for k, v in n.items() if k != "metadata"} | {
                "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
        print(f"API emulator at {emu.url}; loaded the CRD and {len(nodes)} nodes from {display_path(cluster)}")
        kubelet = SimulatedKubelet(kubeconfig).start()
        operator = SandboxOperator(kubeconfig, Settings(upgrade_delay=timedelta(seconds=upgrade_delay),
                                                        resync_seconds=30, slo=SANDBOX_SLO,
                                                        slo_interval_seconds=SANDBOX_SLO_INTERVAL),
                                   slo_source="pods").start()
        ld_res = api.resources.get(api_version=API_VERSION, kind=KIND)
        names = []
        try:
            for path in deployments:
                for doc in load_docs(path):
                    if doc.get("kind") == KIND:
                        ns = doc["metadata"].get("namespace", "default")
                        ld_res.create(body=doc, namespace=ns)
                        names.append((ns, doc["metadata"]["name"]))
            if names:
                print(f"applied {len(names)} LlamaDeployments from {', '.join(display_path(p) for p in deployments)}")

            def items() -> list[dict]:
                return ld_res.get().to_dict()["items"]

            def settled() -> bool:
                mine = [i for i in items() if (i["metadata"]["namespace"], i["metadata"]["name"]) in names]
                return len(mine) == len(names) and all(
                    (i.get("status") or {}).get("phase") in ("Ready", "Unschedulable", "Invalid", "Degraded")
                    for i in mine)

            wait_for(settled, timeout)
            if names:
                _print_first_plans(api, items())
            if join is not None:
                _scenario(api, join, items, upgrade_delay, timeout)
            # Two rounds of waiting: the first plans, then the loop's window of breach and its reaction.
            slo_done = _slo_scenario(api, ld_res, *slo, 2 * timeout) if slo is not None else True
            finetunes_done = _finetune_scenario(api, ld_res, *finetunes, timeout) if finetunes is not None else True
            drafts_done = _speculative_scenario(api, ld_res, *speculative, timeout) if speculative is not None else True
            multinode_done = _multinode_scenario(emu.emulator, api, ld_res, *multinode, timeout) if multinode is not None else True
            if serve:
                print()
                print(f"Serving until Ctrl-C. Try: kubectl --kubeconfig {kubeconfig} get llamadeployments")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return 0 if settled() and slo_done and finetunes_done and drafts_done and multinode_done else 1
        finally:
            operator.stop()
            kubelet.stop()
