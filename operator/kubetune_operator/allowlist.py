"""Which S3 endpoints and image registries a job may name: the operator's allow-lists (pure).

The operator talks to a job's S3 endpoint itself (preflight, with the keys of a Secret of the job's
namespace), and a job's image runs with those keys. Without a list, a job author could point the
operator at any address its pod can reach (an SSRF: metadata services, in-cluster admin endpoints) and
learn from the status what answered, or run any image. So a job may name:

- an S3 endpoint: none at all (AWS S3, the default), an https:// AWS S3 endpoint (`AWS_S3_HOST`), or one
  the admin lists (`allowedS3Endpoints`: `[scheme://]host[:port]`; no scheme allows http and https, no
  port allows any; `*.example.com` allows the subdomains of example.com). Never one with credentials in
  it (`user:password@`), whatever the list says;
- an image: from the registry of the operator's own trainer image, or one the admin lists
  (`allowedImageRegistries`: `registry[/path]`, e.g. `registry.example.com:5000/ml`).

`endpoint_refusal` and `image_refusal` say why not, as the job's status message, or None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# AWS's own S3 endpoints: s3.amazonaws.com, s3.<region>.amazonaws.com, s3-<region>.amazonaws.com and their
# -fips and .dualstack forms (China: amazonaws.com.cn). Only AWS can name hosts under amazonaws.com, and
# no other AWS service's hosts have this shape (EC2 instances' public names are ec2-….amazonaws.com).
AWS_S3_HOST = re.compile(
    r"^s3(-fips)?(\.dualstack)?([.-][a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9])?\.amazonaws\.com(\.cn)?$"
)
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
ENDPOINT_ENTRY = re.compile(rf"^((?P<scheme>https?)://)?(?P<host>(\*\.)?{_HOST})(:(?P<port>[0-9]{{1,5}}))?/?$")
REGISTRY_ENTRY = re.compile(rf"^{_HOST}(:[0-9]{{1,5}})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class EndpointEntry:
    """One allowed S3 endpoint: scheme None allows http and https, port None any port."""

    scheme: str | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> EndpointEntry:
        match = ENDPOINT_ENTRY.match(text.strip().lower())
        if match is None:
            raise ValueError(
                f"allowed S3 endpoint {text!r}: must be [http(s)://]host[:port], e.g. https://minio.example.com:9000, "
                "minio.example.com or *.example.com"
            )
        port = match.group("port")
        return cls(match.group("scheme"), match.group("host"), int(port) if port else None)

    def allows(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def parse_registries(entries: Iterable[str]) -> tuple[str, ...]:
    """The allowed registries, checked and lowercased; raises ValueError naming a malformed one."""
    out = []
    for entry in entries:
        text = entry.strip().lower().rstrip("/")
        if not REGISTRY_ENTRY.match(text):
            raise ValueError(
                f"allowed image registry {entry!r}: must be a registry host[:port] with an optional path, e.g. "
                "ghcr.io, registry.example.com:5000 or registry.example.com/ml"
            )
        out.append(text)
    return tuple(out)


def endpoint_refusal(endpoint: str | None, allowed: Iterable[EndpointEntry]) -> str | None:
    """Why a job may not name `endpoint` (spec.storage.endpoint), or None when it may."""
    if endpoint is None:
        return None  # AWS S3, found by region
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        return (
            "spec.storage.endpoint: must not carry credentials (user:password@); put the keys in the Secret "
            "that spec.storage.credentialsSecret names"
        )
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = -1  # not a port: allowed by no entry
    entries = list(allowed)
    if (scheme == "https" and AWS_S3_HOST.match(host)) or any(e.allows(scheme, host, port) for e in entries):
        return None
    listed = ", ".join(_show(e) for e in entries) or "no others"
    return (
        f"spec.storage.endpoint: {scheme}://{host}:{port} is not an S3 endpoint this operator may use; it allows "
        f"AWS S3 (spec.storage.endpoint omitted, or https://s3.<region>.amazonaws.com) and {listed}. Ask your "
        "cluster admin to add it to the operator's allowedS3Endpoints"
    )


def image_registry(image: str) -> str:
    """The registry of an image reference, as container runtimes read it: the first path component when it
    has a '.' or ':' or is localhost, else Docker Hub."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first.lower()
    return DOCKER_HUB


def _repository(image: str) -> str:
    """`registry/path/name` of an image reference, without tag or digest (Docker Hub names made whole)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: len(name) - len(last[-1])] + last[-1].split(":", 1)[0]
    registry = image_registry(name)
    if registry == DOCKER_HUB and not name.lower().startswith(DOCKER_HUB + "/"):
        path = name if "/" in name else f"library/{name}"
        return f"{DOCKER_HUB}/{path}".lower()
    return name.lower()


def image_refusal(image: str | None, trainer_image: str, allowed: Iterable[str]) -> str | None:
    """Why a job may not name `image` (spec.image), or None when it may: from the trainer image's registry,
    or under an allowed `registry[/path]`."""
    if image is None:
        return None  # the operator's own trainer image
    repository = _repository(image)
    entries = [image_registry(trainer_image), *allowed]
    if any(repository.startswith(entry + "/") for entry in entries):
        return None
    return (
        f"spec.image: {image} is not from a registry this operator may run; it allows "
        f"{', '.join(dict.fromkeys(entries))}. Ask your cluster admin to add it to the operator's "
        "allowedImageRegistries"
    )


def _show(entry: EndpointEntry) -> str:
    return f"{entry.scheme + '://' if entry.scheme else ''}{entry.host}{f':{entry.port}' if entry.port else ''}"
