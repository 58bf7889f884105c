"""The API server unreachable for 30 seconds, the operator killed or stopped in the middle of a pass,
and two replicas with peering.

Each compares against a fault-free reference run in the same cluster (same names in another namespace,
deleted before the scenario so that the GPUs are free): the same Deployment, Service, claim, status and
Events, no duplicates, nothing left behind.
"""
from __future__ import annotations

import time

from llama_operator.api import API_VERSION, KIND

from kit.operator import fast_settings
from kit.poll import wait_until
from reliability_cases import SCENARIOS
from reliability_harness import (OWNED_KINDS, UPDATE, FaultyCluster, chat_doc, create_and_update, delete_and_wait_gone,
                                 describe_difference, fingerprint, orphans, settle, writes_by_port)

OUTAGE_SECONDS = 30


def _reference(cluster: FaultyCluster, namespace: str, names: dict[str, bool]) -> dict:
    """Run the fault-free lifecycle of each name (True: create and update; False: create only) in
    `namespace`, fingerprint it, delete it all again, and return the fingerprint."""
    for name, update in names.items():
        cluster.create(chat_doc(name), namespace)
    cluster.wait_converged(namespace, list(names))
    for name, update in names.items():
        if update:
            cluster.patch_spec(name, UPDATE, namespace)
    cluster.wait_converged(namespace, list(names))
    fp = settle(cluster, namespace, fingerprint(cluster, namespace), quiet=1.0)
    for name in names:
        assert not delete_and_wait_gone(cluster, namespace, name)
    return fp


def _record(results, key: str, problems: list[str]) -> None:
    scenario, green = SCENARIOS[key]
    results.add("outage-restarts", key, scenario=scenario,
                outcome=green if not problems else "FAILED: " + "; ".join(problems)[:300])


def test_api_unreachable_for_30_seconds(cluster, results):
    operator = cluster.operator()
    ref = _reference(cluster, "ref", {"keep": True, "fresh": False})
    ns = "outage"
    for name in ("keep", "gone"):
        cluster.create(chat_doc(name), ns)
    cluster.wait_converged(ns, ["keep", "gone"])

    cluster.server.take_down(cluster.operator_port)
    down_at = time.monotonic()
    # While the operator cannot reach the API server, the cluster moves on without it.
    cluster.create(chat_doc("fresh"), ns)
    cluster.patch_spec("keep", UPDATE, ns)
    cluster.delete("gone", ns)  # no finalizer: it goes at once, and the garbage collector takes its workload
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    problems = []
    if not operator.alive:
        problems.append(f"the operator died during the outage: {operator.error!r}")
    if cluster.get("gone", ns) is not None:
        problems.append("the deleted object waited for the operator")
    cluster.server.serve(cluster.operator_port)
    outage = time.monotonic() - down_at

    try:
        cluster.wait_converged(ns, ["keep", "fresh"], timeout=60)
    except AssertionError as e:
        problems.append(str(e))
    left = [f"{kind} {o['metadata']['name']}" for api_version, kind in OWNED_KINDS + ((API_VERSION, KIND),)
            for o in cluster.list(api_version, kind, ns) if o["metadata"]["name"].startswith("gone")]
    try:
        wait_until(lambda: not [o for o in cluster.list(API_VERSION, KIND, ns) if o["metadata"]["name"] == "gone"]
                   and not [o for o in cluster.list("apps/v1", "Deployment", ns) if o["metadata"]["name"] == "gone"],
                   20, "the deleted LlamaDeployment and its workload to be gone", retry_errors=True)
        left = []
    except AssertionError:
        pass
    if left:
        problems.append(f"left of the deleted one: {left}")
    fp = settle(cluster, ns, {**ref, "events": ref["events"] + _events_of(fingerprint(cluster, ns), "gone")})
    fp_without_gone = {**fp, "events": [e for e in fp["events"] if e[0][0] != "gone"]}
    if fp_without_gone != ref:
        problems.append(f"differs from the fault-free run: {describe_difference(fp_without_gone, ref)}")
    if orphans(cluster):
        problems.append(f"orphans: {orphans(cluster)}")
    assert outage >= OUTAGE_SECONDS
    _record(results, "outage", problems)
    assert not problems, "\n".join(problems)


