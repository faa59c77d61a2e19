"""How the operator runs: without KubeRay, narrowed to namespaces, with a liveness endpoint, as a module."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.operator_harness import (
    SERVICEACCOUNTS,
    OperatorHarness,
    fast_settings,
    finetunejob,
    running_operator,
    serving_api,
)


@pytest.mark.asyncio
async def test_without_kuberay_jobs_wait_with_a_clear_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubetune_operator")
    async with running_operator(kuberay=False) as op:
        startup = [r for r in caplog.records if r.name == "kubetune_operator" and r.levelno == logging.ERROR]
        assert any("KubeRay is not installed" in r.getMessage() for r in startup)

        await op.create_job(finetunejob("flowers"))
        job = await op.wait_for_phase("default", "flowers", "Pending")
        launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
        assert (launched["status"], launched["reason"]) == ("False", "KubeRayNotInstalled")
        assert "Install the KubeRay operator" in launched["message"]
        event = await op.wait_for_event("default", "flowers", "KubeRayNotInstalled")
        assert event["type"] == "Warning"
        # It keeps checking (these settings retry every 0.3s), and creates nothing meanwhile.
        await op.wait_for(
            lambda: sum("default/flowers: cannot launch" in r.getMessage() for r in caplog.records) >= 2,
            what="a second check for KubeRay",
        )
        assert op.get(SERVICEACCOUNTS, "default", "kubetune-trainer") is None
        assert len(op.event_reasons("default", "flowers")) == 1  # one Event, not one per retry


@pytest.mark.asyncio
async def test_namespaces_narrow_what_the_operator_serves() -> None:
    async with running_operator(fast_settings(namespaces=("team-a",))) as op:
        await op.create_job(finetunejob("ours"), "team-a")
        await op.create_job(finetunejob("theirs"), "team-b")
        await op.wait_for(lambda: op.rayjob("team-a", "ours"), what="team-a's job to launch")
        await op.settle()
        assert op.rayjob("team-b", "theirs") is None
        assert op.phase("team-b", "theirs") is None
        assert {r.namespace for r in op.operator_requests() if r.resource == "finetunejobs"} == {"team-a"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.asyncio
async def test_liveness_endpoint_answers_while_the_operator_runs() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    async with running_operator(liveness_endpoint=url):
        for _ in range(100):
            # In a thread: the API server the operator needs shares this test's event loop.
            if await asyncio.to_thread(_status, url) == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{url} never answered 200")


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            code: int = response.status
            return code
    except OSError:
        return None


def test_the_module_runs_and_explains_itself() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("--namespace", "--liveness", "KUBETUNE_NAMESPACES"):
        assert option in result.stdout


@pytest.mark.asyncio
async def test_an_operator_log_line_names_the_job_and_what_was_done(
    op: OperatorHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetune_operator")
    await op.create_job(finetunejob("flowers"))
    await op.wait_for(lambda: op.rayjob("default", "flowers"), what="the RayJob")
    await op.set_rayjob_status("default", "flowers", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase("default", "flowers", "Running")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "kubetune_operator"]

    await op.wait_for(
        lambda: any(line.startswith("default/flowers: Launching -> Running: Training is running") for line in logged()),
        what="the log line of the phase change",
    )
    # One line for the launch: every child created, and the size of the run; one for the namespace's
    # shared ServiceAccount, made for the first job there.
    assert "default/flowers: created RayJob flowers (2 worker(s), 1 GPU(s) each)" in logged()
    assert "default: created ServiceAccount kubetune-trainer, shared by the trainer pods of its jobs" in logged()


def test_without_any_cluster_credentials_it_says_so(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 1
    assert "No Kubernetes credentials" in result.stderr + result.stdout


@pytest.mark.asyncio
async def test_the_operator_process_logs_in_with_a_kubeconfig_and_launches_a_job(tmp_path: Path) -> None:
    """`python -m kubetune_operator` as deployed: kubeconfig login, every namespace, env settings, liveness.

    (Narrowed to namespaces, kopf also lists and watches Namespace objects, which kmock cannot serve.)
    """
    async with serving_api() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(api.url).rstrip("/")}}],
                    "users": [{"name": "tester", "user": {"token": "not-checked"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
                    "current-context": "kmock",
                }
            )
        )
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer:from-env",
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_PROGRESS_PORT": "0",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kubetune_operator",
            "--liveness",
            liveness,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            harness = OperatorHarness(api)  # the operator runs in the other process
            await harness.create_job(finetunejob("flowers"), "team-a")
            rayjob = await harness.wait_for(
                lambda: harness.rayjob("team-a", "flowers") or process.returncode is not None,
                timeout=60,
                what="the RayJob",
            )
            assert process.returncode is None, "the operator exited"
            worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
            assert worker["image"] == "registry.example/trainer:from-env"
            assert await asyncio.to_thread(_status, liveness) == 200
        finally:
            if process.returncode is None:
                process.terminate()  # SIGTERM: kopf stops gracefully
            output, _ = await asyncio.wait_for(process.communicate(), 60)
        log = output.decode()
        assert process.returncode == 0, log
        assert "serving FineTuneJobs in all namespaces" in log
        assert "team-a: created ServiceAccount kubetune-trainer" in log
        assert "team-a/flowers: created RayJob flowers" in log
