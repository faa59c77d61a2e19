"""How this operator is configured: one frozen dataclass, read from the environment the Helm chart sets.

Every value has a default that works for `kubetune render` and local runs; `from_env()` lets the chart
(or a person) override each with a `KUBETUNE_*` variable, documented in docs/operator.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata

from kubetune_operator.allowlist import EndpointEntry, parse_registries


def package_version() -> str:
    """The installed kubetune version, which tags the default trainer image."""
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


DEFAULT_TRAINER_REPOSITORY = "ghcr.io/kubetune/kubetune-trainer"
# The chart's Service for release "kubetune" in namespace "kubetune-system"; the chart always sets
# KUBETUNE_PROGRESS_URL from its own values, so this default only matters outside the chart.
DEFAULT_PROGRESS_URL = "http://kubetune.kubetune-system.svc:8081"
# The Ray version baked into the trainer image; KubeRay uses it to pick compatible cluster settings.
DEFAULT_RAY_VERSION = "2.60.0"
DEFAULT_TRAINER_SERVICE_ACCOUNT = "kubetune-trainer"


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide choices that are not part of any FineTuneJob."""

    trainer_image: str = field(default_factory=lambda: f"{DEFAULT_TRAINER_REPOSITORY}:{package_version()}")
    trainer_image_pull_policy: str = "IfNotPresent"
    # The ServiceAccount every job's Ray pods run as, one per namespace, created by the operator when
    # missing; a job's progress token is tied to the job by its audience, not by this account.
    trainer_service_account: str = DEFAULT_TRAINER_SERVICE_ACCOUNT
    # Annotations of that account, e.g. an IRSA role (eks.amazonaws.com/role-arn) or a GKE workload
    # identity (iam.gke.io/gcp-service-account), so every job's pods get the cloud identity.
    trainer_service_account_annotations: tuple[tuple[str, str], ...] = ()
    # Base URL of the operator's progress endpoint as trainer pods reach it; each job reports to
    # <base>/v1/progress/<namespace>/<name>. None: jobs get no progress target.
    progress_base_url: str | None = DEFAULT_PROGRESS_URL
    # Namespaces whose jobs this operator serves; empty means every namespace.
    namespaces: tuple[str, ...] = ()
    ray_version: str = DEFAULT_RAY_VERSION
    # The head pod runs the Ray driver and Ray Train's controller, never a training worker.
    head_cpu: str = "1"
    head_memory: str = "4Gi"
    # Ports of the Prometheus metrics (/metrics) and the progress endpoint; 0 picks a free port, None
    # serves none (the chart sets both from operator.ports).
    metrics_port: int | None = 9090
    progress_port: int | None = 8081
    # Lifetime of the projected ServiceAccount token in trainer pods; the kubelet refreshes it.
    token_expiration_seconds: int = 3600
    # Transient preflight failures (S3 unreachable, throttled) are retried after
    # min(preflight_backoff_seconds * 2**retry, preflight_backoff_max_seconds).
    preflight_backoff_seconds: float = 5.0
    preflight_backoff_max_seconds: float = 300.0
    # How often a job waiting for KubeRay to be installed checks again.
    kuberay_retry_seconds: float = 60.0
    # How often a job whose name is still held by an earlier job's RayJob checks whether it is gone.
    previous_rayjob_retry_seconds: float = 10.0
    # Connect/read timeout of each S3 call in preflight, and the most one whole preflight may take.
    s3_timeout_seconds: float = 10.0
    preflight_deadline_seconds: float = 60.0
    # Preflights running at once, in all and per namespace (one namespace's jobs cannot take every slot).
    preflights_at_once: int = 8
    preflights_per_namespace: int = 2
    # How long a Running job may go without an accepted progress update before its status says so
    # (condition ProgressReporting=False, reason NoProgressReceived). Model loading and the first
    # steps come first, so this is well over a minute.
    progress_grace_seconds: float = 90.0
    # What a job may name besides the defaults (allowlist.py): S3 endpoints besides AWS's own, as
    # [scheme://]host[:port] or *.domain; image registries besides the trainer image's, as registry[/path].
    allowed_s3_endpoints: tuple[str, ...] = ()
    allowed_image_registries: tuple[str, ...] = ()
    log_level: str = "INFO"
    # A NetworkPolicy per job (builders.build_network_policy): Ray's ports admit the job's own pods, and
    # the dashboard port KubeRay's operator as well (it submits the run and polls it over HTTP). False
    # leaves the pods' network to the cluster's own policies.
    network_policy: bool = True
    # Where KubeRay's operator pods run (None: any namespace) and labels they all carry (KubeRay's Helm
    # chart labels them app.kubernetes.io/name: kuberay-operator).
    kuberay_namespace: str | None = None
    kuberay_pod_labels: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "kuberay-operator"),)
    # Keep a failed job's Ray head, and the driver's log on it, for its runPolicy.keepFailedFor, through
    # KubeRay's RayJob deletionRules (retention.py). They need KubeRay's RayJobDeletionPolicy feature gate:
    # Beta and on by default since KubeRay 1.6 (off by default in 1.3-1.5). False: KubeRay's
    # shutdownAfterJobFinishes, which deletes the whole Ray cluster as soon as a job ends.
    keep_failed_heads: bool = True

    def __post_init__(self) -> None:
        # A malformed entry stops the operator at startup, naming it, rather than refusing every job.
        self.s3_endpoint_entries()
        parse_registries(self.allowed_image_registries)

    def s3_endpoint_entries(self) -> tuple[EndpointEntry, ...]:
        return tuple(EndpointEntry.parse(text) for text in self.allowed_s3_endpoints)

    def progress_url(self, namespace: str, name: str) -> str | None:
        """Where the trainer pods of job `namespace/name` push progress, if anywhere."""
        if not self.progress_base_url:
            return None
        return f"{self.progress_base_url.rstrip('/')}/v1/progress/{namespace}/{name}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Defaults, overridden by each KUBETUNE_* variable that is set and not empty."""
        env = os.environ if environ is None else environ
        overrides: dict[str, object] = {}
        for name, variable in _STRING_VARIABLES.items():
            if env.get(variable):
                overrides[name] = env[variable]
        for name, variable in _NUMBER_VARIABLES.items():
            if env.get(variable):
                overrides[name] = _number(variable, env[variable])
        for name, variable in _LIST_VARIABLES.items():
            if env.get(variable):
                overrides[name] = parse_list(env[variable])
        for name, variable in _BOOLEAN_VARIABLES.items():
            if env.get(variable):
                overrides[name] = parse_bool(variable, env[variable])
        if env.get("KUBETUNE_KUBERAY_POD_LABELS"):
            overrides["kuberay_pod_labels"] = parse_labels(
                "KUBETUNE_KUBERAY_POD_LABELS", env["KUBETUNE_KUBERAY_POD_LABELS"]
            )
        if env.get(ANNOTATIONS_VARIABLE):
            overrides["trainer_service_account_annotations"] = parse_json_map(
                ANNOTATIONS_VARIABLE, env[ANNOTATIONS_VARIABLE]
            )
        return cls(**overrides)  # type: ignore[arg-type]