def _events_of(fp: dict, name: str) -> list:
    return [e for e in fp["events"] if e[0][0] == name]


def test_operator_killed_while_its_service_create_hangs(cluster, results):
    """SIGKILL in the middle of a pass: the Deployment is created, the Service create hangs (it never
    reached the store); a new operator must finish the job without a second anything."""
    ref_operator = cluster.operator()
    ref = _reference(cluster, "ref", {"chat": True})
    ref_operator.stop()

    ns = "kill"
    hang = cluster.inject(action="create", plural="services", namespace=ns, kind="hang", times=None,
                          hang_limit=60)
    victim = cluster.operator_process()
    cluster.create(chat_doc(), ns)
    wait_until(lambda: hang.hits and cluster.list("apps/v1", "Deployment", ns), 30,
               "the Deployment created and the Service create hanging", retry_errors=True)
    victim.kill()
    hang.times = 0
    hang.release()
    problems = []
    before = (len(cluster.list("apps/v1", "Deployment", ns)), len(cluster.list("v1", "Service", ns)),
              cluster.status("chat", ns).get("phase"))
    if before != (1, 0, None):
        problems.append(f"at the kill: (Deployments, Services, phase) = {before}, expected (1, 0, None)")

    problems += _new_operator_finishes_the_job(cluster, ns, ref)
    _record(results, "kill-mid-reconcile", problems)
    assert not problems, "\n".join(problems)


def _new_operator_finishes_the_job(cluster, ns: str, ref: dict) -> list[str]:
    """A new operator takes over "chat" in `ns`: it converges, follows an update, ends as the fault-free
    run `ref` did, and a delete leaves nothing. Returns the problems found."""
    problems = []
    cluster.operator()
    try:
        cluster.wait_converged(ns, ["chat"])
        cluster.patch_spec("chat", UPDATE, ns)
        cluster.wait_converged(ns, ["chat"])
    except AssertionError as e:
        problems.append(str(e))
    fp = settle(cluster, ns, ref)
    if fp != ref:
        problems.append(f"differs from the fault-free run: {describe_difference(fp, ref)}")
    left = delete_and_wait_gone(cluster, ns)
    if left:
        problems.append(f"left after delete: {left}")
    return problems


def test_operator_stopped_while_its_status_patch_hangs(cluster, results):
    """A graceful stop in the middle of a pass that has written the workload and posted its Events but
    not yet the status: the next operator redoes the pass, and its Events (the same names) are not
    posted twice."""
    ref_operator = cluster.operator()
    ref = _reference(cluster, "ref", {"chat": True})
    ref_operator.stop()

    ns = "stop"
    hang = cluster.inject(action="update", plural="llamadeployments", subresource="status", namespace=ns,
                          kind="hang", times=None, hang_limit=60)
    first = cluster.operator()
    cluster.create(chat_doc(), ns)
    wait_until(lambda: hang.hits, 30, "the status patch hanging", retry_errors=True)
    events_at_stop = sorted(e["reason"] for e in cluster.events(namespace=ns))
    # Refuse the dying operator's retries for good (403 is not retried), then let the hung request go.
    block = cluster.inject(action="update", plural="llamadeployments", subresource="status", namespace=ns,
                           status=403, times=None)
    hang.times = 0
    hang.release()
    first.stop()
    block.times = 0
    problems = []
    if not events_at_stop or cluster.status("chat", ns).get("phase") is not None:
        problems.append(f"at the stop: events {events_at_stop}, status {cluster.status('chat', ns)}")

    problems += _new_operator_finishes_the_job(cluster, ns, ref)
    _record(results, "stop-mid-reconcile", problems)
    assert not problems, "\n".join(problems)


