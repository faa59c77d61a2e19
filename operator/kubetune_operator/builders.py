"""FineTuneJob → what runs it: a KubeRay RayJob, its NetworkPolicy and Ray token Secret, and its
namespace's shared trainer ServiceAccount (pure).

The operator creates exactly what `build_children` returns, after the job's Ray token Secret
(`build_ray_token_secret`, with a token the operator draws at launch) and the namespace's shared
ServiceAccount; `kubetune render` prints them all (`manifests`, the Secret without its token), so the
RayJob's shape lives here and nowhere else. Names are derived from the job's name, so a handler that runs
twice finds what it created the first time.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
from typing import Any

from kubetune_operator.pod_additions import add_pod_template, copied_labels, service_account_name
from kubetune_operator.pod_names import (
    ACCESS_KEY_ID,
    CA_DIR,
    CA_VOLUME,
    CACHE_DIR,
    CACHE_DIR_ENV,
    HEAD,
    PROGRESS_URL_ENV,
    RAY_AUTH_MODE_ENV,
    RAY_AUTH_TOKEN_ENV,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    SHM_DIR,
    SHM_VOLUME,
    TOKEN_DIR,
    TOKEN_VOLUME,
    WORKER,
)
from kubetune_operator.pod_security import (
    container_security_context,
    ephemeral_storage_request,
    pod_security_context,
    scratch_mounts,
    scratch_volumes,
)
from kubetune_operator.retention import end_of_run
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import API_VERSION, KIND, FineTuneJob
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.config import CA_BUNDLE_ENV, CONFIG_ENV, PRESTOP_COMMAND, RAY_TRAIN_ENV, ProgressTarget

RAYJOB_API_VERSION = "ray.io/v1"
RAYJOB_KIND = "RayJob"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
JOB_LABEL = "kubetune.dev/job"
COMPONENT_LABEL = "app.kubernetes.io/component"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Digest of the spec the RayJob was built from: a later spec edit that would change the run is refused.
SPEC_DIGEST_ANNOTATION = "kubetune.dev/spec-digest"
# Spec fields that may change while a job runs: they steer the job, not the run.
MUTABLE_SPEC_FIELDS = (("runPolicy", "suspend"), ("runPolicy", "ttlSecondsAfterFinished"))

# The trainer config travels in the RayJob as the head container's env (CONFIG_ENV, the name the trainer
# reads): the job's driver runs on the head and inherits its env; the Train workers get the config from
# the driver through Ray Train. (It holds no secret: credentials are secretKeyRef env.) One object fewer
# per job than a ConfigMap.
ENTRYPOINT = "python -m kubetune_trainer"
# Every job's pods share one ServiceAccount per namespace (one object fewer to create per job); what ties a
# token to one job is its audience, `token_audience(...)`.
TOKEN_AUDIENCE_PREFIX = "kubetune.dev"
TRAINER_COMPONENT = "trainer-identity"
TOKEN_PATH = f"{TOKEN_DIR}/token"

HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
DASHBOARD_PORT = 8265
WORKER_GROUP = "workers"

# Ray token authentication (Ray >= 2.52, KubeRay >= 1.5): with RAY_AUTH_MODE=token every Ray service of
# the cluster (GCS, raylets, the dashboard and its Jobs API, the client server) refuses a caller without
# the token. KubeRay reads the token from the Secret `authOptions.secretName` names, key `auth_token`, to
# submit the run; the pods get it as RAY_AUTH_TOKEN from the same key.
RAY_TOKEN_SECRET_SUFFIX = "-ray-token"
RAY_TOKEN_KEY = "auth_token"
NETWORK_POLICY_SUFFIX = "-ray"
# The label every namespace carries with its own name (Kubernetes >= 1.21).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# What `kubetune render` says instead of a token: it prints the Secret without one (applied as it is, the
# pods do not start), as a token printed there would be known to whoever reads the output.
RENDER_TOKEN_NOTE_ANNOTATION = "kubetune.dev/note"
RENDER_TOKEN_NOTE = (
    f"the operator generates {RAY_TOKEN_KEY} at launch; kubetune render leaves it out. To run without the "
    f"operator, add one: kubectl create secret generic <name> --from-literal={RAY_TOKEN_KEY}=$(openssl rand -hex 32)"
)


def token_audience(namespace: str, name: str, uid: str | None) -> str:
    """The audience of the projected token that lets a job's pods (and no other's) report its progress.

    The uid makes a token minted for a deleted job useless for a new job of the same name; a job read
    from a file has none yet (`kubetune render`), and gets its namespace and name instead.
    """
    return f"{TOKEN_AUDIENCE_PREFIX}/{uid}" if uid else f"{TOKEN_AUDIENCE_PREFIX}/{namespace}/{name}"


def rayjob_name(job_name: str) -> str:
    return job_name


def progress_target(job: FineTuneJob, settings: OperatorSettings) -> ProgressTarget | None:
    url = settings.progress_url(job.metadata.namespace or "default", job.metadata.name)
    return ProgressTarget(url=url, token_path=TOKEN_PATH) if url else None


def job_labels(job: FineTuneJob) -> dict[str, str]:
    """Labels on everything the operator creates for `job`; the operator watches RayJobs by them."""
    return {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: job.metadata.name}


def owner_reference(job: FineTuneJob) -> dict[str, Any] | None:
    """The job as controller of its children, so Kubernetes deletes them with it (None before it has a uid)."""
    if not job.metadata.uid:
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_digest(job: FineTuneJob) -> str:
    """A digest of everything in the spec that shapes the run (all but MUTABLE_SPEC_FIELDS)."""
    spec = job.spec.model_dump(by_alias=True, mode="json")
    for section, name in MUTABLE_SPEC_FIELDS:
        spec.get(section, {}).pop(name, None)
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _metadata(job: FineTuneJob, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["labels"] = {**job_labels(job), **(extra_labels or {})}
    owner = owner_reference(job)
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def build_service_account(namespace: str, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer pods' ServiceAccount, shared by every job in `namespace`.

    No ownerReference: it outlives each job. No API token is mounted: the pods never call the Kubernetes
    API; the progress token is a separate projected volume with the job's own audience.
    """
    account: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": settings.trainer_service_account,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: TRAINER_COMPONENT},
        },
        "automountServiceAccountToken": False,
    }
    if settings.trainer_service_account_annotations:  # a cloud identity (IRSA, GKE workload identity)
        account["metadata"]["annotations"] = dict(settings.trainer_service_account_annotations)
    return account


