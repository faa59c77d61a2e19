"""spec.podTemplate: what a platform may add to the job's Ray pods, typed (pure).

A pod-template fragment (`metadata`, `spec`, and `container` for the Ray container that runs the trainer)
merged into the head and every worker pod, and `head` / `workers` fragments for what differs. Only what a
platform needs is accepted; what the operator owns (the container's command, image, resources and ports,
its volumes and mounts, the pods' user and privileges) is refused naming the field, so a podTemplate can
never weaken the restricted pod security (pod_security.py). `merge` says how the fragments combine, and
`PodTemplate` checks each merged result when it is validated, so `kubetune validate` catches a bad merge.
"""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune_operator.pod_names import (
    OPERATOR_ENV,
    OPERATOR_ENV_PREFIXES,
    OPERATOR_LABEL_KEYS,
    OPERATOR_LABEL_PREFIXES,
    OPERATOR_MOUNT_PATHS,
    OPERATOR_VOLUMES,
)
from kubetune_trainer.config import DNS_SUBDOMAIN, SpecSection, cel, cel_list

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A label key or taint key: an optional DNS-subdomain prefix and "/", then a name of at most 63 characters.
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# An absolute path without empty, "." or ".." segments.
MOUNT_PATH = r"^(/[^/\x00]+)+$|^/$"

LabelKey = Annotated[str, Field(pattern=QUALIFIED_NAME, max_length=316)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]
FreeForm = dict[str, Any]

# The volume sources a "restricted" pod may use (Pod Security Standards); hostPath and the rest are not.
RESTRICTED_VOLUME_SOURCES = (
    "configMap",
    "secret",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "csi",
)
SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
_OWNED_CONTAINER = "the operator owns the Ray container"


def _reserved_key(key: str) -> bool:
    return key.startswith(OPERATOR_LABEL_PREFIXES) or key in OPERATOR_LABEL_KEYS


def _no_reserved_key_cel(field: str) -> str:
    keys = " && ".join(f"!k.startsWith('{p}')" for p in OPERATOR_LABEL_PREFIXES)
    return f"!has(self.{field}) || self.{field}.all(k, !(k in {cel_list(OPERATOR_LABEL_KEYS)}) && {keys})"


_RESERVED_KEY_MESSAGE = (
    "keys under "
    + ", ".join(OPERATOR_LABEL_PREFIXES)
    + " and "
    + ", ".join(OPERATOR_LABEL_KEYS)
    + " are the operator's"
)


