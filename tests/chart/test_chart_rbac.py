"""The chart grants the operator exactly what it uses: no wildcards, nothing outside the contract.

Each rendered Role/ClusterRole is read rule by rule and every (apiGroup, resource, verb) it grants
must appear in ALLOWED below. The tests also check the other way round: everything the operator
needs is granted, cluster-wide or in each watched namespace, depending on the install mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chartkit import FULLNAME, NAMESPACE, SCENARIOS, WATCHED, by_kind, one

# The operator's Kubernetes API use, per install mode, as observed while it runs against the API
# emulator (tests/integration/test_api_usage.py keeps operator-api-usage.json true).
USAGE = json.loads((Path(__file__).resolve().parent / "operator-api-usage.json").read_text())["usage"]


def _pairs(mode: str) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs}; keys are "resource" (core) or "group/resource[/subresource]"."""
    out = {}
    for key, verbs in USAGE[mode].items():
        group, _, resource = key.partition("/") if "/" in key else ("", "", key)
        out[(group, resource)] = set(verbs)
    return out


USED = {mode: _pairs(mode) for mode in USAGE}
ALLOWED: dict[tuple[str, str], set[str]] = {}
for _mode in USED.values():
    for _pair, _verbs in _mode.items():
        ALLOWED.setdefault(_pair, set()).update(_verbs)
# Reads that planning needs across the whole cluster, and kopf's reads of cluster-scoped kinds:
# always in a ClusterRole, whatever the install mode.
CLUSTER_WIDE = {
    ("", "nodes"), ("", "pods"),
    ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces"),
}
PEERING = {("kopf.dev", "clusterkopfpeerings"), ("kopf.dev", "kopfpeerings")}
# What the operator reads and writes where LlamaDeployments live.
PER_NAMESPACE = set(ALLOWED) - CLUSTER_WIDE - PEERING

ROLE_KINDS = ("ClusterRole", "Role")


def grants(role: dict) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) a role grants; fails on wildcards and non-resource rules."""
    out = set()
    where = f"{role['kind']}/{role['metadata']['name']}"
    for rule in role.get("rules", []):
        assert "nonResourceURLs" not in rule, f"{where} grants non-resource URLs: {rule}"
        assert "resourceNames" not in rule or rule["resourceNames"], f"{where}: empty resourceNames"
        for field in ("apiGroups", "resources", "verbs"):
            values = rule.get(field, [])
            assert values, f"{where} has a rule without {field}: {rule}"
            assert not any("*" in v for v in values), f"{where} uses a wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def granted_in(docs: list[dict], kind: str, namespace: str | None = None) -> set[tuple[str, str, str]]:
    out = set()
    for role in by_kind(docs, kind):
        if namespace is None or role["metadata"].get("namespace") == namespace:
            out |= grants(role)
    return out


def expand(pairs, mode: str) -> set[tuple[str, str, str]]:
    used = USED[mode]
    return {(g, r, v) for (g, r) in pairs if (g, r) in used for v in used[(g, r)]}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_wildcards_and_nothing_outside_the_contract(scenario, name):
    docs = scenario(name)
    roles = [d for d in docs if d["kind"] in ROLE_KINDS]
    assert roles, "the chart renders no RBAC"
    for role in roles:
        for group, resource, verb in grants(role):
            assert verb in ALLOWED.get((group, resource), set()), (
                f"{role['kind']}/{role['metadata']['name']} grants {verb} on "
                f"{resource} ({group or 'core'}), outside the operator's contract"
            )


@pytest.mark.parametrize("name", ["default", "all-on"])
def test_cluster_wide_install_grants_everything_in_cluster_roles(scenario, name):
    docs = scenario(name)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    granted = granted_in(docs, "ClusterRole")
    peering = {("kopf.dev", "clusterkopfpeerings")} if name == "all-on" else set()
    assert granted == expand(CLUSTER_WIDE | PER_NAMESPACE | peering, "clusterwide")


@pytest.mark.parametrize("name", ["namespaced", "namespaced-all-on"])
def test_namespaced_install_writes_only_in_watched_namespaces(scenario, name):
    docs = scenario(name)
    # Cluster-wide: only the reads planning and kopf need; no write verb at all.
    assert granted_in(docs, "ClusterRole") == expand(CLUSTER_WIDE, "namespaced")
    peering = {("kopf.dev", "kopfpeerings")} if name == "namespaced-all-on" else set()
    for ns in WATCHED:
        assert granted_in(docs, "Role", ns) == expand(PER_NAMESPACE | peering, "namespaced"), ns
    role_namespaces = {r["metadata"]["namespace"] for r in by_kind(docs, "Role")}
    assert role_namespaces == set(WATCHED)


def test_namespaced_install_reads_pods_cluster_wide_only_when_asked(scenario):
    # watch.podsAllNamespaces (default true) with the operator's --pods-all-namespaces: list/watch on pods
    # in the ClusterRole; false: in each watched namespace's Role, and the operator keeps to those.
    pods = expand({("", "pods")}, "namespaced")
    assert pods and pods <= granted_in(scenario("namespaced"), "ClusterRole")
    docs = scenario("namespaced-own-pods")
    assert granted_in(docs, "ClusterRole") == expand(CLUSTER_WIDE - {("", "pods")}, "namespaced")
    for ns in WATCHED:
        assert granted_in(docs, "Role", ns) == expand(PER_NAMESPACE | {("", "pods")}, "namespaced"), ns


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bindings_tie_each_role_to_the_operator_service_account(scenario, name):
    docs = scenario(name)
    sa = one(docs, "ServiceAccount", FULLNAME)
    deploy = one(docs, "Deployment", FULLNAME)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in docs if r["kind"] in ROLE_KINDS}
    bound = set()
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ns, ref["name"]) in roles, f"{binding['metadata']['name']} binds a missing role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
        bound.add((ref["kind"], ns, ref["name"]))
    assert bound == roles, f"roles without a binding: {roles - bound}"


def test_rbac_can_be_left_to_the_cluster_admin(render):
    _, docs = render("--set", "rbac.create=false")
    assert not [d for d in docs if d["kind"] in (*ROLE_KINDS, "ClusterRoleBinding", "RoleBinding")]