# -- the Ray cluster's token and network ------------------------------------------------------------------


def ray_token_secret_name(job_name: str) -> str:
    return job_name + RAY_TOKEN_SECRET_SUFFIX


def build_ray_token_secret(job: FineTuneJob, token: str | None) -> dict[str, Any]:
    """The Secret holding the job's Ray token, owned by the job (it goes when the job goes).

    `token` is drawn by the operator at launch (`new_ray_token`) and nowhere else written down: not in the
    RayJob, the status, Events or logs. None (`kubetune render`) leaves the data out and says so.
    """
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(job, ray_token_secret_name(job.metadata.name)),
        "type": "Opaque",
    }
    if token is None:
        secret["metadata"]["annotations"] = {RENDER_TOKEN_NOTE_ANNOTATION: RENDER_TOKEN_NOTE}
    else:
        secret["data"] = {RAY_TOKEN_KEY: base64.b64encode(token.encode()).decode()}
    return secret


def new_ray_token() -> str:
    """A fresh Ray token: 256 random bits as hex, as Ray's own `ray get-auth-token --generate` makes."""
    return secrets.token_hex(32)


def ray_auth_options(job: FineTuneJob) -> dict[str, Any]:
    """KubeRay's `rayClusterSpec.authOptions`: token auth with the job's Secret (KubeRay makes none)."""
    return {"mode": "token", "secretName": ray_token_secret_name(job.metadata.name)}


