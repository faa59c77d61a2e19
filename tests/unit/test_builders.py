"""The objects the operator creates for a job: what KubeRay and the API server accept, and what they hold."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_operator.builders import (
    COMPONENT_LABEL,
    CONFIG_ENV,
    JOB_LABEL,
    MANAGED_BY_LABEL,
    QUEUE_LABEL,
    SPEC_DIGEST_ANNOTATION,
    TOKEN_PATH,
    build_children,
    build_ray_token_secret,
    build_rayjob,
    build_service_account,
    manifests,
    new_ray_token,
    spec_digest,
    token_audience,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.config import RAY_TRAIN_ENV, ProgressTarget, TrainerConfig, run_digest
from tests.support.k8s_schema import KUBERNETES_VERSION
from tests.support.rayjob_schema import assert_valid_rayjob, rayjob_validator

SETTINGS = OperatorSettings(trainer_image="registry.example/kubetune-trainer:1.2.3")


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "output": {"path": "s3://runs/flowers/"},
        "storage": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1", "credentialsSecret": "s3-creds"},
    }
    for section, values in spec_overrides.items():  # merged into the section; None removes a field
        merged = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
        spec[section] = {k: v for k, v in merged.items() if v is not None} if isinstance(merged, dict) else merged
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "vision", "uid": "3f1c2d4e-0000-4000-8000-000000000001"},
        "spec": spec,
    }


def job(**spec_overrides: Any) -> FineTuneJob:
    return FineTuneJob.from_body(manifest(**spec_overrides))


def children(**spec_overrides: Any) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in build_children(job(**spec_overrides), SETTINGS)}


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cpu-only": {"resources": {"workers": 2, "gpusPerWorker": 0, "cpusPerWorker": 2, "memoryPerWorker": "4Gi"}},
    "multi-gpu-scheduling": {
        "resources": {
            "workers": 4,
            "gpusPerWorker": 8,
            "cpusPerWorker": 32,
            "memoryPerWorker": "512Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "ml",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                },
            ],
            "priorityClassName": "ml-high",
        }
    },
    "run-policy": {
        "runPolicy": {
            "backoffLimit": 2,
            "maxRetries": 5,
            "activeDeadlineSeconds": 86400,
            "startDeadlineSeconds": 1800,
            "ttlSecondsAfterFinished": 600,
            "suspend": True,
            "queueName": "gpu-queue",
        }
    },
    "aws-no-secret": {"storage": {"region": "us-west-2", "endpoint": None, "credentialsSecret": None}},
    "image-override": {"image": "registry.example/custom-trainer@sha256:" + "a" * 64},
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_every_rayjob_is_valid_for_kuberay_and_kubernetes(variant: str) -> None:
    assert_valid_rayjob(children(**VARIANTS[variant])["RayJob"])


def test_the_shared_service_account_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(build_service_account("vision", SETTINGS), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_the_job_alone_has_its_network_policy_and_rayjob(variant: str) -> None:
    """Besides its Ray token Secret: the pods' ServiceAccount is the namespace's, made once for all its jobs."""
    kinds = [obj["kind"] for obj in build_children(job(**VARIANTS[variant]), SETTINGS)]
    assert kinds == ["NetworkPolicy", "RayJob"]


def test_the_strict_schema_catches_a_misspelt_field() -> None:
    rayjob = copy.deepcopy(children()["RayJob"])
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert list(rayjob_validator().iter_errors(rayjob))


# -- names, ownership, labels ----------------------------------------------------------------------------


def test_children_have_deterministic_names_and_are_owned_by_the_job() -> None:
    objs = {**children(), "Secret": build_ray_token_secret(job(), "t")}
    names = {kind: obj["metadata"]["name"] for kind, obj in objs.items()}
    assert names == {"RayJob": "flowers", "NetworkPolicy": "flowers-ray", "Secret": "flowers-ray-token"}
    for obj in objs.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "vision"
        assert meta["labels"][MANAGED_BY_LABEL] == "kubetune"
        assert meta["labels"][JOB_LABEL] == "flowers"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "flowers",
            "uid": "3f1c2d4e-0000-4000-8000-000000000001",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_a_manifest_not_yet_stored_renders_without_owner() -> None:
    body = manifest()
    del body["metadata"]["uid"]
    the_job = FineTuneJob.from_body(body)
    for obj in [build_ray_token_secret(the_job, None), *build_children(the_job, SETTINGS)]:
        assert "ownerReferences" not in obj["metadata"]


def test_the_shared_service_account_belongs_to_no_job() -> None:
    """It outlives every job: no ownerReference (garbage collection would delete it with the first)."""
    account = build_service_account("vision", SETTINGS)
    meta = account["metadata"]
    assert (meta["name"], meta["namespace"]) == ("kubetune-trainer", "vision")
    assert meta["labels"] == {MANAGED_BY_LABEL: "kubetune", COMPONENT_LABEL: "trainer-identity"}
    assert "ownerReferences" not in meta and JOB_LABEL not in meta["labels"]
    assert account["automountServiceAccountToken"] is False
    renamed = build_service_account("vision", OperatorSettings(trainer_service_account="ml-pods"))
    assert renamed["metadata"]["name"] == "ml-pods"


def test_render_manifests_hold_each_namespaces_account_once_before_each_jobs_objects() -> None:
    second = FineTuneJob.from_body({**manifest(), "metadata": {"name": "birds", "namespace": "vision"}})
    other = FineTuneJob.from_body({**manifest(), "metadata": {"name": "cars", "namespace": "team-b"}})
    objs = manifests([job(), second, other], SETTINGS)
    per_job = [("Secret", "{}-ray-token"), ("NetworkPolicy", "{}-ray"), ("RayJob", "{}")]
    assert [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs] == [
        ("ServiceAccount", "vision", "kubetune-trainer"),
        ("ServiceAccount", "team-b", "kubetune-trainer"),
        *[
            (kind, ns, name.format(job_name))
            for ns, job_name in (("vision", "flowers"), ("vision", "birds"), ("team-b", "cars"))
            for kind, name in per_job
        ],
    ]


def test_queue_name_becomes_the_kueue_label() -> None:
    assert QUEUE_LABEL not in children()["RayJob"]["metadata"]["labels"]
    labels = children(runPolicy={"queueName": "gpu-queue"})["RayJob"]["metadata"]["labels"]
    assert labels[QUEUE_LABEL] == "gpu-queue"


# -- the RayJob ------------------------------------------------------------------------------------------


def _groups(rayjob: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"], workers


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_rayjob_runs_the_trainer_on_the_config_in_the_heads_env() -> None:
    spec = children()["RayJob"]["spec"]
    assert spec["entrypoint"] == "python -m kubetune_trainer"
    assert spec["submissionMode"] == "HTTPMode"
    head, workers = _groups(children()["RayJob"])
    # The driver runs on the head and inherits its env; the workers get the config from the driver.
    assert CONFIG_ENV in {e["name"] for e in _container(head)["env"]}
    assert CONFIG_ENV not in {e["name"] for e in _container(workers)["env"]}
    for group in (head, workers):
        mounts = {m["mountPath"]: m for m in _container(group)["volumeMounts"]}
        assert "/etc/kubetune" not in mounts
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert not any("configMap" in v for v in volumes.values())
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}


def test_workers_get_the_requested_gpus_cpus_and_memory_and_the_head_no_gpu() -> None:
    rayjob = children(resources={"workers": 3, "gpusPerWorker": 2, "cpusPerWorker": 8, "memoryPerWorker": "64Gi"})
    head, workers = _groups(rayjob["RayJob"])
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    resources = _container(workers)["resources"]
    expected = {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    # Compute: requests = limits. Disk: a request only (the node cache and scratch space, pod_security.py).
    assert resources == {"requests": {**expected, "ephemeral-storage": "24Gi"}, "limits": expected}
    assert workers["rayStartParams"]["num-cpus"] == "8"
    head_resources = _container(head)["resources"]
    assert "nvidia.com/gpu" not in head_resources["requests"] | head_resources["limits"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}


def test_cpu_only_workers_ask_for_no_gpu_at_all() -> None:
    _, workers = _groups(children(resources={"gpusPerWorker": 0})["RayJob"])
    resources = _container(workers)["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] | resources["limits"]


def test_scheduling_constraints_go_to_the_workers_and_priority_to_every_pod() -> None:
    rayjob = children(**VARIANTS["multi-gpu-scheduling"])["RayJob"]
    head, workers = _groups(rayjob)
    worker_pod = workers["template"]["spec"]
    assert worker_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker_pod["tolerations"][1] == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoExecute",
        "tolerationSeconds": 60,
    }
    assert "nodeSelector" not in head["template"]["spec"]
    assert worker_pod["priorityClassName"] == head["template"]["spec"]["priorityClassName"] == "ml-high"


def test_run_policy_maps_to_kuberay_fields() -> None:
    spec = children(**VARIANTS["run-policy"])["RayJob"]["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["suspend"]) == (2, 86400, True)
    assert spec["preRunningDeadlineSeconds"] == 1800
    defaults = children()["RayJob"]["spec"]
    assert (defaults["backoffLimit"], defaults["suspend"]) == (0, False)
    assert "activeDeadlineSeconds" not in defaults and "preRunningDeadlineSeconds" not in defaults


def test_every_ray_pod_gets_the_preemption_grace_period_and_passes_sigterm_to_training() -> None:
    for overrides, grace in (({}, 60), ({"runPolicy": {"preemptionGraceSeconds": 300}}, 300)):
        for group in _groups(children(**overrides)["RayJob"]):
            pod = group["template"]["spec"]
            assert pod["terminationGracePeriodSeconds"] == grace
            hook = _container(group)["lifecycle"]["preStop"]["exec"]["command"]
            assert hook == ["python", "-m", "kubetune_trainer.preemption", str(grace)]


def test_s3_settings_are_env_and_credentials_only_secret_references() -> None:
    head, workers = _groups(children()["RayJob"])
    for group in (head, workers):
        env = {e["name"]: e for e in _container(group)["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
        assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key, "optional": False}
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_every_ray_process_runs_without_the_ray_train_extras_kubetune_does_not_use() -> None:
    # Polling actors and threads that took CPU from training (bench/findings.md): off on head and workers.
    head, workers = _groups(children()["RayJob"])
    for group in (head, workers):
        env = {e["name"]: e.get("value") for e in _container(group)["env"]}
        assert {name: env.get(name) for name in RAY_TRAIN_ENV} == RAY_TRAIN_ENV
        assert env["RAY_TRAIN_METRICS_ENABLED"] == "0"
        # Ray Train's preemption watcher stays on: a Ray node drain is a preemption notice.
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in env


def test_without_a_credentials_secret_the_pods_use_their_own_identity() -> None:
    _, workers = _groups(children(**VARIANTS["aws-no-secret"])["RayJob"])
    names = {e["name"] for e in _container(workers)["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def test_pods_run_as_the_shared_service_account_and_the_head_has_a_token_for_its_job_alone() -> None:
    head, workers = _groups(children()["RayJob"])
    for group in (head, workers):
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "kubetune-trainer"
        assert pod["automountServiceAccountToken"] is False
    # Only the head's driver sends progress: the workers mount no progress token (nor any other).
    assert not any("projected" in v for v in workers["template"]["spec"]["volumes"])
    assert TOKEN_PATH.rsplit("/", 1)[0] not in {m["mountPath"] for m in _container(workers)["volumeMounts"]}
    for group in (head,):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in _container(group)["volumeMounts"]}
        token_volume = next(v for v in volumes.values() if "projected" in v)
        (source,) = token_volume["projected"]["sources"]
        # The audience names the job by its uid: a namesake created later is another audience.
        assert source["serviceAccountToken"]["audience"] == "kubetune.dev/3f1c2d4e-0000-4000-8000-000000000001"
        mount = mounts[token_volume["name"]]
        assert f"{mount['mountPath']}/{source['serviceAccountToken']['path']}" == TOKEN_PATH
        env = {e["name"]: e.get("value") for e in _container(group)["env"]}
        assert env["KUBETUNE_PROGRESS_URL"] == "http://kubetune.kubetune-system.svc:8081/v1/progress/vision/flowers"


def _audiences(rayjob: dict[str, Any]) -> set[str]:
    return {
        source["serviceAccountToken"]["audience"]
        for group in _groups(rayjob)
        for volume in group["template"]["spec"]["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
    }


def test_each_job_and_each_namesake_of_it_gets_its_own_token_audience() -> None:
    first = manifest()
    again = copy.deepcopy(first)
    again["metadata"]["uid"] = "3f1c2d4e-0000-4000-8000-000000000002"  # deleted and created again
    other = copy.deepcopy(first)
    other["metadata"].update(name="birds", uid="3f1c2d4e-0000-4000-8000-000000000003")
    audiences = [_audiences(build_rayjob(FineTuneJob.from_body(b), SETTINGS)) for b in (first, again, other)]
    assert all(len(a) == 1 for a in audiences)
    assert len(set.union(*audiences)) == 3


def test_a_job_read_from_a_file_gets_an_audience_from_its_namespace_and_name() -> None:
    body = manifest()
    del body["metadata"]["uid"]
    rayjob = build_rayjob(FineTuneJob.from_body(body), SETTINGS)
    assert _audiences(rayjob) == {"kubetune.dev/vision/flowers"}
    assert token_audience("vision", "flowers", None) == "kubetune.dev/vision/flowers"
    assert token_audience("vision", "flowers", "abc") == "kubetune.dev/abc"


def test_without_a_progress_endpoint_pods_get_no_token_and_no_url() -> None:
    settings = OperatorSettings(progress_base_url=None)
    objs = {o["kind"]: o for o in build_children(job(), settings)}
    _, workers = _groups(objs["RayJob"])
    assert not any("projected" in v for v in workers["template"]["spec"]["volumes"])
    assert "KUBETUNE_PROGRESS_URL" not in {e["name"] for e in _container(workers)["env"]}
    assert json.loads(head_config(objs["RayJob"]))["progress"] is None


def test_trainer_image_is_the_operators_unless_the_job_names_one() -> None:
    head, workers = _groups(children()["RayJob"])
    assert _container(head)["image"] == _container(workers)["image"] == SETTINGS.trainer_image
    _, workers = _groups(children(**VARIANTS["image-override"])["RayJob"])
    assert _container(workers)["image"] == VARIANTS["image-override"]["image"]


# -- the trainer config --------------------------------------------------------------------------------------


def head_config(rayjob: dict[str, Any]) -> str:
    """The trainer config as the driver's process gets it (the kubelet turns `$$` into `$`)."""
    head, _ = _groups(rayjob)
    (value,) = [e["value"] for e in _container(head)["env"] if e["name"] == CONFIG_ENV]
    return str(value).replace("$$", "$")