class Toleration(SpecSection):
    """A Kubernetes toleration, passed through to the pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "value must be empty when operator is Exists",
                    ".value",
                ),
                cel(
                    "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                    "operator must be Exists when key is empty (tolerate every taint)",
                    ".operator",
                ),
                cel(
                    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds is only allowed with effect NoExecute",
                    ".tolerationSeconds",
                ),
            ]
        }
    )

    key: str | None = Field(
        default=None,
        pattern=QUALIFIED_NAME,
        max_length=316,
        description="Taint key to tolerate; empty with operator Exists tolerates every taint.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists (any value) or Equal (the given value); Equal when omitted."
    )
    value: str | None = Field(
        default=None, pattern=LABEL_VALUE, max_length=63, description="Taint value to match with operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all effects when omitted."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="Seconds a NoExecute taint is tolerated before eviction; forever when omitted.",
    )

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        # The rules the API server applies to a pod's tolerations: checked here so a job fails at
        # validation rather than when KubeRay creates its pods.
        if self.operator == "Exists" and self.value:
            raise ValueError(f"value: must be empty when operator is Exists (got {self.value!r})")
        if not self.key and self.operator != "Exists":
            raise ValueError("operator: must be Exists when key is empty (tolerate every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(
                f"tolerationSeconds: only allowed with effect NoExecute (effect is {self.effect or 'unset'})"
            )
        return self


class OwnsFields(SpecSection):
    """A section some of whose Kubernetes fields the operator owns: `OWNED` says why, for the error that
    refuses one (messages.describe reads it; the CRD prunes them, and kubectl's strict validation says so)."""

    OWNED: ClassVar[dict[str, str]] = {}


class PodMetadata(SpecSection):
    """Labels and annotations added to the pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(_no_reserved_key_cel("labels"), "labels: " + _RESERVED_KEY_MESSAGE, ".labels"),
                cel(_no_reserved_key_cel("annotations"), "annotations: " + _RESERVED_KEY_MESSAGE, ".annotations"),
            ]
        }
    )

    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64, description="Pod labels.")
    annotations: dict[LabelKey, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="Pod annotations."
    )

    @model_validator(mode="after")
    def _no_operator_keys(self) -> PodMetadata:
        for field, keys in (("labels", self.labels), ("annotations", self.annotations)):
            taken = sorted(k for k in keys if _reserved_key(k))
            if taken:
                raise ValueError(f"{field}: {', '.join(taken)}: {_RESERVED_KEY_MESSAGE}")
        return self


class LocalObjectReference(SpecSection):
    """A reference to an object in the job's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="The object's name.")


class SELinuxOptions(SpecSection):
    """The SELinux context of the pods' containers: only the types the restricted profile allows."""

    level: str | None = Field(default=None, max_length=256, description="SELinux level, e.g. s0:c123,c456.")
    type: Literal[SELINUX_TYPES] | None = Field(  # type: ignore[valid-type]
        default=None, description="SELinux type: " + ", ".join(SELINUX_TYPES) + "."
    )


class PodSecurityContextFragment(OwnsFields):
    """What a platform may add to the pods' securityContext; the user, group and privileges stay the
    operator's (restricted, as the trainer image's user)."""

    OWNED: ClassVar[dict[str, str]] = {
        name: "the pods run restricted as the trainer image's user (uid 1000, gid 100); the operator sets it"
        for name in (
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "fsGroup",
            "seccompProfile",
            "sysctls",
            "windowsOptions",
        )
    }

    supplemental_groups: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(
        default_factory=list,
        max_length=32,
        description="Extra groups for the pods' processes (e.g. a shared volume's).",
    )
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] | None = Field(
        default=None, description="When the kubelet changes volume ownership to the pods' group."
    )
    se_linux_options: SELinuxOptions | None = Field(default=None, description="SELinux context of the containers.")


class Volume(OwnsFields):
    """A volume: a name and one source of those a restricted pod may use, passed through as written."""

    OWNED: ClassVar[dict[str, str]] = {
        source: "a restricted pod may use only " + ", ".join(RESTRICTED_VOLUME_SOURCES) + " volumes"
        for source in ("hostPath", "nfs", "iscsi", "rbd", "cephfs", "glusterfs", "flexVolume", "gitRepo")
    }

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!(self.name in {cel_list(OPERATOR_VOLUMES)})",
                    "name: " + ", ".join(OPERATOR_VOLUMES) + " are the operator's volumes",
                    ".name",
                ),
                cel(
                    " + ".join(f"(has(self.{s}) ? 1 : 0)" for s in RESTRICTED_VOLUME_SOURCES) + " == 1",
                    "a volume needs exactly one source: " + ", ".join(RESTRICTED_VOLUME_SOURCES),
                ),
            ]
        }
    )

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="The volume's name.")
    config_map: FreeForm | None = Field(default=None, description="A ConfigMap's keys as files.")
    secret: FreeForm | None = Field(default=None, description="A Secret's keys as files.")
    persistent_volume_claim: FreeForm | None = Field(
        default=None, alias="persistentVolumeClaim", description="A PersistentVolumeClaim."
    )
    projected: FreeForm | None = Field(default=None, description="Several sources in one directory.")
    downward_api: FreeForm | None = Field(default=None, alias="downwardAPI", description="The pod's own fields.")
    empty_dir: FreeForm | None = Field(default=None, description="A scratch directory.")
    ephemeral: FreeForm | None = Field(default=None, description="A PersistentVolumeClaim made for the pod.")
    csi: FreeForm | None = Field(default=None, description="A CSI driver's inline volume.")

    @model_validator(mode="after")
    def _one_source_not_ours(self) -> Volume:
        if self.name in OPERATOR_VOLUMES:
            raise ValueError(f"name: '{self.name}' is one of the operator's volumes ({', '.join(OPERATOR_VOLUMES)})")
        fields = type(self).model_fields
        given = {info.alias or name for name, info in fields.items() if getattr(self, name) is not None}
        sources = [source for source in RESTRICTED_VOLUME_SOURCES if source in given]
        if len(sources) != 1:
            raise ValueError(
                f"needs exactly one source of {', '.join(RESTRICTED_VOLUME_SOURCES)} (the ones a restricted pod "
                f"may use); got {', '.join(sources) or 'none'}"
            )
        return self