def ray_auth_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """Token auth in every Ray process of the pod, whatever KubeRay adds: the token only as a reference."""
    ref = {"name": ray_token_secret_name(job.metadata.name), "key": RAY_TOKEN_KEY}
    return [
        literal_env(RAY_AUTH_MODE_ENV, "token"),
        {"name": RAY_AUTH_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}},
    ]


def network_policy_name(job_name: str) -> str:
    return job_name + NETWORK_POLICY_SUFFIX


def build_network_policy(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Who may connect to the job's Ray pods: the job's own pods, on any port (the GCS, raylets, object
    managers and workers listen on many), and KubeRay's operator on the dashboard port, which it submits
    the run through. Nothing else; egress is left alone (S3, the progress endpoint, DNS).
    """
    own_pods = {"podSelector": {"matchLabels": job_labels(job)}}
    kuberay: dict[str, Any] = {"podSelector": {"matchLabels": dict(settings.kuberay_pod_labels)}}
    kuberay["namespaceSelector"] = (
        {"matchLabels": {NAMESPACE_NAME_LABEL: settings.kuberay_namespace}} if settings.kuberay_namespace else {}
    )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, network_policy_name(job.metadata.name)),
        "spec": {
            "podSelector": {"matchLabels": job_labels(job)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own_pods]},
                {"from": [kuberay], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def trainer_config_json(job: FineTuneJob, settings: OperatorSettings) -> str:
    """The TrainerConfig the entrypoint reads from CONFIG_ENV."""
    return trainer_config(job, progress=progress_target(job, settings)).model_dump_json(by_alias=True)


def env_value(text: str) -> str:
    """`text` as a container env `value` that the process receives verbatim.

    The kubelet expands `$(VAR)` in env values and turns `$$` into `$`; doubling every `$` undoes both.
    """
    return text.replace("$", "$$")


def literal_env(name: str, value: str) -> dict[str, Any]:
    """An env var with a literal value, written so the kubelet's `$(VAR)` expansion leaves it as it is."""
    return {"name": name, "value": env_value(value)}


def _env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    storage = job.spec.storage
    env: list[dict[str, Any]] = [
        literal_env("AWS_REGION", storage.region),
        literal_env("AWS_DEFAULT_REGION", storage.region),
    ]
    if storage.endpoint:
        env.append(literal_env("AWS_ENDPOINT_URL", storage.endpoint))
    if storage.credentials_secret:
        # Credentials only ever as references: the RayJob, and anything that prints it, holds no secret.
        for key, optional in ((ACCESS_KEY_ID, False), (SECRET_ACCESS_KEY, False), (SESSION_TOKEN, True)):
            ref = {"name": storage.credentials_secret, "key": key, "optional": optional}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if storage.ca_bundle:
        env.append(literal_env(CA_BUNDLE_ENV, f"{CA_DIR}/{storage.ca_bundle.key}"))
    target = progress_target(job, settings)
    if target:
        env.append(literal_env(PROGRESS_URL_ENV, target.url))
    env += [literal_env(name, value) for name, value in RAY_TRAIN_ENV.items()]
    return env + ray_auth_env(job)


def _volumes(job: FineTuneJob, settings: OperatorSettings, component: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # Memory-backed /dev/shm: Ray's object store and PyTorch's DataLoader workers share tensors
        # through it, and the container runtime's default of 64Mi is far too small.
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        *scratch_volumes(job, component),
    ]
    ca_bundle = job.spec.storage.ca_bundle
    if ca_bundle:
        items = [{"key": ca_bundle.key, "path": ca_bundle.key}]
        volumes.append({"name": CA_VOLUME, "configMap": {"name": ca_bundle.config_map, "items": items}})
    # The progress token on the head only: its driver alone sends progress.
    if settings.progress_base_url and component == HEAD:
        meta = job.metadata
        token = {
            "audience": token_audience(meta.namespace or "default", meta.name, meta.uid),
            "expirationSeconds": settings.token_expiration_seconds,
            "path": "token",
        }
        volumes.append({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}})
    return volumes


