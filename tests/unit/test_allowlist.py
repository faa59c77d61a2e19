"""The allow-lists' rules (allowlist.py), and the settings and command line that carry them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_operator.allowlist import EndpointEntry, endpoint_refusal, image_refusal, parse_registries
from kubetune_operator.settings import OperatorSettings
from tests.support.paths import REPO

KUBETUNE = Path(sys.executable).with_name("kubetune")
TRAINER = "ghcr.io/kubetune/kubetune-trainer:0.1.0"


def entries(*texts: str) -> list[EndpointEntry]:
    return [EndpointEntry.parse(text) for text in texts]


@pytest.mark.parametrize(
    "endpoint",
    [
        None,
        "https://s3.amazonaws.com",
        "https://s3.eu-west-1.amazonaws.com",
        "https://s3-us-west-2.amazonaws.com",
        "https://s3.dualstack.ap-south-1.amazonaws.com",
        "https://s3-fips.us-gov-west-1.amazonaws.com",
        "https://s3.cn-north-1.amazonaws.com.cn",
    ],
)
def test_aws_s3_is_allowed_without_a_list(endpoint: str | None) -> None:
    assert endpoint_refusal(endpoint, []) is None


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://s3.eu-west-1.amazonaws.com",  # AWS, but in the clear
        "https://ec2-1-2-3-4.compute-1.amazonaws.com",  # anyone's EC2 instance
        "https://s3.attacker.example.com",
        "http://169.254.169.254/latest/meta-data",
        "http://kubernetes.default.svc",
        "http://10.0.0.1:9000",
    ],
)
def test_anything_else_is_refused_without_a_list(endpoint: str) -> None:
    message = endpoint_refusal(endpoint, [])
    assert message is not None and message.startswith("spec.storage.endpoint: ") and "allowedS3Endpoints" in message


@pytest.mark.parametrize(
    ("allowed", "endpoint", "ok"),
    [
        ("https://minio.example.com:9000", "https://minio.example.com:9000", True),
        ("https://minio.example.com:9000", "http://minio.example.com:9000", False),
        ("https://minio.example.com:9000", "https://minio.example.com:9001", False),
        ("https://minio.example.com", "https://minio.example.com/", True),  # the default port
        ("minio.example.com", "http://minio.example.com:9000/some/path", True),
        ("minio.example.com", "http://minio.example.com.evil.io", False),
        ("*.example.com", "https://eu.store.example.com", True),
        ("*.example.com", "https://example.com", False),
        ("*.example.com", "https://badexample.com", False),
        ("HTTP://MinIO.Example.COM", "http://minio.example.com", True),
    ],
)
def test_an_admins_list_allows_exactly_its_entries(allowed: str, endpoint: str, ok: bool) -> None:
    assert (endpoint_refusal(endpoint, entries(allowed)) is None) is ok


def test_credentials_in_an_endpoint_are_refused_whatever_the_list_says() -> None:
    message = endpoint_refusal("https://admin:hunter2@minio.example.com", entries("minio.example.com"))
    assert message is not None and "user:password@" in message and "hunter2" not in message


@pytest.mark.parametrize(
    ("image", "allowed", "ok"),
    [
        ("ghcr.io/kubetune/kubetune-trainer:cu128", (), True),  # the trainer image's registry
        ("ghcr.io/someone/else@sha256:" + "a" * 64, (), True),
        ("ghcr.io.evil.io/kubetune/kubetune-trainer:1", (), False),
        ("ubuntu", (), False),  # Docker Hub
        ("ubuntu:24.04", ("docker.io",), True),
        ("registry.example.com:5000/ml/trainer:2", ("registry.example.com:5000/ml",), True),
        ("registry.example.com:5000/mlx/trainer:2", ("registry.example.com:5000/ml",), False),
        ("registry.example.com/ml/trainer", ("registry.example.com:5000/ml",), False),
    ],
)
def test_images_come_from_the_trainer_images_registry_or_a_listed_one(
    image: str, allowed: tuple[str, ...], ok: bool
) -> None:
    message = image_refusal(image, TRAINER, parse_registries(allowed))
    assert (message is None) is ok, message


@pytest.mark.parametrize(
    "bad", ["http://user:pass@minio", "minio.example.com/path", "ftp://minio", "*.*.com", "minio:port"]
)
def test_a_malformed_endpoint_entry_stops_the_operator_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match="allowed S3 endpoint"):
        OperatorSettings.from_env({"KUBETUNE_ALLOWED_S3_ENDPOINTS": f"minio.example.com,{bad}"})


def test_the_lists_come_from_the_environment_the_chart_sets() -> None:
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_ALLOWED_S3_ENDPOINTS": "http://minio.minio.svc:9000, *.storage.example.com",
            "KUBETUNE_ALLOWED_IMAGE_REGISTRIES": "registry.example.com:5000/ml",
        }
    )
    assert settings.allowed_s3_endpoints == ("http://minio.minio.svc:9000", "*.storage.example.com")
    assert settings.allowed_image_registries == ("registry.example.com:5000/ml",)
    with pytest.raises(ValueError, match=re.escape("allowed image registry 'ghcr.io/x:1'")):
        OperatorSettings(allowed_image_registries=("ghcr.io/x:1",))


def test_kubetune_validate_checks_the_lists_it_is_given(tmp_path: Path) -> None:
    job = yaml.safe_load((REPO / "examples" / "classification-partial.yaml").read_text())
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    def validate(*flags: str) -> subprocess.CompletedProcess[str]:
        command = [str(KUBETUNE), "validate", *flags, "job.yaml"]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert validate().returncode == 0  # no list given: the operator's settings are not known here
    allowed = validate("--allowed-s3-endpoint", "http://minio.minio.svc.cluster.local:9000")
    assert allowed.returncode == 0 and "valid" in allowed.stdout
    refused = validate("--allowed-s3-endpoint", "https://minio.example.com")
    assert refused.returncode == 1
    assert "spec.storage.endpoint: http://minio.minio.svc.cluster.local:9000 is not an S3 endpoint" in refused.stdout
    image = validate("--allowed-image-registry", "registry.example.com")
    assert image.returncode == 0  # the example names no image: the operator's own trainer image
    malformed = validate("--allowed-s3-endpoint", "http://user:pass@minio")
    assert malformed.returncode == 2 and "allowed S3 endpoint" in malformed.stderr