def test_the_heads_env_holds_the_trainer_config_with_the_progress_target() -> None:
    the_job = job()
    text = head_config(children()["RayJob"])
    config = TrainerConfig.model_validate_json(text)
    expected = trainer_config(
        the_job,
        progress=ProgressTarget(
            url="http://kubetune.kubetune-system.svc:8081/v1/progress/vision/flowers", token_path=TOKEN_PATH
        ),
    )
    assert config == expected
    assert (
        config.run_name
        == f"vision.flowers.{run_digest('classification', *(getattr(the_job.spec, s) for s in ('model', 'data', 'training')))}"
    )
    assert json.loads(text)["progress"]["tokenPath"] == "/var/run/secrets/kubetune.dev/token"


def test_a_dollar_in_the_config_reaches_the_trainer_verbatim() -> None:
    """The kubelet expands `$(VAR)` and `$$` in env values: the builder escapes them."""
    path = "s3://datasets/$(AWS_REGION)/a$$b$/"
    rayjob = children(data={"train": path})["RayJob"]
    head, _ = _groups(rayjob)
    (raw,) = [e["value"] for e in _container(head)["env"] if e["name"] == CONFIG_ENV]
    assert "$(AWS_REGION)" not in raw.replace("$$", "")
    assert TrainerConfig.model_validate_json(head_config(rayjob)).data.train == path


