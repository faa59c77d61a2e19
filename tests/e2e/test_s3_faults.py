"""The embedded S3 and its fault switches, as the fault tests use them: real HTTP, real boto3 errors."""

from __future__ import annotations

import time
from collections.abc import Iterator

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.s3 import DEMO_CREDENTIALS, ensure_bucket


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    with DevCluster(workdir=tmp_path_factory.mktemp("s3"), kuberay=False) as cluster:
        ensure_bucket(cluster.s3(), "faults")
        yield cluster


def impatient_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5),
    )


def test_objects_round_trip_through_the_proxy(cluster: DevCluster) -> None:
    s3 = cluster.s3()
    s3.put_object(Bucket="faults", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="faults", Key="a/b.txt")["Body"].read() == b"hello"
    assert s3.head_object(Bucket="faults", Key="a/b.txt")["ContentLength"] == 5
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="faults", Prefix="a/")["Contents"]] == ["a/b.txt"]


def test_a_failure_window_answers_errors_then_heals(cluster: DevCluster) -> None:
    assert cluster.s3_faults is not None
    s3 = impatient_client(cluster.s3_url)
    cluster.s3_faults.fail_for(1.5, 503, methods=["PUT"])
    with pytest.raises(botocore.exceptions.ClientError) as failed:
        s3.put_object(Bucket="faults", Key="ckpt/1", Body=b"x")
    assert failed.value.response["Error"]["Code"] == "SlowDown"
    assert s3.list_objects_v2(Bucket="faults")["KeyCount"] >= 0  # reads are untouched
    time.sleep(1.6)
    s3.put_object(Bucket="faults", Key="ckpt/1", Body=b"x")
    # A client that retries rides out a short window without noticing.
    cluster.s3_faults.fail_for(0.5, 503)
    cluster.s3().put_object(Bucket="faults", Key="ckpt/2", Body=b"y")


def test_a_dropped_endpoint_cuts_connections(cluster: DevCluster) -> None:
    assert cluster.s3_faults is not None
    s3 = impatient_client(cluster.s3_url)
    cluster.s3_faults.drop_for(1.0)
    with pytest.raises((botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError)):
        s3.get_object(Bucket="faults", Key="a/b.txt")
    time.sleep(1.1)
    assert s3.get_object(Bucket="faults", Key="a/b.txt")["Body"].read() == b"hello"


def test_deny_answers_access_denied_for_a_prefix_until_cleared(cluster: DevCluster) -> None:
    assert cluster.s3_faults is not None
    s3 = impatient_client(cluster.s3_url)
    cluster.s3().put_object(Bucket="faults", Key="secret/weights.safetensors", Body=b"w")
    cluster.s3_faults.deny("s3://faults/secret/")
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        s3.get_object(Bucket="faults", Key="secret/weights.safetensors")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    assert s3.get_object(Bucket="faults", Key="a/b.txt")["Body"].read() == b"hello"
    cluster.s3_faults.clear()
    assert s3.get_object(Bucket="faults", Key="secret/weights.safetensors")["Body"].read() == b"w"


def test_faults_limited_to_a_prefix_and_started_by_a_first_request(cluster: DevCluster) -> None:
    assert cluster.s3_faults is not None
    s3 = impatient_client(cluster.s3_url)
    errors = cluster.s3_faults.fail_for(3.0, 503, prefix="s3://faults/job-a/", starts_on="s3://faults/job-a/ckpt/")
    s3.put_object(Bucket="faults", Key="job-a/marker", Body=b"m")  # not started yet: served
    assert not errors.over and errors.hits == 0
    with pytest.raises(botocore.exceptions.ClientError):
        s3.put_object(Bucket="faults", Key="job-a/ckpt/epoch-1", Body=b"c")  # starts the window
    with pytest.raises(botocore.exceptions.ClientError):
        s3.get_object(Bucket="faults", Key="job-a/marker")  # the whole prefix, while it lasts
    s3.put_object(Bucket="faults", Key="job-b/ckpt/epoch-1", Body=b"c")  # another job's keys: served
    while not errors.over:
        time.sleep(0.2)
    assert errors.hits >= 2  # each attempt of the two requests (clients may retry once)
    s3.put_object(Bucket="faults", Key="job-a/ckpt/epoch-1", Body=b"c")
