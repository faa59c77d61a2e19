"""The names the operator owns inside a job's Ray pods (pure data): its volumes, mount paths, env vars and
label prefixes. `builders` and `pod_security` write them; `pod_template` refuses a user's podTemplate that
would take one over, so these are written down once, here.
"""

from __future__ import annotations

from kubetune_trainer.config import CA_BUNDLE_ENV, CONFIG_ENV, RAY_TRAIN_ENV

# The Ray container of each pod, named after the pod's component.
HEAD = "ray-head"
WORKER = "ray-worker"

SHM_VOLUME = "dshm"
SHM_DIR = "/dev/shm"
TOKEN_VOLUME = "kubetune-token"
TOKEN_DIR = "/var/run/secrets/kubetune.dev"
TMP_VOLUME = "tmp"
TMP_DIR = "/tmp"
RAY_SESSION_VOLUME = "ray-session"
RAY_SESSION_DIR = "/tmp/ray"
CACHE_VOLUME = "kubetune-cache"
# Where `kubetune_trainer.cache.cache_root()` puts the node cache by default; the workers' env says so
# (CACHE_DIR_ENV) rather than rely on the default.
CACHE_DIR = "/tmp/kubetune-cache"
CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
# spec.storage.caBundle's ConfigMap, read-only, on every pod; CA_BUNDLE_ENV names the key's file in it.
CA_VOLUME = "kubetune-ca"
CA_DIR = "/etc/kubetune/ca"

OPERATOR_VOLUMES = (SHM_VOLUME, TOKEN_VOLUME, TMP_VOLUME, RAY_SESSION_VOLUME, CACHE_VOLUME, CA_VOLUME)
OPERATOR_MOUNT_PATHS = (SHM_DIR, TOKEN_DIR, TMP_DIR, RAY_SESSION_DIR, CACHE_DIR, CA_DIR)

PROGRESS_URL_ENV = "KUBETUNE_PROGRESS_URL"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
# The keys the credentials Secret must hold; a session token is optional (temporary credentials).
ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
# What spec.storage sets: a podTemplate may not say otherwise behind the spec's back.
STORAGE_ENV = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    CA_BUNDLE_ENV,
)
OPERATOR_ENV = (
    CONFIG_ENV,
    CACHE_DIR_ENV,
    PROGRESS_URL_ENV,
    RAY_AUTH_MODE_ENV,
    RAY_AUTH_TOKEN_ENV,
    *STORAGE_ENV,
    *RAY_TRAIN_ENV,
)
# Every env var whose name starts so is the operator's or Ray's own business in these pods.
OPERATOR_ENV_PREFIXES = ("KUBETUNE_",)

# Label and annotation keys the operator, KubeRay and Kueue set on the pods.
OPERATOR_LABEL_PREFIXES = ("kubetune.dev/", "ray.io/", "kueue.x-k8s.io/")
OPERATOR_LABEL_KEYS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/component")