def kubelet_env(container: dict[str, Any]) -> dict[str, str]:
    """The literal env values as the process gets them: the kubelet turns `$(VAR)` of a variable defined
    earlier into its value and `$$` into `$`."""
    out: dict[str, str] = {}
    reference = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
    for var in container["env"]:
        if "value" in var:
            out[var["name"]] = reference.sub(
                lambda m: "$" if m.group(0) == "$$" else out.get(m.group(1), m.group(0)), var["value"]
            )
        else:
            out[var["name"]] = f"<{var['name']} from a Secret>"
    return out


def test_a_dollar_in_any_env_value_reaches_the_process_verbatim() -> None:
    # `$(AWS_REGION)` would expand to the region, a variable defined before the endpoint.
    endpoint = "http://minio.storage:9000/$(AWS_REGION)/a$$b$"
    settings = OperatorSettings(progress_base_url="http://progress.example/$(AWS_REGION)")
    rayjob = build_rayjob(job(storage={"endpoint": endpoint}), settings)
    for group in _groups(rayjob):
        env = kubelet_env(_container(group))
        assert env["AWS_ENDPOINT_URL"] == endpoint
        assert env["KUBETUNE_PROGRESS_URL"] == "http://progress.example/$(AWS_REGION)/v1/progress/vision/flowers"
        literal = {v["name"]: v["value"] for v in _container(group)["env"] if "value" in v}
        for name, value in literal.items():  # every `$` of every literal written as `$$`
            assert re.sub(r"\$\$", "", value).count("$") == 0, (name, value)