class PodSpecFragment(OwnsFields):
    """Scheduling, identity and extra volumes for the pods."""

    OWNED: ClassVar[dict[str, str]] = {
        "containers": f"{_OWNED_CONTAINER}; set its env, envFrom and volumeMounts under podTemplate.container",
        "initContainers": "the operator and KubeRay own the pods' containers",
        "automountServiceAccountToken": "the pods never call the Kubernetes API; the operator turns it off",
        **{
            name: "host namespaces and ports break the restricted pod security the pods run with"
            for name in ("hostNetwork", "hostPID", "hostIPC", "hostUsers")
        },
        "restartPolicy": "KubeRay sets it",
        "terminationGracePeriodSeconds": "the operator sets it from spec.runPolicy (time to checkpoint on preemption)",
        "serviceAccount": "deprecated; use serviceAccountName",
    }

    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets to pull the trainer image with."
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description=(
            "ServiceAccount the pods run as, e.g. one bound to a cloud identity (IRSA, GKE workload identity); "
            "the operator's shared trainer account when omitted."
        ),
    )
    affinity: FreeForm | None = Field(
        default=None, description="A Kubernetes affinity (nodeAffinity, podAffinity, podAntiAffinity), as written."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerations.")
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Node labels the pods must match."
    )
    topology_spread_constraints: list[FreeForm] = Field(
        default_factory=list, max_length=8, description="Kubernetes topologySpreadConstraints, as written."
    )
    runtime_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="RuntimeClass of the pods (e.g. nvidia)."
    )
    scheduler_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="Scheduler of the pods (e.g. volcano)."
    )
    priority_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass of the pods."
    )
    volumes: list[Volume] = Field(default_factory=list, max_length=32, description="Extra volumes.")
    security_context: PodSecurityContextFragment | None = Field(
        default=None, description="Additions to the pods' restricted securityContext."
    )