ANNOTATIONS_VARIABLE = "KUBETUNE_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS"


_STRING_VARIABLES = {
    "trainer_image": "KUBETUNE_TRAINER_IMAGE",
    "trainer_image_pull_policy": "KUBETUNE_TRAINER_IMAGE_PULL_POLICY",
    "trainer_service_account": "KUBETUNE_TRAINER_SERVICE_ACCOUNT",
    "progress_base_url": "KUBETUNE_PROGRESS_URL",
    "ray_version": "KUBETUNE_RAY_VERSION",
    "head_cpu": "KUBETUNE_HEAD_CPU",
    "head_memory": "KUBETUNE_HEAD_MEMORY",
    "log_level": "KUBETUNE_LOG_LEVEL",
    "kuberay_namespace": "KUBETUNE_KUBERAY_NAMESPACE",
}
_LIST_VARIABLES = {
    "namespaces": "KUBETUNE_NAMESPACES",
    "allowed_s3_endpoints": "KUBETUNE_ALLOWED_S3_ENDPOINTS",
    "allowed_image_registries": "KUBETUNE_ALLOWED_IMAGE_REGISTRIES",
}
_BOOLEAN_VARIABLES = {
    "network_policy": "KUBETUNE_NETWORK_POLICY",
    "keep_failed_heads": "KUBETUNE_KEEP_FAILED_HEADS",
}
_NUMBER_VARIABLES = {
    "token_expiration_seconds": "KUBETUNE_TOKEN_EXPIRATION_SECONDS",
    "metrics_port": "KUBETUNE_METRICS_PORT",
    "progress_port": "KUBETUNE_PROGRESS_PORT",
    "preflight_backoff_seconds": "KUBETUNE_PREFLIGHT_BACKOFF_SECONDS",
    "preflight_backoff_max_seconds": "KUBETUNE_PREFLIGHT_BACKOFF_MAX_SECONDS",
    "kuberay_retry_seconds": "KUBETUNE_KUBERAY_RETRY_SECONDS",
    "previous_rayjob_retry_seconds": "KUBETUNE_PREVIOUS_RAYJOB_RETRY_SECONDS",
    "s3_timeout_seconds": "KUBETUNE_S3_TIMEOUT_SECONDS",
    "preflight_deadline_seconds": "KUBETUNE_PREFLIGHT_DEADLINE_SECONDS",
    "preflights_at_once": "KUBETUNE_PREFLIGHTS_AT_ONCE",
    "preflights_per_namespace": "KUBETUNE_PREFLIGHTS_PER_NAMESPACE",
    "progress_grace_seconds": "KUBETUNE_PROGRESS_GRACE_SECONDS",
}


