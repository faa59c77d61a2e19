"""Every S3 transfer the trainer makes: base weights, images, checkpoints and the exported model.

boto3 does the transfers (adaptive retries, a connection pool sized for parallel downloads, multipart
with a tuned TransferConfig for big files); a pyarrow S3FileSystem with the same endpoint and region is
handed to Ray Train for its own bookkeeping (run snapshot, checkpoint retention). Errors become a
StorageError whose message names the s3:// URI and what is wrong with it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from kubetune_trainer.config import CA_BUNDLE_ENV, AddressingStyle, StorageSpec
from kubetune_trainer.errors import StorageError
from kubetune_trainer.localpaths import local_path

if TYPE_CHECKING:
    import pyarrow.fs

MiB = 1024 * 1024
# Parts of 16 MiB, 16 at a time: a 100 MB checkpoint goes up as 7 parallel parts; objects below the
# threshold go in one request, which is what an image or a small JSON file wants.
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=16 * MiB,
    multipart_chunksize=16 * MiB,
    max_concurrency=16,
    use_threads=True,
)
# Enough pooled connections for the parallel image downloads and multipart parts together.
MAX_POOL_CONNECTIONS = 64
DOWNLOAD_THREADS = 32
# Bounds on what one read takes from a bucket, whoever wrote to it: a listing stops at MAX_LISTED_OBJECTS
# keys (ImageNet-1k's 1.28 million images fit), and an object read into memory at MAX_READ_BYTES unless
# the caller gives its own limit (annotation files do).
MAX_LISTED_OBJECTS = 2_000_000
MAX_READ_BYTES = 64 * MiB


@dataclass(frozen=True)
class S3Uri:
    """An s3://bucket/key location; key is "" for a bucket, and ends without "/" for a prefix."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise StorageError(f"not an s3:// URI: {uri!r}")
        return cls(parts.netloc, parts.path.lstrip("/").rstrip("/"))

    @classmethod
    def from_fs_path(cls, path: str) -> S3Uri:
        """From a pyarrow/Ray filesystem path ("bucket/key")."""
        bucket, _, key = path.strip("/").partition("/")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    @property
    def folder(self) -> str:
        """The key prefix of everything under this location: "key/", or "" for a whole bucket."""
        return f"{self.key}/" if self.key else ""

    @property
    def fs_path(self) -> str:
        """The path pyarrow's S3FileSystem and Ray Train use for this location."""
        return f"{self.bucket}/{self.key}".rstrip("/")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: where it is, its size and its ETag (which changes with its content)."""

    key: str
    size: int
    etag: str


def listing_too_long(prefix: S3Uri, limit: int, what: str = "objects") -> StorageError:
    return StorageError(f"more than {limit:,} {what} under {prefix}/, the most a listing reads")


def resolve_endpoint(spec_endpoint: str | None, override: str | None = None) -> str | None:
    """The S3 endpoint to use: an explicit override (--s3-endpoint) first, then the spec, then AWS_ENDPOINT_URL.

    The override wins so that a manifest written for the cluster (endpoint: http://minio.minio:9000) runs
    unchanged on a laptop that reaches the same store through another address.
    """
    return override or spec_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Store:
    """boto3 transfers against one endpoint and region; credentials come from the environment.

    Pickles as (endpoint, region), so a Ray task or worker rebuilds its own client.
    """

    def __init__(self, endpoint: str | None, region: str, addressing_style: AddressingStyle = "auto") -> None:
        self.endpoint = endpoint
        self.region = region
        self.addressing_style = addressing_style
        config = Config(
            region_name=region,
            retries={"mode": "adaptive", "max_attempts": 10},
            max_pool_connections=MAX_POOL_CONNECTIONS,
            connect_timeout=10,
            read_timeout=120,
            # StorageSpec.boto_addressing_style: path for S3-compatible stores unless the spec says otherwise.
            # A private CA comes through AWS_CA_BUNDLE, which boto3 reads itself.
            s3={"addressing_style": addressing_style},
        )
        self.client: Any = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)

    @classmethod
    def for_spec(cls, storage: StorageSpec) -> S3Store:
        """The store a job's spec.storage names (its endpoint, region and addressing style)."""
        return cls(storage.endpoint, storage.region, storage.boto_addressing_style())

    def __reduce__(self) -> tuple[type[S3Store], tuple[str | None, str, AddressingStyle]]:
        return (type(self), (self.endpoint, self.region, self.addressing_style))

    # -- errors ---------------------------------------------------------------------------------

    def _storage_error(self, error: Exception, uri: S3Uri | str, action: str) -> StorageError:
        where = f" (endpoint {self.endpoint})" if self.endpoint else ""
        if isinstance(error, EndpointConnectionError):
            return StorageError(f"cannot reach S3{where} to {action} {uri}: {error}")
        if not isinstance(error, ClientError):
            return StorageError(f"S3 error{where} while trying to {action} {uri}: {error}")
        code = _error_code(error)
        bucket = uri.bucket if isinstance(uri, S3Uri) else S3Uri.parse(uri).bucket
        if code in ("NoSuchBucket",):
            return StorageError(f"bucket '{bucket}' does not exist{where}: cannot {action} {uri}")
        if code in ("NoSuchKey", "404", "NotFound"):
            if not self._bucket_exists(bucket):
                return StorageError(f"bucket '{bucket}' does not exist{where}: cannot {action} {uri}")
            return StorageError(f"no such object: {uri}{where}")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StorageError(f"access denied to {uri}{where}: check the credentials and the bucket policy")
        if code in ("PreconditionFailed", "412"):
            return StorageError(f"{uri} changed since the run listed it{where}: start the run again to list it anew")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return StorageError(f"S3 rejected the credentials ({code}) for {uri}{where}")
        return StorageError(f"S3 error {code or 'unknown'}{where} while trying to {action} {uri}: {error}")

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as error:
            return _error_code(error) not in ("404", "NoSuchBucket", "NotFound")
        except BotoCoreError:
            return True
        return True

    # -- metadata -------------------------------------------------------------------------------

    def head(self, uri: S3Uri) -> ObjectInfo:
        """The object's size and ETag; StorageError naming the URI when it is missing or forbidden."""
        try:
            response = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "read") from None
        return ObjectInfo(uri.key, int(response["ContentLength"]), str(response.get("ETag", "")).strip('"'))

    def check_bucket(self, uri: S3Uri, action: str = "write to") -> None:
        """Fail early, naming the URI, when the bucket behind `uri` is missing or forbidden."""
        try:
            self.client.head_bucket(Bucket=uri.bucket)
        except ClientError as error:
            code = _error_code(error)
            if code in ("404", "NoSuchBucket", "NotFound"):
                where = f" (endpoint {self.endpoint})" if self.endpoint else ""
                raise StorageError(f"bucket '{uri.bucket}' does not exist{where}: cannot {action} {uri}") from None
            raise self._storage_error(error, uri, action) from None
        except BotoCoreError as error:
            raise self._storage_error(error, uri, action) from None

    def list_folders(self, prefix: S3Uri, limit: int = MAX_LISTED_OBJECTS) -> list[str]:
        """Names of the "folders" directly under `prefix` (S3 common prefixes), sorted; StorageError
        when there are more than `limit`."""
        names: list[str] = []
        base = prefix.folder
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                names += [common["Prefix"][len(base) :].rstrip("/") for common in page.get("CommonPrefixes", [])]
                if len(names) > limit:
                    raise listing_too_long(prefix, limit, "folders")
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, prefix, "list") from None
        return sorted(n for n in names if n)

    def list_first_page(self, prefix: S3Uri, max_keys: int = 1000) -> tuple[list[ObjectInfo], bool]:
        """The first page (up to `max_keys` objects) under `prefix`, recursively, and whether that was all."""
        base = prefix.folder
        try:
            page = self.client.list_objects_v2(Bucket=prefix.bucket, Prefix=base, MaxKeys=max_keys)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, prefix, "list") from None
        objects = [
            ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))
            for item in page.get("Contents", [])
        ]
        return objects, not page.get("IsTruncated", False)

    def list_objects(self, prefix: S3Uri, limit: int = MAX_LISTED_OBJECTS, recursive: bool = True) -> list[ObjectInfo]:
        """Every object under `prefix` (recursively, or with `recursive=False` only those directly under
        it), keys in full; StorageError when there are more than `limit` (the listing stops there rather
        than filling memory)."""
        out: list[ObjectInfo] = []
        base = prefix.folder
        within = {} if recursive else {"Delimiter": "/"}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=base, **within):
                for item in page.get("Contents", []):
                    out.append(ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"')))
                if len(out) > limit:
                    raise listing_too_long(prefix, limit)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, prefix, "list") from None
        return out

    # -- transfers ------------------------------------------------------------------------------

    def download_file(self, uri: S3Uri, path: Path, size: int | None = None) -> None:
        """Download to `path` atomically (a partial file never appears under the final name).

        With the object's `size` known (from a listing) and below the multipart threshold, one GET does
        it: boto3's download_file would first HEAD the object and set up a transfer manager, which
        doubles the requests and the time of a cold node cache full of small images. With `size` known,
        an object that has grown beyond it since it was listed is refused, not written.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            if size is not None and size < TRANSFER_CONFIG.multipart_threshold:
                response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
                with open(tmp, "wb") as out:
                    for chunk in self._bounded_chunks(response, uri, size):
                        out.write(chunk)
            else:
                if size is not None and (now := self.head(uri).size) > size:
                    raise self._grown(uri, now, size)
                self.client.download_file(uri.bucket, uri.key, tmp, Config=TRANSFER_CONFIG)
            os.replace(tmp, path)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "download") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_bytes(self, uri: S3Uri, max_bytes: int = MAX_READ_BYTES, field: str = "") -> bytes:
        """The object's content; an object over `max_bytes` is refused from its size, before its body is
        read (StorageError naming `field`, the URI and the limit)."""
        try:
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            return b"".join(self._bounded_chunks(response, uri, max_bytes, field))
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "read") from None

    @contextmanager
    def open_body(self, uri: S3Uri, etag: str = "", span: tuple[int, int] | None = None) -> Iterator[Any]:
        """The object's body as a stream (`read(n)`), for one pass over a big object (a tar shard); with
        `etag`, only if the object still has it (else StorageError: it changed since it was listed); with
        `span` (start, end), only those bytes (an HTTP Range)."""
        try:
            extra = {"IfMatch": etag} if etag else {}
            if span is not None:
                extra["Range"] = f"bytes={span[0]}-{span[1] - 1}"
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key, **extra)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "read") from None
        body = response["Body"]
        try:
            yield body
        except (ClientError, BotoCoreError) as error:  # the connection failing mid-body
            raise self._storage_error(error, uri, "read") from None
        finally:
            body.close()

    def _bounded_chunks(self, response: Any, uri: S3Uri, limit: int, field: str = "") -> Iterator[bytes]:
        """The body of a GET response, refused (closed unread) when it is longer than `limit` bytes."""
        body = response["Body"]
        size = int(response.get("ContentLength") or 0)
        read = 0
        try:
            if size > limit:
                raise self._grown(uri, size, limit, field)
            for chunk in body.iter_chunks(MiB):
                read += len(chunk)
                if read > limit:
                    raise self._grown(uri, read, limit, field)
                yield chunk
        finally:
            body.close()

    @staticmethod
    def _grown(uri: S3Uri, size: int, limit: int, field: str = "") -> StorageError:
        where = f"{field}: " if field else ""
        return StorageError(f"{where}{uri} is {size:,} bytes or more, more than the {limit:,} bytes allowed")

    def put_bytes(self, uri: S3Uri, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "write") from None

    def upload_file(self, path: Path, uri: S3Uri) -> None:
        try:
            self.client.upload_file(str(path), uri.bucket, uri.key, Config=TRANSFER_CONFIG)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "upload") from None

    def delete(self, uri: S3Uri) -> None:
        """Remove one object (gone already is fine: S3 answers a missing key's DELETE with success)."""
        try:
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, uri, "delete") from None

    def copy(self, source: S3Uri, target: S3Uri) -> None:
        """Server-side copy (multipart for big objects): the bytes never pass through this process."""
        try:
            self.client.copy(
                {"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, Config=TRANSFER_CONFIG
            )
        except (ClientError, BotoCoreError) as error:
            raise self._storage_error(error, source, f"copy to {target} from") from None

    def download_many(
        self,
        items: Iterable[tuple[S3Uri, Path]],
        on_done: Callable[[S3Uri, Path], None] | None = None,
        threads: int = DOWNLOAD_THREADS,
    ) -> None:
        """Download many objects in parallel; `on_done` runs in the downloading thread (e.g. to verify)."""

        def fetch(item: tuple[S3Uri, Path]) -> None:
            uri, path = item
            self.download_file(uri, path)
            if on_done is not None:
                on_done(uri, path)

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-download") as pool:
            for _ in pool.map(fetch, items):
                pass

    def upload_dir(self, local_dir: Path, prefix: S3Uri) -> list[S3Uri]:
        """Upload every file under `local_dir` to `prefix`, keeping relative paths; returns the URIs."""
        files = [p for p in sorted(local_dir.rglob("*")) if p.is_file()]
        targets = [prefix.join(p.relative_to(local_dir).as_posix()) for p in files]
        with ThreadPoolExecutor(max_workers=min(len(files), 8) or 1, thread_name_prefix="s3-upload") as pool:
            for _ in pool.map(self.upload_file, files, targets):
                pass
        return targets

    def download_dir(self, prefix: S3Uri, local_dir: Path, max_objects: int = MAX_LISTED_OBJECTS) -> list[Path]:
        """Download every object under `prefix` into `local_dir`, keeping relative paths.

        A key whose relative path would leave `local_dir` (an empty, "." or ".." segment) fails the whole
        download with UnsafeNameError naming it, before anything is written; "folder" marker objects (keys
        ending in "/") are skipped.
        """
        objects = [o for o in self.list_objects(prefix, max_objects) if not o.key.endswith("/")]
        base = prefix.folder
        uris = [S3Uri(prefix.bucket, o.key) for o in objects]
        items = [(uri, local_path(local_dir, uri.key[len(base) :], str(uri))) for uri in uris]
        self.download_many(items, threads=min(len(items), 8) or 1)
        return [path for _, path in items]

    def arrow_filesystem(self) -> pyarrow.fs.S3FileSystem:
        """A pyarrow S3FileSystem on the same endpoint and region, for Ray Train's storage."""
        return arrow_filesystem(self.endpoint, self.region, self.addressing_style)


def arrow_filesystem(endpoint: str | None, region: str, addressing_style: str = "auto") -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 client, configured explicitly: it does not read boto3's settings, AWS_ENDPOINT_URL or
    AWS_CA_BUNDLE."""
    import pyarrow.fs

    kwargs: dict[str, Any] = {
        "region": region,
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=10),
        "connect_timeout": 10,
        "request_timeout": 120,
        "force_virtual_addressing": addressing_style == "virtual",
    }
    if os.environ.get(CA_BUNDLE_ENV):
        kwargs["tls_ca_file_path"] = os.environ[CA_BUNDLE_ENV]
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    return pyarrow.fs.S3FileSystem(**kwargs)
