"""API faults: every write the operator makes (Deployment, Service, model-cache claim, status, Events)
failed with 500 (answer lost, or refused), 429 with Retry-After, and 409;
then the operator's watches cut and their next request answered with a watch that ends at once, a
410 Gone, or a 500.

One operator serves the whole module; each case runs in a namespace of its own, with its faults
limited to that namespace and to the operator's port, through the same create -> Ready -> update ->
Ready -> delete as the fault-free baseline. Converged means: the same Deployment, Service, claim,
status and Events as the baseline (no duplicates: Events are compared as a multiset), and after the
delete nothing of it is left.
"""
from __future__ import annotations

import pytest

from reliability_cases import CONVERGED, FAULT_CASES, WATCH_CASES, FaultCase, WatchCase
from reliability_harness import (FaultyCluster, create_and_update, describe_difference, delete_and_wait_gone,
                                 fingerprint, orphans, settle)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A cluster, one operator, and the baseline: what the lifecycle leaves without any fault."""
    cluster = FaultyCluster(tmp_path_factory.mktemp("api-faults"))
    try:
        operator = cluster.operator()
        create_and_update(cluster, "baseline")
        baseline = settle(cluster, "baseline", fingerprint(cluster, "baseline"), quiet=1.0)
        assert baseline["deployments"] and baseline["services"] and baseline["claims"], baseline
        assert baseline["status"]["chat"]["phase"] == "Ready"
        assert {reason for (_, _, reason), _ in baseline["events"]} >= {"Planned", "Ready", "Replanned"}
        assert not delete_and_wait_gone(cluster, "baseline")  # the cases need the GPUs it holds
        yield cluster, operator, baseline
    finally:
        cluster.close()


def _run_case(cluster: FaultyCluster, operator, baseline: dict, namespace: str, faults) -> list[str]:
    """The lifecycle under `faults`; returns the problems found (empty: converged)."""
    problems: list[str] = []
    try:
        create_and_update(cluster, namespace)
    except AssertionError as e:
        problems.append(f"did not converge: {e}")
    fp = settle(cluster, namespace, baseline)
    if fp != baseline:
        problems.append(f"differs from the fault-free run: {describe_difference(fp, baseline)}")
    for f in faults:
        if not f.hits:
            problems.append(f"the fault never fired: {f.describe()}")
    left = delete_and_wait_gone(cluster, namespace)
    if left:
        problems.append(f"left after delete: {left}")
    stray = [o for o in orphans(cluster) if f" {namespace}/" in o]
    if stray:
        problems.append(f"orphans: {stray}")
    if not operator.alive:
        problems.append(f"the operator died: {operator.error!r}")
    return problems


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.id for c in FAULT_CASES])
def test_write_fault(env, module_results, case: FaultCase):
    cluster, operator, baseline = env
    namespace = f"fault-{FAULT_CASES.index(case):02d}"
    fault = cluster.inject(namespace=namespace, port=cluster.operator_port, **case.fault_kwargs())
    try:
        problems = _run_case(cluster, operator, baseline, namespace, [fault])
    finally:
        fault.times = 0  # spent or not, it stops here
    module_results.add("api-faults", case.id, fault=case.kind.label, request=case.target.label,
                       outcome=CONVERGED if not problems else "FAILED: " + "; ".join(problems)[:300])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", WATCH_CASES, ids=[c.id for c in WATCH_CASES])
def test_watch_fault(env, module_results, case: WatchCase):
    cluster, operator, baseline = env
    namespace = f"watch-{WATCH_CASES.index(case):02d}"
    # Watches are cluster-wide: the fault matches the operator's next watch request of the resource, and
    # the open ones are cut so that there is a next one at once.
    fault = cluster.inject(action="watch", plural=case.plural, namespace=None, port=cluster.operator_port,
                           **case.fault)
    try:
        cluster.end_watches()
        problems = _run_case(cluster, operator, baseline, namespace, [fault])
    finally:
        fault.times = 0
    module_results.add("watch-faults", case.id, fault=case.label, watch=case.plural,
                       outcome=CONVERGED if not problems else "FAILED: " + "; ".join(problems)[:300])
    assert not problems, "\n".join(problems)
