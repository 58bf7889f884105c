"""The operator pod and the `helm test` pod meet the Pod Security Standard "restricted" profile.

Each control of the profile (Kubernetes docs, "Pod Security Standards", baseline + restricted, as of
v1.29-v1.34) is a separate check below, so a failure names the rule that broke. The operator pod
must also run with a read-only root filesystem, a fixed non-root UID, resources, and probes.
"""
from __future__ import annotations

import copy

import pytest

from chartkit import CHART, FULLNAME, SCENARIOS, by_kind, one, read_yaml

# restricted: "Volume Types" — only these volume sources are allowed.
ALLOWED_VOLUME_SOURCES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
# baseline: "Host Ports" is about containerPort's hostPort; "Capabilities" (restricted): drop ALL,
# add at most NET_BIND_SERVICE.
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}
ALLOWED_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
ALLOWED_PROC_MOUNT = {None, "Default"}
ALLOWED_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def effective(pod: dict, container: dict, field: str):
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    value = (container.get("securityContext") or {}).get(field)
    return value if value is not None else (pod.get("securityContext") or {}).get(field)


def violations(pod: dict) -> list[str]:
    """Every restricted-profile rule the pod spec breaks, one message per rule and container."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    # baseline: Host Namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"host namespaces: {field} is true")
    # baseline: HostPath Volumes; restricted: Volume Types
    for volume in pod.get("volumes", []):
        sources = set(volume) - {"name"}
        if "hostPath" in sources:
            out.append(f"hostPath volume {volume['name']}")
        if not sources <= ALLOWED_VOLUME_SOURCES:
            out.append(f"volume {volume['name']} has a type outside the restricted list: {sources}")
    # baseline: Sysctls
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in ALLOWED_SYSCTLS:
            out.append(f"unsafe sysctl {sysctl['name']}")
    # baseline: AppArmor (pod level)
    apparmor = (psc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod AppArmor profile {apparmor}")
    for c in containers(pod):
        name = c["name"]
        sc = c.get("securityContext") or {}
        # baseline: Privileged Containers
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        # baseline: Host Ports
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        # baseline: /proc Mount Type
        if sc.get("procMount") not in ALLOWED_PROC_MOUNT:
            out.append(f"{name}: procMount {sc['procMount']}")
        # baseline: SELinux
        selinux = effective(pod, c, "seLinuxOptions") or {}
        if selinux.get("type") not in ALLOWED_SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"{name}: SELinux options {selinux}")
        # baseline: AppArmor (container level)
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{name}: AppArmor profile {apparmor}")
        # baseline: Capabilities; restricted: Capabilities
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        added = set(caps.get("add") or [])
        if not added <= ALLOWED_ADDED_CAPABILITIES:
            out.append(f"{name}: adds capabilities {sorted(added - ALLOWED_ADDED_CAPABILITIES)}")
        # restricted: Privilege Escalation
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        # restricted: Running as Non-root
        if effective(pod, c, "runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        # restricted: Running as Non-root user
        if effective(pod, c, "runAsUser") == 0:
            out.append(f"{name}: runAsUser is 0")
        # restricted: Seccomp
        seccomp = (effective(pod, c, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
    return out


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
