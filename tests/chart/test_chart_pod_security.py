"""The operator pod and the `helm test` pod meet the Pod Security Standard "restricted" profile.

Each control of the profile is a separate check (kit/pod_security.py), so a failure names the rule that
broke. The operator pod must also run with a read-only root filesystem, a fixed non-root UID, resources,
and probes.
"""
from __future__ import annotations

import copy

import pytest

from chartkit import CHART, FULLNAME, SCENARIOS, by_kind, one, read_yaml
from kit.pod_security import violations


def operator_pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]


def helm_test_pod(docs: list[dict]) -> dict:
    pods = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    return pods[0]["spec"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_operator_pod_is_restricted(scenario, name):
    assert violations(operator_pod(scenario(name))) == []


@pytest.mark.parametrize("name", ["default", "all-on"])
def test_helm_test_pod_is_restricted(scenario, name):
    assert violations(helm_test_pod(scenario(name))) == []


def test_the_checker_catches_each_rule(scenario):
    """Each rule above fires on a pod that breaks it (the checks are not vacuous)."""
    good = operator_pod(scenario("default"))
    breakers = {
        "hostNetwork": lambda p: p.update(hostNetwork=True),
        "hostPID": lambda p: p.update(hostPID=True),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "type outside": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "hostPort": lambda p: p["containers"][0]["ports"][0].update(hostPort=8080),
        "drop ALL": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        "adds capabilities": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "allowPrivilegeEscalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "runAsNonRoot": lambda p: (p["securityContext"].pop("runAsNonRoot"), p["containers"][0]["securityContext"].pop("runAsNonRoot")),
        "runAsUser is 0": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "procMount": lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"),
        "unsafe sysctl": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for expected, breaker in breakers.items():
        pod = copy.deepcopy(good)
        breaker(pod)
        found = violations(pod)
        assert any(expected in v for v in found), f"{expected!r} not caught: {found}"


@pytest.mark.parametrize("name", ["default", "all-on"])
def test_operator_pod_hardening_beyond_the_profile(scenario, name):
    docs = scenario(name)
    pod = operator_pod(docs)
    container = next(c for c in pod["containers"] if c["name"] == "operator")
    sc = container["securityContext"]
    values = read_yaml(CHART / "values.yaml")
    uid = values["podSecurityContext"]["runAsUser"]
    assert isinstance(uid, int) and uid >= 1000, "a fixed, non-system, non-root UID"
    assert pod["securityContext"]["runAsUser"] == uid and sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # resources
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    # probes on the health port's /healthz
    health = next(p for p in container["ports"] if p["name"] == "health")
    assert health["containerPort"] == values["operator"]["healthPort"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    # a writable /tmp on an emptyDir
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume and not mount.get("readOnly")


def test_helm_test_pod_checks_the_health_endpoint(scenario):
    docs = scenario("default")
    pod = helm_test_pod(docs)
    script = " ".join(pod["containers"][0]["command"])
    values = read_yaml(CHART / "values.yaml")
    service = one(docs, "Service", FULLNAME)
    port = next(p for p in service["spec"]["ports"] if p["name"] == "health")
    assert port["port"] == values["operator"]["healthPort"] and port["targetPort"] == "health"
    assert f"{FULLNAME}.llama-system.svc:{port['port']}/healthz" in script
    assert "wget" in script
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_helm_test_pod_can_be_turned_off(render):
    _, docs = render("--set", "tests.enabled=false")
    assert not by_kind(docs, "Pod")