def _mounts(job: FineTuneJob, settings: OperatorSettings, component: str) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "mountPath": SHM_DIR},
        *scratch_mounts(component),
    ]
    if job.spec.storage.ca_bundle:
        mounts.append({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True})
    if settings.progress_base_url and component == HEAD:
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    return mounts


def _pod_template(
    job: FineTuneJob,
    settings: OperatorSettings,
    *,
    component: str,
    container: dict[str, Any],
    scheduling: dict[str, Any],
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(job, component, settings.trainer_service_account),
        "automountServiceAccountToken": False,
        # A drained or reclaimed node's pods get this long to checkpoint the current step (see _container).
        "terminationGracePeriodSeconds": job.spec.run_policy.preemption_grace_seconds,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(job, settings, component),
        **scheduling,
    }
    if job.spec.resources.priority_class_name:
        spec["priorityClassName"] = job.spec.resources.priority_class_name
    template = {"metadata": {"labels": {**job_labels(job), COMPONENT_LABEL: component}}, "spec": spec}
    return add_pod_template(job, component, template)


def _container(
    job: FineTuneJob, settings: OperatorSettings, component: str, resources: dict[str, Any]
) -> dict[str, Any]:
    """The Ray container of a `component` (HEAD or WORKER) pod, named after it."""
    resources["requests"]["ephemeral-storage"] = ephemeral_storage_request(job, component)
    return {
        "name": component,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.trainer_image_pull_policy,
        "env": _env(job, settings),
        "volumeMounts": _mounts(job, settings, component),
        "resources": resources,
        # The pod's main process (`ray start`) does not pass SIGTERM on: the hook sends it to the pod's Ray
        # Train workers and training driver, which checkpoint the current step (kubetune_trainer.preemption).
        "lifecycle": {
            "preStop": {"exec": {"command": [*PRESTOP_COMMAND, str(job.spec.run_policy.preemption_grace_seconds)]}}
        },
        "securityContext": container_security_context(),
    }


def _head_group(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    compute = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    container = _container(job, settings, HEAD, {"requests": dict(compute), "limits": dict(compute)})
    # Only the head: the driver runs there; workers take the config from it through Ray Train.
    container["env"].append(literal_env(CONFIG_ENV, trainer_config_json(job, settings)))
    container["ports"] = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS]
    template = _pod_template(job, settings, component=HEAD, container=container, scheduling={})
    if job.spec.resources.workers.elastic:
        template["spec"]["volumes"].append(copy.deepcopy(AUTOSCALER_TOKEN_VOLUME))
    return {
        # num-cpus 0: Ray schedules no training worker here, only the driver and Ray Train's
        # controller (which asks for no CPU), so the head needs no GPU node.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": template,
    }


# Elastic workers: KubeRay's autoscaler sidecar on the head adds worker pods (up to maxReplicas) when Ray
# Train asks for more workers, and removes idle ones. The head pod mounts no service-account token (the
# trainer needs none); the sidecar alone gets one, through this projected volume, for the Role KubeRay
# binds to the head's ServiceAccount (pods and RayCluster in the job's namespace).
AUTOSCALER_TOKEN_VOLUME: dict[str, Any] = {
    "name": "autoscaler-kube-api-access",
    "projected": {
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]
    },
}
AUTOSCALER_IDLE_TIMEOUT_S = 60
AUTOSCALER_COMPUTE = {"cpu": "500m", "memory": "512Mi"}


def _autoscaler_options() -> dict[str, Any]:
    """KubeRay's autoscaler sidecar for elastic workers: restricted as the Ray containers are, with the
    token volume mounted where the Kubernetes client looks for it."""
    return {
        "upscalingMode": "Default",
        "idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_S,
        "resources": {"requests": dict(AUTOSCALER_COMPUTE), "limits": dict(AUTOSCALER_COMPUTE)},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {
                "name": AUTOSCALER_TOKEN_VOLUME["name"],
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ],
    }


