"""The Kubernetes Pod Security Standards, "restricted" level, as checks on a pod spec (a test helper).

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the policy Pod
Security Admission enforces with `pod-security.kubernetes.io/enforce: restricted`, latest version): every
baseline control, then the restricted ones. `restricted_violations(pod_spec)` returns one line per
violation, naming the field, as the admission controller's message would; an empty list admits the pod.
Annotations (AppArmor's, seccomp's old ones) are checked through `annotations`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Baseline: capabilities a container may add.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
# Restricted: the only volume types allowed.
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})


def containers(pod: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(field path, container) of every container, init container and ephemeral container."""
    for field in ("containers", "initContainers", "ephemeralContainers"):
        for index, container in enumerate(pod.get(field) or []):
            yield f"spec.{field}[{index}]", container


def restricted_violations(pod: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> list[str]:
    """What keeps `pod` (a PodSpec) from the restricted level; empty when it meets it."""
    return [*baseline_violations(pod, annotations or {}), *_restricted_only(pod)]


def baseline_violations(pod: Mapping[str, Any], annotations: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"spec.{field}: must be unset or false")
    if (pod_context.get("windowsOptions") or {}).get("hostProcess"):
        out.append("spec.securityContext.windowsOptions.hostProcess: must be unset or false")
    out += [
        f"spec.volumes[{i}]: hostPath volumes are not allowed"
        for i, v in enumerate(pod.get("volumes") or [])
        if "hostPath" in v
    ]
    out += _selinux(pod_context, "spec.securityContext")
    out += _seccomp_not_unconfined(pod_context, "spec.securityContext")
    out += _apparmor(pod_context, "spec.securityContext")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"metadata.annotations[{key}]: must be runtime/default or localhost/*")
    for where, container in containers(pod):
        out += _baseline_container(where, container)
    return out


def _baseline_container(where: str, container: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    context = container.get("securityContext") or {}
    if context.get("privileged"):
        out.append(f"{where}.securityContext.privileged: must be unset or false")
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{where}.securityContext.windowsOptions.hostProcess: must be unset or false")
    added = set((context.get("capabilities") or {}).get("add") or [])
    if added - BASELINE_CAPABILITIES:
        out.append(f"{where}.securityContext.capabilities.add: {sorted(added - BASELINE_CAPABILITIES)} not allowed")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            out.append(f"{where}.ports: hostPort {port['hostPort']} is not allowed")
    if context.get("procMount", "Default") != "Default":
        out.append(f"{where}.securityContext.procMount: must be Default")
    out += _selinux(context, f"{where}.securityContext")
    out += _seccomp_not_unconfined(context, f"{where}.securityContext")
    out += _apparmor(context, f"{where}.securityContext")
    return out


def _selinux(context: Mapping[str, Any], where: str) -> list[str]:
    options = context.get("seLinuxOptions") or {}
    out = []
    if options.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}.seLinuxOptions.type: {options['type']} is not allowed")
    out += [f"{where}.seLinuxOptions.{field}: must be unset" for field in ("user", "role") if options.get(field)]
    return out


def _seccomp_not_unconfined(context: Mapping[str, Any], where: str) -> list[str]:
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        return [f"{where}.seccompProfile.type: must not be Unconfined"]
    return []


def _apparmor(context: Mapping[str, Any], where: str) -> list[str]:
    profile = context.get("appArmorProfile")
    if profile and profile.get("type") not in APPARMOR_ALLOWED:
        return [f"{where}.appArmorProfile.type: must be RuntimeDefault or Localhost"]
    return []


def _restricted_only(pod: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for index, volume in enumerate(pod.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"spec.volumes[{index}]: {sorted(kinds - RESTRICTED_VOLUME_TYPES)} volumes are not allowed")
    if pod_context.get("runAsNonRoot") is False:
        out.append("spec.securityContext.runAsNonRoot: must not be false")
    if pod_context.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser: must not be 0")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_ALLOWED:
        out.append("spec.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost")
    for where, container in containers(pod):
        out += _restricted_container(where, container, pod_context)
    return out


def _restricted_container(where: str, container: Mapping[str, Any], pod_context: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    context = container.get("securityContext") or {}
    if context.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
    non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    if non_root is not True:
        out.append(f"{where}.securityContext.runAsNonRoot: must be true (here or in the pod's securityContext)")
    if context.get("runAsUser") == 0:
        out.append(f"{where}.securityContext.runAsUser: must not be 0")
    seccomp = (context.get("seccompProfile") or {}).get("type") or (pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in SECCOMP_ALLOWED:
        out.append(f"{where}.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        out.append(f"{where}.securityContext.capabilities.drop: must include ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        out.append(f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE is allowed")
    return out