def test_nothing_built_contains_a_secret_value() -> None:
    text = yaml.safe_dump_all(build_children(job(), SETTINGS))
    assert "secretKeyRef" in text
    assert "aws_secret" not in text.lower().replace("aws_secret_access_key", "")


# -- the spec digest that guards a running job -----------------------------------------------------------


def test_spec_digest_ignores_suspend_and_ttl_but_not_what_shapes_the_run() -> None:
    base = spec_digest(job())
    assert spec_digest(job(runPolicy={"suspend": True, "ttlSecondsAfterFinished": 5})) == base
    assert spec_digest(job(model={"checkpoint": "s3://models/base/other.safetensors"})) != base
    assert spec_digest(job(training={"epochs": 3})) != base
    assert spec_digest(job(resources={"workers": 2})) != base
    assert children()["RayJob"]["metadata"]["annotations"][SPEC_DIGEST_ANNOTATION] == base


# -- the Ray cluster's token, network and pods -----------------------------------------------------------


def test_the_ray_token_secret_holds_the_token_drawn_at_launch_and_render_holds_none() -> None:
    token = new_ray_token()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and token != new_ray_token()
    secret = build_ray_token_secret(job(), token)
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    assert secret["data"] == {"auth_token": base64.b64encode(token.encode()).decode()}  # KubeRay's key
    rendered = build_ray_token_secret(job(), None)
    assert "data" not in rendered and "stringData" not in rendered
    assert "kubetune render leaves it out" in rendered["metadata"]["annotations"]["kubetune.dev/note"]
    # The RayJob names the Secret, never the token.
    rayjob = children()["RayJob"]
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "flowers-ray-token"}
    assert token not in json.dumps(rayjob)


