"""Preflight: before a Ray cluster is started, check that the job's S3 inputs are there (boto3, blocking).

A job whose base weights are missing would otherwise hold GPUs for minutes before failing. Each check
ends in a `PreflightFailure` with a condition reason (`SecretNotFound`, `InvalidSecret`,
`CheckpointNotFound`, `DatasetNotFound`, `AccessDenied`), or in a `TransientS3Error` when the store could
not answer (unreachable, throttled, 5xx), which the operator retries with backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from kubetune_operator.builders import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN
from kubetune_operator.states import Reason
from kubetune_trainer.config import StorageSpec, as_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# S3 error codes that mean "these credentials may not do this" (or are not credentials at all).
DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidToken", "403"}
)
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PreflightFailure:
    """Why the job cannot start; `reason` is the condition reason, `message` says what to fix."""

    reason: Reason
    message: str


class TransientS3Error(Exception):
    """The object store did not answer usefully; the same check may pass later."""


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` → (`bucket`, `some/key`)."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    return bucket, key


def credentials_from_secret(
    secret_name: str, namespace: str, data: Mapping[str, str] | None
) -> Credentials | PreflightFailure:
    """The credentials a Secret holds, or why it cannot be used (never echoing its values)."""
    if data is None:
        return PreflightFailure(
            Reason.SECRET_NOT_FOUND,
            f"Secret {secret_name!r} (spec.storage.credentialsSecret) does not exist in namespace {namespace!r}; "
            f"create it with {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY}",
        )
    missing = [key for key in (ACCESS_KEY_ID, SECRET_ACCESS_KEY) if not data.get(key)]
    if missing:
        return PreflightFailure(
            Reason.INVALID_SECRET,
            f"Secret {secret_name!r} (spec.storage.credentialsSecret) has no {' and no '.join(missing)}",
        )
    return Credentials(data[ACCESS_KEY_ID], data[SECRET_ACCESS_KEY], data.get(SESSION_TOKEN) or None)


def make_client(storage: StorageSpec, credentials: Credentials, timeout: float) -> S3Client:
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        # S3-compatible stores (MinIO, Ceph, moto) are addressed by path; AWS itself picks for us.
        s3={"addressing_style": "path" if storage.endpoint else "auto"},
    )
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
        region_name=storage.region,
    )
    return session.client("s3", endpoint_url=storage.endpoint, config=config)


def _classify(exc: ClientError, what: str, uri: str, missing: PreflightFailure) -> PreflightFailure:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in DENIED_CODES or status == 403:
        return PreflightFailure(
            Reason.ACCESS_DENIED,
            f"S3 denied access to {what} {uri} ({code or status}); check the credentials in "
            "spec.storage.credentialsSecret and the bucket's policy",
        )
    if code in MISSING_CODES or status == 404:
        return missing
    if status >= 500 or status == 429 or code in {"SlowDown", "RequestTimeout", "Throttling", "ServiceUnavailable"}:
        raise TransientS3Error(f"S3 could not answer for {what} {uri}: {code or status}") from exc
    return PreflightFailure(Reason.STORAGE_ERROR, f"S3 refused the request for {what} {uri}: {code or status}")


def _check_checkpoint(s3: S3Client, uri: str) -> PreflightFailure | None:
    bucket, key = split_uri(uri)
    missing = PreflightFailure(
        Reason.CHECKPOINT_NOT_FOUND, f"spec.model.checkpoint: no object {uri} (bucket {bucket!r}, key {key!r})"
    )
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return _classify(exc, "the base weights", uri, missing)
    return None


def _check_dataset(s3: S3Client, field_name: str, uri: str) -> PreflightFailure | None:
    bucket, key = split_uri(uri)
    prefix = as_prefix(key) if key else ""
    missing = PreflightFailure(
        Reason.DATASET_NOT_FOUND,
        f"{field_name}: no images under {uri} (expected <class>/<image> objects below it)",
    )
    try:
        answer = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        return _classify(exc, "the dataset", uri, missing)
    return None if answer.get("KeyCount", 0) > 0 else missing


def preflight(
    storage: StorageSpec,
    *,
    checkpoint: str,
    datasets: Mapping[str, str],
    credentials: Credentials,
    timeout: float = 10.0,
) -> PreflightFailure | None:
    """Check the base weights and each dataset prefix (`{"spec.data.train": uri, ...}`); None when all pass.

    Every problem found is reported at once (the first one's reason names the condition), so a job
    with two wrong paths needs one fix, not two round trips.
    """
    try:
        s3 = make_client(storage, credentials, timeout)
        failures = [_check_checkpoint(s3, checkpoint)]
        failures += [_check_dataset(s3, name, uri) for name, uri in datasets.items()]
    except NoCredentialsError as exc:  # cannot happen with explicit keys; kept for clarity of intent
        return PreflightFailure(Reason.ACCESS_DENIED, f"no S3 credentials: {exc}")
    except BotoCoreError as exc:  # connection refused, DNS, timeouts: the store may come back
        raise TransientS3Error(f"S3 endpoint {storage.endpoint or 'AWS'} is unreachable: {exc}") from exc
    found = [f for f in failures if f is not None]
    if not found:
        return None
    return PreflightFailure(found[0].reason, "; ".join(f.message for f in found))