class EnvVar(SpecSection):
    """An env var of the Ray container, as in a Pod (the kubelet expands $(VAR) in `value`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!(self.name in {cel_list(OPERATOR_ENV)})"
                    + "".join(f" && !self.name.startsWith('{p}')" for p in OPERATOR_ENV_PREFIXES),
                    "name: the operator sets this variable",
                    ".name",
                ),
                cel("!(has(self.value) && has(self.valueFrom))", "value and valueFrom are exclusive"),
            ]
        }
    )

    name: str = Field(pattern=ENV_NAME, max_length=256, description="The variable's name.")
    value: str | None = Field(default=None, max_length=32768, description="Its value.")
    value_from: FreeForm | None = Field(
        default=None, description="Its source: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef."
    )

    @model_validator(mode="after")
    def _not_the_operators(self) -> EnvVar:
        if self.name in OPERATOR_ENV or self.name.startswith(OPERATOR_ENV_PREFIXES):
            raise ValueError(
                f"name: {self.name} is set by the operator (from the spec: storage, the trainer's config, Ray's "
                "token); change the spec instead"
            )
        if self.value is not None and self.value_from is not None:
            raise ValueError("valueFrom: not allowed together with value")
        return self


class EnvFromSource(SpecSection):
    """All keys of a ConfigMap or Secret as env vars (the operator's own variables still win)."""

    config_map_ref: FreeForm | None = Field(default=None, description="A ConfigMap: name, optional.")
    secret_ref: FreeForm | None = Field(default=None, description="A Secret: name, optional.")
    prefix: str | None = Field(default=None, pattern=ENV_NAME, max_length=256, description="Prefix for each name.")


class VolumeMount(SpecSection):
    """Where a podTemplate volume is mounted in the Ray container."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!(self.mountPath in {cel_list(OPERATOR_MOUNT_PATHS)})",
                    "mountPath: the operator mounts its own volumes at " + ", ".join(OPERATOR_MOUNT_PATHS),
                    ".mountPath",
                ),
            ]
        }
    )

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="The volume's name (from podTemplate volumes).")
    mount_path: str = Field(pattern=MOUNT_PATH, max_length=1024, description="Absolute path in the container.")
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    sub_path: str | None = Field(
        default=None, pattern=r"^[^/](.*[^/])?$", max_length=1024, description="A path inside the volume to mount."
    )

    @model_validator(mode="after")
    def _not_over_ours(self) -> VolumeMount:
        if self.sub_path and ".." in self.sub_path.split("/"):
            raise ValueError(f"subPath: must stay inside the volume (no '..' segments; got {self.sub_path})")
        path = posixpath.normpath(self.mount_path)
        for ours in OPERATOR_MOUNT_PATHS:
            if path == ours or ours.startswith(path.rstrip("/") + "/"):
                raise ValueError(f"mountPath: {self.mount_path} would cover the operator's mount at {ours}")
        return self


class ContainerFragment(OwnsFields):
    """What a platform may add to the Ray container that runs the trainer."""

    OWNED: ClassVar[dict[str, str]] = {
        "command": f"{_OWNED_CONTAINER}: it runs Ray and the trainer",
        "args": f"{_OWNED_CONTAINER}: it runs Ray and the trainer",
        "image": f"{_OWNED_CONTAINER}: set spec.image",
        "imagePullPolicy": f"{_OWNED_CONTAINER}: the operator's setting",
        "resources": f"{_OWNED_CONTAINER}: set spec.resources",
        "ports": f"{_OWNED_CONTAINER}: Ray's ports",
        "securityContext": f"{_OWNED_CONTAINER}: it runs restricted",
        "name": f"{_OWNED_CONTAINER}: it names it",
        "lifecycle": f"{_OWNED_CONTAINER}: its preStop hook checkpoints on preemption",
    }

    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra env vars.")
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16, description="Env vars from objects.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=32, description="Mounts of podTemplate volumes."
    )


class PodTemplateFragment(SpecSection):
    """Additions to Ray pods: their metadata, pod spec and Ray container."""

    metadata: PodMetadata = Field(default_factory=PodMetadata, description="Pod labels and annotations.")
    spec: PodSpecFragment = Field(default_factory=PodSpecFragment, description="Pod spec additions.")
    container: ContainerFragment = Field(
        default_factory=ContainerFragment, description="Additions to the Ray container (the trainer's)."
    )


ROLES = ("head", "workers")


def _both(role: str, field: str) -> str:
    """CEL: the common and the role's `field` lists, added up (sections default to {} in the CRD)."""
    return f"((has(self.{field}) ? self.{field} : []) + (has(self.{role}.{field}) ? self.{role}.{field} : []))"


def _merge_cel_rules() -> list[Any]:
    rules: list[Any] = []
    for role in ROLES:
        volumes, mounts = _both(role, "spec.volumes"), _both(role, "container.volumeMounts")
        rules.append(
            cel(
                f"{volumes}.all(v, {volumes}.filter(w, w.name == v.name).size() == 1)",
                f"spec.volumes: a volume name is defined twice in the {role} pods (common and {role} volumes add up)",
                ".spec.volumes",
            )
        )
        rules.append(
            cel(
                f"{mounts}.all(m, {volumes}.exists(v, v.name == m.name))",
                f"container.volumeMounts: a mount names no volume of the {role} pods",
                ".container.volumeMounts",
            )
        )
    return rules


class PodTemplate(PodTemplateFragment):
    """Additions to every Ray pod, with `head` and `workers` for what differs (those win where both say)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _merge_cel_rules()})

    head: PodTemplateFragment = Field(default_factory=PodTemplateFragment, description="Only for the head pod.")
    workers: PodTemplateFragment = Field(default_factory=PodTemplateFragment, description="Only for the worker pods.")

    def for_role(self, role: Literal["head", "workers"]) -> PodTemplateFragment:
        """The common fragment and the role's, merged (see `merge`)."""
        return merge(self, self.head if role == "head" else self.workers)

    @model_validator(mode="after")
    def _each_merge_is_a_valid_pod(self) -> PodTemplate:
        for role in ROLES:
            check_merged(self.for_role(role), role)  # type: ignore[arg-type]
        return self


def _by_name(items: list[Any]) -> dict[str, Any]:
    return {item.name: item for item in items}


def merge(common: PodTemplateFragment, role: PodTemplateFragment) -> PodTemplateFragment:
    """`role` over `common`: maps merge (role's keys win), lists add up (env by name, role's wins), and a
    field the role sets replaces the common one."""
    a, b = common.spec, role.spec
    security = _merged_security(a.security_context, b.security_context)
    spec = a.model_copy(
        update={
            "image_pull_secrets": list(_by_name([*a.image_pull_secrets, *b.image_pull_secrets]).values()),
            "tolerations": [*a.tolerations, *b.tolerations],
            "node_selector": {**a.node_selector, **b.node_selector},
            "topology_spread_constraints": [*a.topology_spread_constraints, *b.topology_spread_constraints],
            "volumes": [*a.volumes, *b.volumes],
            "security_context": security,
            **{name: getattr(b, name) for name in _SCALARS if getattr(b, name) is not None},
        }
    )
    container = ContainerFragment(
        env=list({**_by_name(common.container.env), **_by_name(role.container.env)}.values()),
        env_from=[*common.container.env_from, *role.container.env_from],
        volume_mounts=[*common.container.volume_mounts, *role.container.volume_mounts],
    )
    metadata = PodMetadata(
        labels={**common.metadata.labels, **role.metadata.labels},
        annotations={**common.metadata.annotations, **role.metadata.annotations},
    )
    return PodTemplateFragment(metadata=metadata, spec=spec, container=container)


def _merged_security(
    common: PodSecurityContextFragment | None, role: PodSecurityContextFragment | None
) -> PodSecurityContextFragment | None:
    if common is None or role is None:
        return role or common
    return PodSecurityContextFragment(
        supplemental_groups=[*common.supplemental_groups, *role.supplemental_groups],
        fs_group_change_policy=role.fs_group_change_policy or common.fs_group_change_policy,
        se_linux_options=role.se_linux_options or common.se_linux_options,
    )


_SCALARS = ("service_account_name", "affinity", "runtime_class_name", "scheduler_name", "priority_class_name")


def check_merged(fragment: PodTemplateFragment, role: str) -> None:
    """What only the merged pod shows: volumes named twice, mounts of volumes nobody defined, two mounts at
    one path. Raises ValueError naming the field (under podTemplate)."""
    names = [v.name for v in fragment.spec.volumes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"spec.volumes: {', '.join(twice)} defined twice in the {role} pods (podTemplate.spec.volumes and "
            f"podTemplate.{role}.spec.volumes are added up)"
        )
    paths = [m.mount_path for m in fragment.container.volume_mounts]
    for mount in fragment.container.volume_mounts:
        if mount.name not in names:
            raise ValueError(
                f"container.volumeMounts: '{mount.name}' is no volume of the {role} pods (defined: "
                f"{', '.join(names) or 'none'})"
            )
        if paths.count(mount.mount_path) > 1:
            raise ValueError(f"container.volumeMounts: two mounts at {mount.mount_path} in the {role} pods")
