"""What the Ray pods run as and where they may write (pure): the "restricted" Pod Security Standard.

Every head and worker pod runs as the trainer image's own user (the Dockerfile's trainer stage: Ray's
image's `ray`, uid 1000, gid 100), never as root, with the runtime's default seccomp profile, no
capabilities, no privilege escalation and a read-only root filesystem. What Ray and the trainer write
goes to emptyDirs instead:

| Mount | Holds | Size |
| --- | --- | --- |
| `/tmp` | checkpoints on their way to S3, the exported model, Python's temporary files | counted in the pod's ephemeral-storage request (`SCRATCH_STORAGE`) |
| `/tmp/ray` | Ray's session dir: logs, sockets, objects spilled from the object store | the same |
| `/tmp/kubetune-cache` (workers) | the node cache: the dataset's images and the base weights, downloaded once per node | `spec.resources.cacheSize`: the emptyDir's `sizeLimit`, and added to the request |

`builders` puts these into the RayJob's pod templates; `tests/unit/pod_security_standards.py` checks every
rendered pod against the restricted profile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubetune_operator.pod_names import (
    CACHE_DIR,
    CACHE_VOLUME,
    HEAD,
    RAY_SESSION_DIR,
    RAY_SESSION_VOLUME,
    TMP_DIR,
    TMP_VOLUME,
    WORKER,
)

if TYPE_CHECKING:
    from kubetune_operator.spec import FineTuneJob

TRAINER_UID = 1000
TRAINER_GID = 100
# Ephemeral storage each pod requests beyond its node cache, for /tmp and Ray's session dir.
SCRATCH_STORAGE = "4Gi"

# (volume name, mount path, on which pods) of the scratch emptyDirs; the cache's size comes from the spec.
_SCRATCH = ((TMP_VOLUME, TMP_DIR, (HEAD, WORKER)), (RAY_SESSION_VOLUME, RAY_SESSION_DIR, (HEAD, WORKER)))
_MEBIBYTES = {"Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}


def _as_the_trainer_user() -> dict[str, Any]:
    """What pod and container both say: the image's own user, never root, the default seccomp filter."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The pod's securityContext: volumes are group-owned by the image's group."""
    return {**_as_the_trainer_user(), "fsGroup": TRAINER_GID}


def container_security_context() -> dict[str, Any]:
    """The Ray container's securityContext (KubeRay copies it to the init container it adds to workers)."""
    return {
        **_as_the_trainer_user(),
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def scratch_volumes(job: FineTuneJob, component: str) -> list[dict[str, Any]]:
    """The writable emptyDirs of a `component` (HEAD or WORKER) pod; the node cache on workers only."""
    volumes: list[dict[str, Any]] = [{"name": name, "emptyDir": {}} for name, _, on in _SCRATCH if component in on]
    if component == WORKER:
        volumes.append({"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": job.spec.resources.cache_size}})
    return volumes


def scratch_mounts(component: str) -> list[dict[str, Any]]:
    """Where `scratch_volumes` are mounted in the Ray container."""
    mounts = [{"name": name, "mountPath": path} for name, path, on in _SCRATCH if component in on]
    if component == WORKER:
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_DIR})
    return mounts


def ephemeral_storage_request(job: FineTuneJob, component: str) -> str:
    """What a pod asks of its node's disk: the scratch space, and on workers the node cache as well.

    A request, not a limit: the kubelet evicts a pod over its cache's `sizeLimit`, and under disk pressure
    the pods furthest over their requests first.
    """
    sizes = [SCRATCH_STORAGE] + ([job.spec.resources.cache_size] if component == WORKER else [])
    return format_mebibytes(sum(mebibytes(size) for size in sizes))


def mebibytes(size: str) -> int:
    """A disk size as the spec writes it (spec.DISK_SIZE_PATTERN: a whole number of Mi, Gi or Ti) in Mi."""
    number, unit = size[:-2], size[-2:]
    if unit not in _MEBIBYTES or not number.isdigit():
        raise ValueError(f"not a whole number of Mi, Gi or Ti: {size!r}")
    return int(number) * _MEBIBYTES[unit]


def format_mebibytes(amount: int) -> str:
    """`amount` Mi as a Kubernetes quantity in the largest unit that holds it exactly."""
    for unit in ("Ti", "Gi"):
        if amount % _MEBIBYTES[unit] == 0:
            return f"{amount // _MEBIBYTES[unit]}{unit}"
    return f"{amount}Mi"
