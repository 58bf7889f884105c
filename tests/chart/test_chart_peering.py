"""High availability: with more than one replica (or peering switched on) the chart renders kopf's
peering object and runs the operator with `--peering <name>`, so one replica is active; with one
replica and peering off it runs `--standalone`, with no peering object."""
from __future__ import annotations

import pytest
import yaml

from chartkit import CHART, FULLNAME, SCENARIOS, WATCHED, by_kind, one, operator_container

PEERING_KINDS = ("ClusterKopfPeering", "KopfPeering")


def peering_objects(docs):
    return [d for d in docs if d["kind"] in PEERING_KINDS]


def test_single_replica_is_standalone(scenario):
    docs = scenario("default")
    args = operator_container(docs)["args"]
    assert "--standalone" in args
    assert not any(a.startswith("--peering") for a in args)
    assert not peering_objects(docs)
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_two_replicas_render_peering_and_pass_its_name(render):
    _, docs = render("--set", "replicaCount=2")
    deploy = one(docs, "Deployment", FULLNAME)
    assert deploy["spec"]["replicas"] == 2
    args = operator_container(docs)["args"]
    assert f"--peering={FULLNAME}" in args
    assert "--standalone" not in args
    peering = one(docs, "ClusterKopfPeering", FULLNAME)
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert not by_kind(docs, "KopfPeering")
    # rolling updates keep one replica up; the replicas spread over nodes
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "podAntiAffinity" in deploy["spec"]["template"]["spec"]["affinity"]


def test_peering_can_be_switched_on_with_one_replica(render):
    _, docs = render("--set", "peering.enabled=true", "--set", "peering.name=llm-ha")
    assert "--peering=llm-ha" in operator_container(docs)["args"]
    one(docs, "ClusterKopfPeering", "llm-ha")


def test_namespaced_peering_lives_in_each_watched_namespace(scenario):
    docs = scenario("namespaced-all-on")
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in WATCHED]
    assert "--all-namespaces" not in args
    assert "--peering=llama-operator-ha" in args
    peerings = by_kind(docs, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        (ns, "llama-operator-ha") for ns in WATCHED
    }
    assert not by_kind(docs, "ClusterKopfPeering")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replicas_identify_themselves_to_kopf(scenario, name):
    env = {e["name"]: e for e in operator_container(scenario(name))["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_chart_ships_kopfs_peering_crds():
    docs = list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()))
    crds = {d["metadata"]["name"]: d for d in docs if d}
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        assert crd["spec"]["group"] == "kopf.dev"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True
