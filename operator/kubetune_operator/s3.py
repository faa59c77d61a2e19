"""Preflight: before a Ray cluster is started, check that the job's S3 inputs are there.

A job whose base weights are missing would otherwise hold GPUs for minutes before failing. Each check
ends in a `PreflightFailure` with a condition reason (`SecretNotFound`, `InvalidSecret`,
`CheckpointNotFound`, `DatasetNotFound`, `AccessDenied`, `StorageError`), or in a `TransientS3Error` when
the store could not answer (unreachable, throttled, 5xx, too slow), which the operator retries with backoff.

The store is whatever a job names (within the operator's allow-list, `allowlist.py`), so it is talked to
defensively: plain HTTP requests (aiohttp) signed with botocore's SigV4 signer, no redirect followed, at
most MAX_ANSWER_BYTES of any answer read, each connect and read bounded by `timeout`, and the whole check
by `deadline`: it is one task that the deadline cancels, closing its connections, whatever the store does
(an endpoint that answers one byte a second included). Blocking clients (boto3) bound only each read.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as SigningCredentials
from yarl import URL  # aiohttp's own URL type: it sends a URL marked encoded exactly as signed

from kubetune_operator.builders import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN
from kubetune_operator.states import Reason
from kubetune_trainer.config import REGION_PATTERN, StorageSpec, as_prefix

# S3 error codes that mean "these credentials may not do this" (or are not credentials at all).
DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidToken", "403"}
)
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ServiceUnavailable"})
# An S3 answer to HEAD or a one-key listing is a few hundred bytes; the rest of a longer one is not read.
MAX_ANSWER_BYTES = 64 * 1024
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_KEY_COUNT = re.compile(rb"<KeyCount>([0-9]{1,10})</KeyCount>")


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


# -- one store, signed requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the store said: the HTTP status, the S3 error code (the status when the body names none), the
    bounded body, and the region AWS says a bucket is in (`x-amz-bucket-region`)."""

    status: int
    code: str
    body: bytes = b""
    bucket_region: str | None = None


def object_url(storage: StorageSpec, region: str, bucket: str, key: str, query: Mapping[str, str]) -> str:
    """The request URL, percent-encoded, addressed as the trainer's boto3 client does: storage.addressingStyle
    when set; else path style under a custom endpoint, AWS's virtual-hosted style otherwise (path style for
    bucket names with dots)."""
    path = quote(key, safe="/~")
    if storage.endpoint and storage.addressing_style == "virtual":
        parts = urlsplit(storage.endpoint)
        url = f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path.rstrip('/')}/{path}"
    elif storage.endpoint:
        url = f"{storage.endpoint.rstrip('/')}/{bucket}/{path}"
    elif storage.addressing_style == "path":
        domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
        url = f"https://s3.{region}.{domain}/{bucket}/{path}"
    else:
        domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
        host = f"s3.{region}.{domain}"
        url = f"https://{host}/{bucket}/{path}" if "." in bucket else f"https://{bucket}.{host}/{path}"
    if query:
        url += "?" + "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items()))
    return url


class Store:
    """Signed requests to one S3 store, in one aiohttp session (`async with Store(...) as store`)."""

    def __init__(
        self, storage: StorageSpec, credentials: Credentials, timeout: float, ca_bundle: str | None = None
    ) -> None:
        self.storage = storage
        self._signing = SigningCredentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token
        )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            trust_env=False,  # the proxy, if any, is chosen per request below; never ~/.netrc credentials
            # spec.storage.caBundle: the endpoint's private CA, trusted as the trainer trusts it.
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cadata=ca_bundle)) if ca_bundle else None,
        )

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._session.close()

    async def request(self, method: str, bucket: str, key: str = "", query: Mapping[str, str] | None = None) -> Answer:
        """One request; on AWS, again in the bucket's own region when AWS says it is in another."""
        answer = await self._send(method, self.storage.region, bucket, key, query or {})
        moved = answer.bucket_region
        if (
            not self.storage.endpoint
            and answer.status in (301, 307, 400)
            and moved
            and moved != self.storage.region
            and re.match(REGION_PATTERN, moved)
        ):
            answer = await self._send(method, moved, bucket, key, query or {})
        return answer

    async def _send(self, method: str, region: str, bucket: str, key: str, query: Mapping[str, str]) -> Answer:
        url = object_url(self.storage, region, bucket, key, query)
        signed = AWSRequest(method=method, url=url, headers={})
        S3SigV4Auth(self._signing, "s3", region).add_auth(signed)
        try:
            async with self._session.request(
                method,
                URL(url, encoded=True),
                headers=dict(signed.headers.items()),
                allow_redirects=False,
                proxy=_proxy_for(url),
            ) as response:
                body = await _read_at_most(response, MAX_ANSWER_BYTES)
                found = _ERROR_CODE.search(body) if response.status >= 300 else None
                code = found.group(1).decode() if found else str(response.status)
                return Answer(response.status, code, body, response.headers.get("x-amz-bucket-region"))
        except (aiohttp.ClientError, OSError) as exc:
            where = self.storage.endpoint or "AWS S3"
            raise TransientS3Error(f"S3 endpoint {where} is unreachable: {type(exc).__name__}: {exc}") from exc