def _worker_group(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    res = job.spec.resources
    compute: dict[str, str] = {"cpu": str(res.cpus_per_worker), "memory": res.memory_per_worker}
    if res.gpus_per_worker > 0:
        compute["nvidia.com/gpu"] = str(res.gpus_per_worker)
    container = _container(job, settings, WORKER, {"requests": dict(compute), "limits": dict(compute)})
    container["env"].append(literal_env(CACHE_DIR_ENV, CACHE_DIR))
    scheduling: dict[str, Any] = {}
    if res.node_selector:
        scheduling["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        scheduling["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    workers = job.spec.cluster_workers
    return {
        "groupName": WORKER_GROUP,
        # One Ray Train worker per pod: a fixed size (min = max), or elastic, where the autoscaler adds pods
        # up to max as Ray Train asks for them and the run starts once min are placed. A sweep's cluster
        # holds resources.workers for each trial that trains at once.
        "replicas": workers.min,
        "minReplicas": workers.min,
        "maxReplicas": workers.max,
        # KubeRay reads the GPU count from the container's limits; the CPU count is said explicitly so
        # Ray's view matches the pod's request even where the node has more cores.
        "rayStartParams": {"num-cpus": str(res.cpus_per_worker)},
        "template": _pod_template(job, settings, component=WORKER, container=container, scheduling=scheduling),
    }


def build_rayjob(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    policy = job.spec.run_policy
    extra_labels = {**copied_labels(job), **({QUEUE_LABEL: policy.queue_name} if policy.queue_name else {})}
    metadata = _metadata(job, rayjob_name(job.metadata.name), extra_labels)
    metadata["annotations"] = {SPEC_DIGEST_ANNOTATION: spec_digest(job)}
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        # HTTPMode: the KubeRay operator submits the Ray job to the head's dashboard over HTTP itself, so
        # there is no submitter pod to evict. K8sJobMode (the default) runs `ray job submit` in a separate
        # Job pod, and an eviction of that pod can fail the RayJob. SidecarMode would survive too, but
        # needs KubeRay >= 1.5 and the head pod's restartPolicy Never; HTTPMode works since KubeRay 1.1.
        "submissionMode": "HTTPMode",
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend,
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            "authOptions": ray_auth_options(job),
            "enableInTreeAutoscaling": job.spec.resources.workers.elastic,
            "headGroupSpec": _head_group(job, settings),
            "workerGroupSpecs": [_worker_group(job, settings)],
        },
    }
    if job.spec.resources.workers.elastic:
        spec["rayClusterSpec"]["autoscalerOptions"] = _autoscaler_options()
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.start_deadline_seconds is not None:
        spec["preRunningDeadlineSeconds"] = policy.start_deadline_seconds
    # What KubeRay deletes when the run ends: a failed job's head stays for keepFailedFor (retention.py).
    end = end_of_run(policy, settings, suspended=policy.suspend, elastic=job.spec.resources.workers.elastic)
    spec.update({key: value for key, value in end.items() if value is not None})
    return {"apiVersion": RAYJOB_API_VERSION, "kind": RAYJOB_KIND, "metadata": metadata, "spec": spec}


def build_children(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything the operator creates for `job` alone, in the order it creates them, the RayJob last.

    Before them come the namespace's shared ServiceAccount (`build_service_account`) and the job's Ray
    token Secret (`build_ray_token_secret`, whose token the operator draws at launch): the RayJob's pods
    need both.
    """
    network_policy = [build_network_policy(job, settings)] if settings.network_policy else []
    return [*network_policy, build_rayjob(job, settings)]


def manifests(jobs: list[FineTuneJob], settings: OperatorSettings) -> list[dict[str, Any]]:
    """All a user applies to run `jobs`: each namespace's shared ServiceAccount (once, first), then each
    job's Ray token Secret, without its token (`RENDER_TOKEN_NOTE`), and its children."""
    namespaces = dict.fromkeys(job.metadata.namespace or "default" for job in jobs)
    accounts = [build_service_account(namespace, settings) for namespace in namespaces]
    return accounts + [
        child for job in jobs for child in [build_ray_token_secret(job, None), *build_children(job, settings)]
    ]