def _number(variable: str, text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{variable}: must be a number (got {text!r})") from None
    if value < 0:
        raise ValueError(f"{variable}: must be >= 0 (got {text!r})")
    return int(value) if value.is_integer() and variable in _INTEGER_VARIABLES else value


_INTEGER_VARIABLES = frozenset(
    {
        "KUBETUNE_TOKEN_EXPIRATION_SECONDS",
        "KUBETUNE_METRICS_PORT",
        "KUBETUNE_PROGRESS_PORT",
        "KUBETUNE_PREFLIGHTS_AT_ONCE",
        "KUBETUNE_PREFLIGHTS_PER_NAMESPACE",
    }
)


def parse_list(text: str) -> tuple[str, ...]:
    """`"a, b c"` → `("a", "b", "c")`: commas or whitespace separate, duplicates and blanks drop out."""
    seen: dict[str, None] = {}
    for item in re.split(r"[,\s]+", text):
        if item:
            seen[item] = None
    return tuple(seen)


_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def parse_bool(variable: str, text: str) -> bool:
    """`true`/`false` (also 1/0, yes/no, on/off, in any case); anything else is an error naming `variable`."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"{variable}: must be true or false (got {text!r})")


def parse_labels(variable: str, text: str) -> tuple[tuple[str, str], ...]:
    """`"a=b, c=d"` → `(("a", "b"), ("c", "d"))`: pod labels as a NetworkPolicy selects them."""
    labels: dict[str, str] = {}
    for item in re.split(r"[,\s]+", text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{variable}: must be key=value pairs separated by commas (got {text!r})")
        labels[key] = value
    return tuple(labels.items())


def parse_json_map(variable: str, text: str) -> tuple[tuple[str, str], ...]:
    """`'{"a": "b"}'` → `(("a", "b"),)`: a JSON object of strings (annotations hold commas and '=')."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{variable}: must be a JSON object of strings (got {text!r})")
    return tuple(value.items())
