"""A real S3 for operator tests: moto's server on a local port, with helpers to seed and to deny.

world = S3World(endpoint)            # the `s3` fixture in conftest.py
uris = world.seed()                  # a fresh bucket with base weights and a two-class dataset
world.create_user("reader", policy=None)  # IAM credentials that may do nothing
with world.iam_enforced(): ...       # moto checks signatures and IAM policies inside the block
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_s3 import S3Client

# moto accepts any credentials until IAM is enforced; these are the ones the tests' Secret holds.
ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"
REGION = "us-east-1"


class S3World:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )

    def iam(self) -> IAMClient:
        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def seed(self, *, with_validation: bool = False) -> dict[str, str]:
        """A new bucket holding base weights and an ImageFolder dataset; their s3:// URIs."""
        bucket = f"kt-{uuid.uuid4().hex[:12]}"
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="base/resnet18.safetensors", Body=b"\0" * 16)
        for split in ("train", "val") if with_validation else ("train",):
            for label in ("cats", "dogs"):
                s3.put_object(Bucket=bucket, Key=f"data/{split}/{label}/0.png", Body=b"png")
        uris = {
            "bucket": bucket,
            "checkpoint": f"s3://{bucket}/base/resnet18.safetensors",
            "train": f"s3://{bucket}/data/train/",
            "output": f"s3://{bucket}/runs/",
        }
        if with_validation:
            uris["validation"] = f"s3://{bucket}/data/val/"
        return uris

    def create_user(self, name: str, policy: dict[str, Any] | None = None) -> tuple[str, str]:
        """An IAM user (with `policy` inline, if any) and its access key: (key id, secret)."""
        iam = self.iam()
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName="kubetune", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def iam_enforced(self) -> Iterator[None]:
        """moto authenticates and authorises every call inside (its /moto-api/reset-auth switch)."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
