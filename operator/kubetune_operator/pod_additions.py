"""spec.podTemplate and the job's labels, applied to the pod templates the builders made (pure).

`builders` makes each Ray pod's template from the spec with the operator's own fields; `add_pod_template`
then adds what spec.podTemplate says for that pod (`PodTemplate.for_role`) where the operator's fields stay
as they were: its labels, volumes, mounts, env, container and the restricted securityContext (the spec
model has refused a podTemplate that would touch them, naming the field).
"""

from __future__ import annotations

from typing import Any

from kubetune_operator.pod_names import HEAD, OPERATOR_LABEL_KEYS, OPERATOR_LABEL_PREFIXES
from kubetune_operator.pod_template import PodTemplateFragment
from kubetune_operator.spec import FineTuneJob

JOB_NAME_LABEL = "kubetune.dev/job-name"
JOB_UID_LABEL = "kubetune.dev/job-uid"
# Labels kubectl, Helm and Argo CD put on what they apply: about the FineTuneJob, not about its children.
BOOKKEEPING_LABEL_PREFIXES = ("kubectl.kubernetes.io/", "helm.sh/", "meta.helm.sh/", "argocd.argoproj.io/")
BOOKKEEPING_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/instance")


def copied_labels(job: FineTuneJob) -> dict[str, str]:
    """The job's own labels for its RayJob and pods (cost attribution, team, app), less bookkeeping."""
    return {
        key: value
        for key, value in job.metadata.labels.items()
        if not key.startswith(BOOKKEEPING_LABEL_PREFIXES + OPERATOR_LABEL_PREFIXES)
        and key not in BOOKKEEPING_LABELS + OPERATOR_LABEL_KEYS
    }


def identity_labels(job: FineTuneJob) -> dict[str, str]:
    """`kubetune.dev/job-name` and, once the job exists in a cluster, `kubetune.dev/job-uid`.

    A job read from a file (`kubetune render`) has no uid yet: its pods show only the name.
    """
    labels = {JOB_NAME_LABEL: job.metadata.name}
    if job.metadata.uid:
        labels[JOB_UID_LABEL] = job.metadata.uid
    return labels


def service_account_name(job: FineTuneJob, component: str, default: str) -> str:
    """The ServiceAccount a `component` pod runs as: podTemplate's, else the operator's shared one."""
    return _fragment(job, component).spec.service_account_name or default


def _fragment(job: FineTuneJob, component: str) -> PodTemplateFragment:
    return job.spec.pod_template.for_role("head" if component == HEAD else "workers")


def add_pod_template(job: FineTuneJob, component: str, template: dict[str, Any]) -> dict[str, Any]:
    """`template` (the operator's, for a `component` pod) with spec.podTemplate added; the operator's
    labels, env, mounts and volumes stay first and as they were."""
    extra = _fragment(job, component)
    meta = template["metadata"]
    meta["labels"] = {**copied_labels(job), **extra.metadata.labels, **meta["labels"], **identity_labels(job)}
    if extra.metadata.annotations:
        meta["annotations"] = {**extra.metadata.annotations, **meta.get("annotations", {})}
    _add_to_spec(template["spec"], extra)
    _add_to_container(template["spec"]["containers"][0], extra)
    return template


def _dump(items: list[Any]) -> list[dict[str, Any]]:
    return [item.model_dump(by_alias=True, exclude_none=True) for item in items]


def _add_to_spec(spec: dict[str, Any], extra: PodTemplateFragment) -> None:
    add = extra.spec
    if add.image_pull_secrets:
        spec["imagePullSecrets"] = _dump(add.image_pull_secrets)
    if add.node_selector:
        spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **add.node_selector}
    if add.tolerations:
        spec["tolerations"] = [*spec.get("tolerations", []), *_dump(add.tolerations)]
    if add.topology_spread_constraints:
        spec["topologySpreadConstraints"] = list(add.topology_spread_constraints)
    for field, value in (
        ("affinity", add.affinity),
        ("runtimeClassName", add.runtime_class_name),
        ("schedulerName", add.scheduler_name),
        ("priorityClassName", add.priority_class_name),
    ):
        if value is not None:
            spec[field] = value
    if add.volumes:
        spec["volumes"] = [*spec["volumes"], *_dump(add.volumes)]
    if add.security_context:
        # Only fields the restricted profile leaves open: the operator's user, group and seccomp stay.
        additions = add.security_context.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        spec["securityContext"] = {**additions, **spec["securityContext"]}


def _add_to_container(container: dict[str, Any], extra: PodTemplateFragment) -> None:
    add = extra.container
    if add.env:
        container["env"] = [*container["env"], *_dump(add.env)]
    if add.env_from:
        container["envFrom"] = _dump(add.env_from)
    if add.volume_mounts:
        container["volumeMounts"] = [*container["volumeMounts"], *_dump(add.volume_mounts)]
