# syntax=docker/dockerfile:1.7
# One Dockerfile, two images:
#   docker build --target operator -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/kubetune-trainer:0.1.0 .
# The operator image has no torch and no Ray (the operator never imports them); the trainer image is
# Ray's own GPU image plus torch/timm and kubetune_trainer, with Ray left exactly as Ray shipped it.
# The pins below are the versions the test suite runs with (tests/chart/test_dockerfile.py checks).

# ---------------------------------------------------------------------------------------------------
# wheels: the kubetune wheel and, for the operator, every wheel of its dependency closure.
FROM python:3.11.14-slim-bookworm AS wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip wheel --no-deps --wheel-dir /wheels/kubetune . \
 && pip wheel --wheel-dir /wheels/operator \
      /wheels/kubetune/kubetune-*.whl \
      kopf==1.45.2 \
      kubernetes==36.0.3 \
      prometheus-client==0.26.0 \
      boto3==1.44.8 \
      pydantic==2.14.4 \
      pyyaml==6.0.4 \
      aiohttp==3.14.5

# ---------------------------------------------------------------------------------------------------
# operator: python -m kubetune_operator, as uid 65532, installed offline from the wheels above, so
# the image holds no compiler, no source tree and no pip cache.
FROM python:3.11.14-slim-bookworm AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kopf operator that runs FineTuneJobs as KubeRay RayJobs" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels/operator /wheels/operator/kubetune-*.whl \
 && groupadd --gid 65532 kubetune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetune
WORKDIR /tmp
USER 65532:65532
# health (kopf liveness), metrics, progress: the chart's defaults, which it passes to the operator.
EXPOSE 8080 9090 8081
ENTRYPOINT ["python", "-m", "kubetune_operator"]

# ---------------------------------------------------------------------------------------------------
# trainer: the image of every Ray head and worker pod of a job. Ray's GPU image already holds Ray,
# numpy, pyarrow, pydantic, boto3 and more; a constraints file made from its own package list holds
# each of those at the version Ray shipped, so pip adds packages but never replaces one (a conflict
# fails the build instead of silently reinstalling Ray). torch's PyPI wheels bring their own CUDA
# runtime libraries and need only the node's NVIDIA driver.
FROM rayproject/ray:2.60.0-py311-gpu AS trainer
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="Ray Train fine-tuning of timm models for kubetune" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ray's image runs as its `ray` user (uid 1000, gid 100), which owns the Python environment. Numeric,
# so Kubernetes can check runAsNonRoot: the operator runs every Ray pod as exactly this user
# (kubetune_operator/pod_security.py), with a read-only root filesystem and emptyDirs for /tmp, Ray's
# session dir /tmp/ray and the node cache /tmp/kubetune-cache.
USER 1000:100
WORKDIR /home/ray
# Packages new to the image are pinned here; the ones named without a version (pydantic, boto3,
# pyarrow, numpy, pillow, pyyaml) are held at the image's own versions by the constraints file when the
# image ships them.
# hadolint ignore=DL3013
RUN pip list --format=freeze > /home/ray/ray-image-constraints.txt \
 && pip install --constraint /home/ray/ray-image-constraints.txt \
      torch==2.14.1 \
      torchvision==0.29.1 \
      timm==1.0.31 \
      safetensors==0.8.0 \
      matplotlib==3.11.2 \
      torchmetrics==1.9.0 \
      pycocotools==2.0.11 \
      onnx==1.23.2 \
      onnxruntime==1.32.0 \
      mlflow-skinny==3.17.2 \
      pydantic \
      boto3 \
      pyarrow \
      numpy \
      pillow \
      pyyaml \
 && python -c "import ray, torch, timm; print('ray', ray.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
# kubetune itself without its dependencies: the operator's (kopf, kubernetes, …) are not needed here.
RUN --mount=type=bind,from=wheels,source=/wheels/kubetune,target=/tmp/kubetune-wheel \
    pip install --no-deps /tmp/kubetune-wheel/kubetune-*.whl \
 && python -c "import kubetune_trainer"