def test_the_network_policy_admits_the_jobs_pods_and_kuberay_to_the_dashboard() -> None:
    policy = children()["NetworkPolicy"]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    labels = {MANAGED_BY_LABEL: "kubetune", JOB_LABEL: "flowers"}
    assert policy["spec"]["podSelector"] == {"matchLabels": labels}
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": labels}}]},
        {
            "from": [
                {
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                    "namespaceSelector": {},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 8265}],
        },
    ]
    placed = OperatorSettings(kuberay_namespace="ray-system", kuberay_pod_labels=(("app", "kuberay"),))
    (_, kuberay) = build_children(job(), placed)[0]["spec"]["ingress"]
    assert kuberay["from"] == [
        {
            "podSelector": {"matchLabels": {"app": "kuberay"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
        }
    ]
    assert [o["kind"] for o in build_children(job(), OperatorSettings(network_policy=False))] == ["RayJob"]


def test_every_pod_runs_as_the_trainer_images_user_and_writes_only_to_empty_dirs() -> None:
    head, workers = _groups(children(resources={"cacheSize": "500Gi"})["RayJob"])
    for group in (head, workers):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsGroup"] == 100
        context = _container(group)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {"drop": ["ALL"]}
    head_volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert "kubetune-cache" not in head_volumes  # the head trains nothing: no node cache
    assert _container(head)["resources"]["requests"]["ephemeral-storage"] == "4Gi"
    worker_volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert worker_volumes["kubetune-cache"]["emptyDir"] == {"sizeLimit": "500Gi"}
    assert _container(workers)["resources"]["requests"]["ephemeral-storage"] == "504Gi"
    assert "ephemeral-storage" not in _container(workers)["resources"]["limits"]


@pytest.mark.parametrize(
    ("cache_size", "asked"), [("20Gi", "24Gi"), ("512Mi", "4608Mi"), ("1Ti", "1028Gi"), ("1020Gi", "1Ti")]
)
def test_the_ephemeral_storage_request_is_the_cache_and_the_scratch_space(cache_size: str, asked: str) -> None:
    _, workers = _groups(children(resources={"cacheSize": cache_size})["RayJob"])
    assert _container(workers)["resources"]["requests"]["ephemeral-storage"] == asked


@pytest.mark.parametrize("cache_size", ["0Gi", "20", "1.5Gi", "20G", "20gi", "1000000Gi"])
def test_a_cache_size_that_is_no_whole_disk_size_is_refused(cache_size: str) -> None:
    with pytest.raises(ValueError, match="cacheSize"):
        job(resources={"cacheSize": cache_size})
