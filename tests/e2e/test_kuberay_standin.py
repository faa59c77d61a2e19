"""The KubeRay stand-in honours the RayJob contract the operator relies on (status as KubeRay reports it)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.processes import venv_path_env

RAYJOB = ("ray.io", "v1", "rayjobs")
RAYCLUSTER = ("ray.io", "v1", "rayclusters")
NS = "default"
TERMINAL = ("Complete", "Failed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    # No Ray cluster per job here: the entrypoints are plain commands, so the state machine is fast.
    with DevCluster(workdir=tmp_path_factory.mktemp("kuberay"), s3=False, start_ray=False) as cluster:
        yield cluster


def rayjob(name: str, entrypoint: str, **spec: Any) -> dict[str, Any]:
    head: dict[str, Any] = {
        "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-head", "image": "kubetune/trainer:dev"}]}},
    }
    head["template"]["spec"].update(spec.pop("head_pod", {}))
    head["template"]["spec"]["containers"][0].update(spec.pop("head_container", {}))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {"headGroupSpec": head, "workerGroupSpecs": []},
            **spec,
        },
    }


def status_of(obj: dict[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("status") or {})


def wait_status(
    cluster: DevCluster, name: str, deployment: str | tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    wanted = (deployment,) if isinstance(deployment, str) else deployment
    obj = cluster.wait_for(
        *RAYJOB, NS, name, lambda o: status_of(o).get("jobDeploymentStatus") in wanted, timeout=timeout
    )
    return status_of(obj)


def deployment_history(cluster: DevCluster, name: str) -> list[str]:
    seen: list[str] = []
    for _, obj in cluster.api.history("ray.io", "rayjobs", NS, name):
        value = status_of(obj).get("jobDeploymentStatus", "")
        if value and (not seen or seen[-1] != value):
            seen.append(value)
    return seen


def python(code: str) -> str:
    return f"{sys.executable} -c {code!r}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_successful_entrypoint_completes_and_releases_its_cluster(cluster: DevCluster) -> None:
    cluster.create(rayjob("ok", python("print('trained')")))
    status = wait_status(cluster, "ok", TERMINAL)
    assert status["jobDeploymentStatus"] == "Complete", cluster.driver_log(NS, "ok")
    assert status["jobStatus"] == "SUCCEEDED" and status["succeeded"] == 1 and status["failed"] == 0
    assert status["startTime"] and status["endTime"] and status["jobId"].startswith("ok-")
    assert status["rayClusterName"].startswith("ok-")
    assert status["dashboardURL"] == f"{status['rayClusterName']}-head-svc.{NS}.svc.cluster.local:8265"
    assert deployment_history(cluster, "ok") == ["Initializing", "Running", "Complete"]
    assert "trained" in cluster.driver_log(NS, "ok")
    # shutdownAfterJobFinishes: the RayCluster the job ran on is deleted.
    cluster.wait_for(*RAYCLUSTER, NS, status["rayClusterName"], lambda o: o is None, timeout=20)


def test_a_failing_entrypoint_fails_with_the_reason(cluster: DevCluster) -> None:
    cluster.create(rayjob("broken", "echo 'no such dataset' >&2; exit 3"))
    status = wait_status(cluster, "broken", TERMINAL)
    assert (status["jobDeploymentStatus"], status["jobStatus"], status["reason"]) == ("Failed", "FAILED", "AppFailed")
    assert status["failed"] == 1
    assert "exit code 3" in status["message"] and "no such dataset" in status["message"]


def test_deletion_rules_keep_a_failed_runs_head_and_driver_log_until_their_ttl(cluster: DevCluster) -> None:
    rules = [
        {"condition": {"jobStatus": "FAILED", "ttlSeconds": 0}, "policy": "DeleteWorkers"},
        {"condition": {"jobStatus": "FAILED", "ttlSeconds": 3}, "policy": "DeleteCluster"},
    ]
    job = rayjob("kept", "echo 'no such checkpoint' >&2; exit 1", shutdownAfterJobFinishes=False)
    worker = {"spec": {"containers": [{"name": "ray-worker", "image": "kubetune/trainer:dev"}]}}
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [{"groupName": "workers", "replicas": 1, "template": worker}]
    job["spec"]["deletionStrategy"] = {"deletionRules": rules}
    cluster.create(job)
    name = wait_status(cluster, "kept", TERMINAL)["rayClusterName"]
    # DeleteWorkers at once: the RayCluster stays, its worker groups suspended, as KubeRay leaves it.
    kept = cluster.wait_for(
        *RAYCLUSTER, NS, name, lambda o: bool(o and o["spec"]["workerGroupSpecs"][0].get("suspend")), timeout=20
    )
    assert kept is not None
    assert "no such checkpoint" in cluster.driver_log(NS, "kept")
    # DeleteCluster after its TTL: the head goes, and the driver's log with it.
    cluster.wait_for(*RAYCLUSTER, NS, name, lambda o: o is None, timeout=30)
    assert cluster.driver_log(NS, "kept") == ""
    assert cluster.get(*RAYJOB, NS, "kept") is not None  # no DeleteSelf rule: the RayJob stays


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"shutdownAfterJobFinishes": False, "suspend": True}, "not allowed to be suspended"),
        (
            {
                "deletionStrategy": {
                    "deletionRules": [{"condition": {"jobStatus": "FAILED"}, "policy": "DeleteCluster"}]
                }
            },
            "mutually exclusive",
        ),
    ],
    ids=["suspend-without-shutdown", "rules-beside-shutdown"],
)
def test_a_spec_kuberay_refuses_ends_validation_failed(cluster: DevCluster, spec: dict[str, Any], problem: str) -> None:
    name = f"refused-{len(problem)}"
    cluster.create(rayjob(name, "true", **spec))
    status = wait_status(cluster, name, "ValidationFailed", timeout=20)
    assert status["reason"] == "ValidationFailed" and problem in status["message"]


def test_backoff_limit_retries_on_a_fresh_cluster_then_fails(cluster: DevCluster) -> None:
    cluster.create(rayjob("flaky", "exit 1", backoffLimit=2))
    status = wait_status(cluster, "flaky", "Failed", timeout=90)
    assert status["failed"] == 3  # the first run and two retries
    history = deployment_history(cluster, "flaky")
    assert history.count("Retrying") == 2 and history[-1] == "Failed"
    clusters = {status_of(o).get("rayClusterName") for _, o in cluster.api.history("ray.io", "rayjobs", NS, "flaky")}
    assert len(clusters - {"", None}) == 3  # each attempt gets its own cluster


def test_a_retry_that_succeeds_completes(cluster: DevCluster, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    entrypoint = f"if [ -e {marker} ]; then exit 0; else touch {marker}; exit 1; fi"
    cluster.create(rayjob("second-time-lucky", entrypoint, backoffLimit=1))
    status = wait_status(cluster, "second-time-lucky", TERMINAL, timeout=90)
    assert (status["jobDeploymentStatus"], status["failed"], status["succeeded"]) == ("Complete", 1, 1)


def test_suspend_stops_the_run_and_resume_starts_it_again(cluster: DevCluster) -> None:
    cluster.create(rayjob("pausable", python("import time; time.sleep(120)")))
    running = wait_status(cluster, "pausable", "Running")
    ctl = cluster.kuberay.controller(NS, "pausable") if cluster.kuberay else None
    assert ctl and ctl.run and ctl.run.driver and ctl.run.driver.pid
    pid = ctl.run.driver.pid

    cluster.patch(*RAYJOB, NS, "pausable", {"spec": {"suspend": True}})
    suspended = wait_status(cluster, "pausable", "Suspended")
    assert suspended.get("jobStatus", "") == "" and suspended.get("rayClusterName", "") == ""
    assert not alive(pid)
    cluster.wait_for(*RAYCLUSTER, NS, running["rayClusterName"], lambda o: o is None, timeout=20)
    assert deployment_history(cluster, "pausable")[-2:] == ["Suspending", "Suspended"]

    cluster.patch(*RAYJOB, NS, "pausable", {"spec": {"suspend": False}})
    resumed = wait_status(cluster, "pausable", "Running")
    assert resumed["rayClusterName"] and resumed["rayClusterName"] != running["rayClusterName"]
    assert deployment_history(cluster, "pausable")[-3:] == ["New", "Initializing", "Running"]
    cluster.delete(*RAYJOB, NS, "pausable")
    cluster.wait_for(*RAYJOB, NS, "pausable", lambda o: o is None, timeout=30)


def test_deleting_a_running_rayjob_stops_its_run(cluster: DevCluster) -> None:
    cluster.create(rayjob("doomed", python("import time; time.sleep(120)")))
    running = wait_status(cluster, "doomed", "Running")
    ctl = cluster.kuberay.controller(NS, "doomed") if cluster.kuberay else None
    assert ctl and ctl.run and ctl.run.driver and ctl.run.driver.pid
    pid = ctl.run.driver.pid
    cluster.delete(*RAYJOB, NS, "doomed")
    cluster.wait_for(*RAYJOB, NS, "doomed", lambda o: o is None, timeout=30)
    assert not alive(pid)
    assert cluster.get(*RAYCLUSTER, NS, running["rayClusterName"]) is None


def test_active_deadline_fails_a_run_that_takes_too_long(cluster: DevCluster) -> None:
    cluster.create(rayjob("slow", python("import time; time.sleep(120)"), activeDeadlineSeconds=2))
    status = wait_status(cluster, "slow", "Failed", timeout=30)
    assert status["reason"] == "DeadlineExceeded"


def test_the_entrypoint_gets_the_pods_env_files_and_token(cluster: DevCluster) -> None:
    cluster.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "AKIDEMO", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    cluster.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer", "namespace": NS}})
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "trainer-config", "namespace": NS},
            "data": {"trainer-config.json": '{"tokenPath": "/var/run/secrets/kubetune.dev/token"}'},
        }
    )
    check = (
        "import json, os, pathlib; "
        "assert os.environ['AWS_SECRET_ACCESS_KEY'] == 's3cr3t', 'secretKeyRef'; "
        "assert os.environ['JOB_NAMESPACE'] == 'default', 'fieldRef'; "
        "config = json.loads(pathlib.Path(os.environ['CONFIG']).read_text()); "
        "assert pathlib.Path(config['tokenPath']).is_file(), 'mount path rewritten in a ConfigMap file'; "
        # The trainer config as the operator passes it: JSON in an env value, `$` escaped as `$$`.
        "config = json.loads(os.environ['KUBETUNE_TRAINER_CONFIG']); "
        "d = chr(36); assert config['note'] == d + '5 ' + d + '(JOB_NAMESPACE)', config['note']; "
        "token = pathlib.Path(config['tokenPath']).read_text(); "
        "pathlib.Path('token-copy').write_text(token)"
    )
    trainer_config = json.dumps({"tokenPath": "/var/run/secrets/kubetune.dev/token", "note": "$5 $(JOB_NAMESPACE)"})
    env = [
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
        {"name": "JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "CONFIG", "value": "/etc/kubetune/trainer-config.json"},
        {"name": "KUBETUNE_TRAINER_CONFIG", "value": trainer_config.replace("$", "$$")},
    ]
    mounts = [
        {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
        {"name": "token", "mountPath": "/var/run/secrets/kubetune.dev", "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    volumes = [
        {"name": "config", "configMap": {"name": "trainer-config"}},
        {
            "name": "token",
            "projected": {"sources": [{"serviceAccountToken": {"audience": "kubetune.dev", "path": "token"}}]},
        },
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    cluster.create(
        rayjob(
            "wired",
            python(check),
            head_pod={"serviceAccountName": "trainer", "volumes": volumes},
            head_container={"env": env, "volumeMounts": mounts},
        )
    )
    status = wait_status(cluster, "wired", TERMINAL)
    assert status["jobDeploymentStatus"] == "Complete", cluster.driver_log(NS, "wired")
    token_file = next((cluster.workdir / "rayjobs" / NS / "wired").glob("attempt-*/work/token-copy"))
    review = cluster.create(
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token_file.read_text(), "audiences": ["kubetune.dev"]},
        }
    )
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == "system:serviceaccount:default:trainer"


def test_a_missing_secret_keeps_the_job_initializing_until_it_appears(cluster: DevCluster) -> None:
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "KEY"}}}]
    cluster.create(rayjob("waiting", python("print('ok')"), head_container={"env": env}))
    wait_status(cluster, "waiting", "Initializing")
    with pytest.raises(TimeoutError):
        wait_status(cluster, "waiting", ("Running", *TERMINAL), timeout=4)
    cluster.create_secret("late-secret", {"KEY": "v"})
    assert wait_status(cluster, "waiting", TERMINAL, timeout=30)["jobDeploymentStatus"] == "Complete"


def test_a_cluster_that_cannot_start_in_time_fails_past_the_pre_running_deadline(cluster: DevCluster) -> None:
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "never-there", "key": "KEY"}}}]
    cluster.create(rayjob("stuck", python("print('ok')"), head_container={"env": env}, preRunningDeadlineSeconds=2))
    status = wait_status(cluster, "stuck", TERMINAL, timeout=30)
    assert (status["jobDeploymentStatus"], status["reason"]) == ("Failed", "PreRunningDeadlineExceeded")
    assert "preRunningDeadlineSeconds" in status["message"]
    assert "Running" not in deployment_history(cluster, "stuck")


def test_deleting_the_owner_garbage_collects_the_rayjob(cluster: DevCluster) -> None:
    owner = cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": NS}})
    job = rayjob("owned", python("import time; time.sleep(120)"))
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"], "controller": True}
    ]
    cluster.create(job)
    wait_status(cluster, "owned", "Running")
    cluster.delete("", "v1", "configmaps", NS, "owner")
    cluster.wait_for(*RAYJOB, NS, "owned", lambda o: o is None, timeout=30)


# -- token authentication (authOptions), as KubeRay v1.7 does it --------------------------------------------


def test_token_auth_gives_every_process_the_secrets_token(cluster: DevCluster) -> None:
    check = (
        "import os; "
        "assert os.environ['RAY_AUTH_MODE'] == 'token', os.environ.get('RAY_AUTH_MODE'); "
        "print('token', os.environ['RAY_AUTH_TOKEN'])"
    )
    job = rayjob("authed", python(check))
    job["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token", "secretName": "authed-token"}
    cluster.create(job)
    # KubeRay cannot submit without the Secret: the job waits for it.
    wait_status(cluster, "authed", "Initializing")
    with pytest.raises(TimeoutError):
        wait_status(cluster, "authed", ("Running", *TERMINAL), timeout=4)
    cluster.create_secret("authed-token", {"auth_token": "s3cr3t-ray-token"})
    status = wait_status(cluster, "authed", TERMINAL, timeout=30)
    assert status["jobDeploymentStatus"] == "Complete", cluster.driver_log(NS, "authed")
    assert "token s3cr3t-ray-token" in cluster.driver_log(NS, "authed")


def test_token_auth_without_a_secret_name_gets_a_secret_of_its_own(cluster: DevCluster) -> None:
    job = rayjob("self-made", python("import os; print('mode', os.environ['RAY_AUTH_MODE'])"))
    job["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    cluster.create(job)
    status = wait_status(cluster, "self-made", TERMINAL, timeout=30)
    assert status["jobDeploymentStatus"] == "Complete", cluster.driver_log(NS, "self-made")
    assert "mode token" in cluster.driver_log(NS, "self-made")
    secret = cluster.get("", "v1", "secrets", NS, status["rayClusterName"])
    assert secret is not None and len(base64.b64decode(secret["data"]["auth_token"])) >= 32


def ray_clients(address: str, *envs: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Ray clients outside the cluster, one per env, all at once (a refused one retries for ~20 s): each
    connects to `address` and runs one task."""
    code = f"import ray; ray.init(address={address!r}); print('in', ray.get(ray.remote(lambda: 1).remote()))"
    args = [sys.executable, "-c", code]
    clients = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs
    ]
    done = []
    for client in clients:
        try:
            stdout, stderr = client.communicate(timeout=120)
        finally:
            client.kill()
        done.append(subprocess.CompletedProcess(args, client.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_a_ray_cluster_of_the_specs_size_refuses_a_client_without_its_token(tmp_path: Path) -> None:
    """One real Ray cluster (each costs seconds of start-up) for both: its size is the spec's (a head and two
    worker pods of one CPU), its processes take the Secret's token and refuse clients without it, and it
    goes with its RayCluster object when the job finishes (shutdownAfterJobFinishes)."""
    token = secrets.token_hex(32)
    finish = tmp_path / "finish"  # the entrypoint runs until the test has tried its clients
    check = (
        "import os, ray, time; ray.init(); "
        "cpus = ray.cluster_resources().get('CPU'); "
        "assert cpus == 3, cpus; "
        "print('ray ok', ray.get(ray.remote(lambda: 6 * 7).remote()), flush=True); "
        f"[time.sleep(0.2) for _ in range(1500) if not os.path.exists({str(finish)!r})]"
    )
    job = rayjob("guarded", python(check))
    job["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token", "secretName": "guarded-ray-token"}
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": "1"}
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [
        {
            "groupName": "workers",
            "replicas": 2,
            "rayStartParams": {"num-cpus": "1"},
            "template": {"spec": {"containers": [{"name": "ray-worker", "image": "kubetune/trainer:dev"}]}},
        }
    ]
    with DevCluster(workdir=tmp_path / "cluster", s3=False) as ray_cluster:
        ray_cluster.create_secret("guarded-ray-token", {"auth_token": token})
        ray_cluster.create(job)
        running = wait_status(ray_cluster, "guarded", ("Running", *TERMINAL), timeout=120)
        deadline = time.monotonic() + 120
        while "ray ok 42" not in ray_cluster.driver_log(NS, "guarded"):
            assert time.monotonic() < deadline, ray_cluster.driver_log(NS, "guarded")
            time.sleep(0.5)
        ctl = ray_cluster.kuberay.controller(NS, "guarded") if ray_cluster.kuberay else None
        assert ctl and ctl.run and ctl.run.head
        head = ctl.run.head
        outside = {k: v for k, v in venv_path_env(os.environ).items() if not k.startswith("RAY_AUTH")}
        outside["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine's to fall back on
        refused, wrong, admitted = ray_clients(
            head.address,
            {**outside, "RAY_AUTH_MODE": "disabled"},
            {**outside, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
            {**outside, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
        )
        assert refused.returncode != 0 and "in 1" not in refused.stdout
        assert wrong.returncode != 0 and "in 1" not in wrong.stdout
        assert admitted.returncode == 0 and "in 1" in admitted.stdout, admitted.stderr[-2000:]

        finish.touch()
        status = wait_status(ray_cluster, "guarded", TERMINAL, timeout=120)
        assert status["jobDeploymentStatus"] == "Complete", ray_cluster.driver_log(NS, "guarded")
        # shutdownAfterJobFinishes: the cluster's processes are gone with its RayCluster object.
        ray_cluster.wait_for(*RAYCLUSTER, NS, running["rayClusterName"], lambda o: o is None, timeout=30)
        assert head.pid is not None and not alive(head.pid)
