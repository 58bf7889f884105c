"""The Pod Security Standard "restricted" profile as checks: one message per rule a pod spec breaks.

Each control of the profile (Kubernetes docs, "Pod Security Standards", baseline + restricted, as of
v1.29-v1.34) is a separate check, so a failure names the rule that broke. Applied to the chart's pods
(tests/chart) and to the model pods the operator renders (tests/unit/test_render.py).
"""
from __future__ import annotations

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
