"""Soak: LlamaDeployments created, updated and deleted in a loop against the API emulator while random
API faults are injected; then every object in the emulator is audited and the operator's memory trend
is reported. Not part of the test run.

    .venv/bin/python benchmarks/soak.py --minutes 3 [--objects 100] [--seed 1] [--json out.json]

The operator runs in a process of its own (tests/reliability/operator_main.py) so that its resident
memory is its own; the emulator (with the fault injection of tests/reliability/reliability_harness.py)
and the simulated kubelet run in this process, on 127.0.0.1 only. Everything is bounded in time: the
loop runs --minutes, the final convergence waits at most --settle seconds.

At the end, with the faults off and the operator given time to catch up:

* accounted: every LlamaDeployment has observedGeneration == generation, and a phase; one that has
  a plan owns exactly one Deployment and one Service (labelled for it, owner reference to its uid);
* no orphans: no Deployment, Service or claim of the operator's whose owner is gone;
* no duplicates: no two Events with the same object, reason and message for the same generation
  transition (Events are idempotent by name), and no object of a deleted LlamaDeployment left;
* memory flat: the median RSS of the last third of the samples is within --rss-tolerance (fraction)
  or 20 MiB of the median of the first third (after a warm-up).

Prints one JSON document; exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "operator"))

from reliability_harness import (ANY, OWNED_KINDS, Fault, FaultyCluster, chat_doc, orphans)  # noqa: E402

from llama_operator.api import API_VERSION, KIND  # noqa: E402
from llama_operator.ownership import LABEL_DEPLOYMENT  # noqa: E402

MODELS = ["llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "llama-3.1-8b-instruct"]
NAMESPACES = [f"soak-{i}" for i in range(5)]
TARGETS = [("create", "deployments", None), ("update", "deployments", None), ("create", "services", None),
           ("update", "services", None), ("create", "persistentvolumeclaims", None),
           ("update", "llamadeployments", "status"), ("create", "events", None),
           ("update", "llamadeployments", None), ("watch", "llamadeployments", None), ("watch", "deployments", None)]


def make_doc(rng: random.Random, name: str) -> dict:
    doc = chat_doc(name)
    spec = doc["spec"]
    spec["model"] = rng.choice(MODELS)
    spec["slo"] = {"ttftP95": "5s", "tpotP95": "500ms", "promptTokens": 512, "concurrency": 1}
    spec["memoryBudget"] = "40Gi"
    if rng.random() < 0.5:
        spec["source"].pop("cache", None)
    return doc


def random_fault(rng: random.Random, port: int) -> Fault:
    action, plural, sub = rng.choice(TARGETS)
    if action == "watch":
        kind = rng.choice(["end", "gone", "status"])
        return Fault(action="watch", plural=plural, namespace=ANY, port=port, kind=kind, status=500,
                     times=rng.randint(1, 2))
    status = rng.choice([500, 500, 429, 409, 503])
    mode = rng.choice(["before", "after"]) if status in (500, 503) else ("after" if action == "create" else "before")
    if rng.random() < 0.05:
        return Fault(action=action, plural=plural, subresource=sub, namespace=ANY, port=port, kind="hang",
                     times=1, hang_limit=3.0)
    return Fault(action=action, plural=plural, subresource=sub, namespace=ANY, port=port, status=status, mode=mode,
                 retry_after=1 if status == 429 else None, times=rng.randint(1, 3))


def audit(cluster: FaultyCluster, deleted: set[tuple[str, str]]) -> dict:
    problems: list[str] = []
    lds = cluster.list(API_VERSION, KIND)
    by_key = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in lds}
    owned: dict[str, Counter] = {kind: Counter() for _, kind in OWNED_KINDS}
    for api_version, kind in OWNED_KINDS:
        for o in cluster.list(api_version, kind):
            owner = (o["metadata"]["namespace"], (o["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT))
            owned[kind][owner] += 1
            if owner in deleted and owner not in by_key:
                problems.append(f"{kind} of deleted {owner} left")
    phases = Counter()
    for key, o in by_key.items():
        st = o.get("status") or {}
        phases[st.get("phase")] += 1
        if st.get("observedGeneration") != o["metadata"]["generation"]:
            problems.append(f"{key}: status for generation {st.get('observedGeneration')}, "
                            f"object at {o['metadata']['generation']} ({st.get('phase')})")
        if st.get("plan") and st.get("phase") != "Invalid":
            for kind in ("Deployment", "Service"):
                if owned[kind][key] != 1:
                    problems.append(f"{key}: {owned[kind][key]} {kind}s")
        for kind in ("Deployment", "Service", "PersistentVolumeClaim"):
            if owned[kind][key] > 1:
                problems.append(f"{key}: {owned[kind][key]} {kind}s")
    stray = orphans(cluster)
    problems += [f"orphan {s}" for s in stray]
    events = [e for e in cluster.events() if (e.get("source") or {}).get("component") == "llama-operator"]
    names = Counter(e["metadata"]["name"] for e in events)
    problems += [f"event name twice: {n}" for n, c in names.items() if c > 1]
    return {"llamadeployments": len(lds), "phases": dict(phases), "owned": {k: sum(v.values()) for k, v in owned.items()},
            "events": len(events), "orphans": len(stray), "problems": problems[:50], "problem_count": len(problems)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--objects", type=int, default=100, help="LlamaDeployments alive at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pools", type=int, default=30, help="copies of the example L4 pool (4 L4 nodes, 1 CPU node)")
    p.add_argument("--fault-interval", type=float, default=2.0, help="seconds between injected faults")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--settle", type=float, default=180.0, help="seconds allowed to converge at the end")
    p.add_argument("--rss-tolerance", type=float, default=0.15)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="llama-soak-"))
    cluster = FaultyCluster(workdir, copies=args.pools)
    cluster.kubelet.interval = 0.5
    operator = cluster.operator_process(error_backoff=1.0, watch_timeout=30, resync=60)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    live: dict[tuple[str, str], dict] = {}
    deleted: set[tuple[str, str]] = set()
    actions: Counter = Counter()
    faults: list[Fault] = []
    samples: list[tuple[float, int]] = []
    next_fault = next_sample = time.monotonic()
    serial = 0
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - started, 1), operator.rss_bytes()))
                next_sample = now + args.sample_interval
            if now >= next_fault:
                faults.append(cluster.emulator.inject(random_fault(rng, cluster.operator_port)))
                next_fault = now + args.fault_interval
            roll = rng.random()
            try:
                if len(live) < args.objects and (roll < 0.45 or len(live) < args.objects // 2):
                    serial += 1
                    key = (rng.choice(NAMESPACES), f"ld-{serial}")
                    cluster.create(make_doc(rng, key[1]), key[0])
                    live[key] = {}
                    actions["create"] += 1
                elif roll < 0.8 and live:
                    key = rng.choice(sorted(live))
                    change = rng.choice([{"replicas": rng.randint(1, 2)}, {"contextLength": rng.choice([4096, 8192])},
                                         {"model": rng.choice(MODELS)}, {"replicas": 0}])  # replicas 0: invalid
                    cluster.patch_spec(key[1], change, key[0])
                    actions["update" if change != {"replicas": 0} else "invalid-update"] += 1
                elif live:
                    key = rng.choice(sorted(live))
                    cluster.delete(key[1], key[0])
                    live.pop(key)
                    deleted.add(key)
                    actions["delete"] += 1
            except Exception as e:  # noqa: BLE001 - the test client is not under test; note and go on
                actions[f"client error {type(e).__name__}"] += 1
            time.sleep(0.05)
            if operator.proc.poll() is not None:
                break
        loop_seconds = time.monotonic() - started
        # Faults off; let the operator catch up.
        cluster.emulator.clear_faults()
        settle_deadline = time.monotonic() + args.settle
        report = audit(cluster, deleted)
        while report["problem_count"] and time.monotonic() < settle_deadline and operator.proc.poll() is None:
            time.sleep(5)
            samples.append((round(time.monotonic() - started, 1), operator.rss_bytes()))
            report = audit(cluster, deleted)
        settled_after = time.monotonic() - started - loop_seconds
        alive = operator.proc.poll() is None
    finally:
        operator.terminate()
        cluster.close()

    rss = [r for _, r in samples]
    warm = rss[len(rss) // 6:] if len(rss) >= 6 else rss
    third = max(1, len(warm) // 3)
    first, last = statistics.median(warm[:third]), statistics.median(warm[-third:])
    growth = (last - first) / first if first else 0.0
    flat = last - first <= max(args.rss_tolerance * first, 20 * 2**20)
    ok = alive and not report["problem_count"] and flat
    out = {
        "ok": ok,
        "minutes": args.minutes, "objects": args.objects, "seed": args.seed,
        "loop_seconds": round(loop_seconds, 1), "settled_after_seconds": round(settled_after, 1),
        "actions": dict(actions),
        "faults_injected": len(faults), "fault_requests_hit": sum(f.hits for f in faults),
        "faults_by_kind": dict(Counter(f.describe() for f in faults if f.hits).most_common(12)),
        "operator_alive": alive,
        "audit": report,
        "rss": {"samples_mib": [[t, round(r / 2**20, 1)] for t, r in samples],
                "first_third_median_mib": round(first / 2**20, 1), "last_third_median_mib": round(last / 2**20, 1),
                "growth": round(growth, 3), "flat": flat},
        "operator_log": str(operator.log_path),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