def _passes(state) -> float:
    """How many passes the operator has run (its reconcile-duration histogram's count)."""
    for line in state.metrics.render().splitlines():
        if line.startswith("llama_operator_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_two_replicas_with_peering_only_one_acts(cluster, results):
    """Replica a runs; replica b (lower priority) joins. kopf starts a peered operator paused until it
    has read the peering object, so b must stay paused as long as a is alive. Once a stops, b acts; when
    c (higher priority) joins, b pauses again: kopf stops b's watches, and the operator's peering gate
    stops b's workers, so b's resync timers start no pass.

    (Two replicas started at the very same instant can both act for a moment: the first one to read
    the peering object may not see the other's record yet. That is kopf's peering, not tested here.)"""
    peering = "llama-operator"
    peerings = cluster.api.resources.get(api_version="kopf.dev/v1", kind="ClusterKopfPeering")
    peerings.create(body={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})

    def priorities() -> list[int]:
        status = peerings.get(name=peering).to_dict().get("status") or {}
        return sorted(p["priority"] for p in status.values() if p)
    port_b = cluster.server.serve()
    seen = len(cluster.server.requests())
    a = cluster.operator(peering=peering, settings=fast_settings(peering_priority=200), name="operator-a")
    wait_until(lambda: priorities() == [200], 10, "replica a's record in the peering object", retry_errors=True)
    # b resyncs every 2 s, so that once it is active its timers would start passes if a pause let them.
    b = cluster.operator(port=port_b, peering=peering, settings=fast_settings(peering_priority=100, resync_seconds=2),
                         name="operator-b")
    wait_until(lambda: priorities() == [100, 200], 10, "replica b's record in the peering object", retry_errors=True)
    ns = "peer"
    problems = []
    try:
        create_and_update(cluster, ns, "one")
    except AssertionError as e:
        problems.append(str(e))

    def acting(writes: list[str]) -> list[str]:  # writes other than the replica's own peering record
        return [w for w in writes if "/kopf.dev/" not in w]
    writes_a = acting(writes_by_port(cluster, cluster.operator_port, seen))
    writes_b = acting(writes_by_port(cluster, port_b, seen))
    if not any("/deployments" in w for w in writes_a):
        problems.append(f"the higher-priority replica did not act: {writes_a[:5]}")
    if writes_b:
        problems.append(f"the lower-priority replica wrote: {writes_b[:5]}")
    if len(cluster.list("apps/v1", "Deployment", ns)) != 1:
        problems.append("not exactly one Deployment")

    # The active replica goes away: the other one takes over.
    a.stop()
    seen = len(cluster.server.requests())
    try:
        cluster.create(chat_doc("two"), ns)
        cluster.wait_converged(ns, ["one", "two"], timeout=60)
    except AssertionError as e:
        problems.append(f"no takeover: {e}")
    if not any("/deployments" in w for w in acting(writes_by_port(cluster, port_b, seen))):
        problems.append("the remaining replica did not act after the other stopped")

    # A replica of higher priority joins: b pauses, and its resync timers start no pass while it is paused.
    port_c = cluster.server.serve()
    c = cluster.operator(port=port_c, peering=peering, settings=fast_settings(peering_priority=300),
                         name="operator-c")
    try:
        wait_until(lambda: 300 in priorities(), 10, "replica c's record in the peering object", retry_errors=True)
        state_b = b.state_holder[0]
        wait_until(lambda: state_b.peering is not None and not state_b.peering.is_open, 10, "replica b to pause",
                   retry_errors=True)
        passes_before = _passes(state_b)
        seen = len(cluster.server.requests())
        cluster.create(chat_doc("three"), ns)
        cluster.wait_converged(ns, ["one", "two", "three"], timeout=60)
        time.sleep(5)  # more than two of b's resync periods
        if _passes(state_b) != passes_before:
            problems.append(f"paused replica b ran {_passes(state_b) - passes_before} pass(es)")
        if acting(writes_by_port(cluster, port_b, seen)):
            problems.append(f"paused replica b wrote: {acting(writes_by_port(cluster, port_b, seen))[:5]}")
        if not any("/deployments" in w for w in acting(writes_by_port(cluster, port_c, seen))):
            problems.append("the highest-priority replica did not act")
    except AssertionError as e:
        problems.append(f"with a third replica: {e}")
    finally:
        c.stop()
    if not b.alive:
        problems.append(f"replica b died: {b.error!r}")
    _record(results, "peering", problems)
    assert not problems, "\n".join(problems)