def _proxy_for(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY name for `url`, as boto3 would use it."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    return None if not proxy or urllib.request.proxy_bypass(parts.hostname or "") else proxy


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# -- the checks ------------------------------------------------------------------------------------------


def _classify(answer: Answer, what: str, uri: str, missing: PreflightFailure) -> PreflightFailure | None:
    if answer.status < 300:
        return None
    code, status = answer.code, answer.status
    if code in DENIED_CODES or status == 403:
        return PreflightFailure(
            Reason.ACCESS_DENIED,
            f"S3 denied access to {what} {uri} ({code}); check the credentials in "
            "spec.storage.credentialsSecret and the bucket's policy",
        )
    if code in MISSING_CODES or status == 404:
        return missing
    if status >= 500 or status == 429 or code in TRANSIENT_CODES:
        raise TransientS3Error(f"S3 could not answer for {what} {uri}: {code}")
    return PreflightFailure(Reason.STORAGE_ERROR, f"S3 refused the request for {what} {uri}: {code}")


async def _check_checkpoint(store: Store, uri: str) -> PreflightFailure | None:
    bucket, key = split_uri(uri)
    missing = PreflightFailure(
        Reason.CHECKPOINT_NOT_FOUND, f"spec.model.checkpoint: no object {uri} (bucket {bucket!r}, key {key!r})"
    )
    return _classify(await store.request("HEAD", bucket, key), "the base weights", uri, missing)


async def _check_dataset(store: Store, field_name: str, uri: str) -> PreflightFailure | None:
    bucket, key = split_uri(uri)
    missing = PreflightFailure(
        Reason.DATASET_NOT_FOUND,
        f"{field_name}: no images under {uri} (expected <class>/<image> objects below it)",
    )
    query = {"list-type": "2", "prefix": as_prefix(key) if key else "", "max-keys": "1"}
    answer = await store.request("GET", bucket, query=query)
    failure = _classify(answer, "the dataset", uri, missing)
    if failure is not None:
        return failure
    count = _KEY_COUNT.search(answer.body)
    return None if count is not None and int(count.group(1)) > 0 else missing


async def _check_data_file(store: Store, field_name: str, uri: str) -> PreflightFailure | None:
    """A manifest file, or a dataset's first shard, must exist."""
    bucket, key = split_uri(uri)
    missing = PreflightFailure(
        Reason.DATASET_NOT_FOUND, f"{field_name}: no object {uri} (bucket {bucket!r}, key {key!r})"
    )
    return _classify(await store.request("HEAD", bucket, key), "the dataset", uri, missing)


async def preflight(
    storage: StorageSpec,
    *,
    checkpoint: str,
    datasets: Mapping[str, str],
    data_files: bool = False,
    credentials: Credentials,
    timeout: float = 10.0,
    deadline: float = 60.0,
    ca_bundle: str | None = None,
) -> PreflightFailure | None:
    """Check the base weights and each dataset prefix (`{"spec.data.train": uri, ...}`), or each dataset
    file (`data_files`: a manifest, a dataset's first shard); None when all pass.

    Every problem found is reported at once (the first one's reason names the condition), so a job with
    two wrong paths needs one fix, not two round trips. Raises TransientS3Error when the store does not
    answer usefully, or not within `deadline` seconds in all.
    """
    try:
        async with asyncio.timeout(deadline), Store(storage, credentials, timeout, ca_bundle) as store:
            failures = [await _check_checkpoint(store, checkpoint)]
            check = _check_data_file if data_files else _check_dataset
            failures += [await check(store, name, uri) for name, uri in datasets.items()]
    except TimeoutError as exc:
        where = storage.endpoint or "AWS S3"
        raise TransientS3Error(f"S3 endpoint {where} did not answer the preflight within {deadline:g}s") from exc
    found = [f for f in failures if f is not None]
    if not found:
        return None
    return PreflightFailure(found[0].reason, "; ".join(f.message for f in found))


# A CA bundle is a few certificates; a ConfigMap holds at most 1 MiB anyway.
MAX_CA_BUNDLE_BYTES = 1024 * 1024


def ca_bundle_problem(pem: str | None) -> str | None:
    """What is wrong with a caBundle's text (missing, too big, not PEM certificates); None if nothing."""
    if pem is None:
        return "is missing"
    if len(pem.encode()) > MAX_CA_BUNDLE_BYTES:
        return f"exceeds {MAX_CA_BUNDLE_BYTES} bytes"
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        return f"holds no PEM certificates ({exc})"
    return None
