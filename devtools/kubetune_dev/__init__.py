"""kubetune's development tools: the embedded dev cluster and `kubetune demo`. Not part of the product.

- `kubetune_dev.devcluster`: stand-ins for what a cluster provides (a Kubernetes API, S3, KubeRay), each
  a real endpoint on 127.0.0.1, for `kubetune demo` and the end-to-end tests.
- `kubetune_dev.demo`: `kubetune demo`, the whole loop on this machine.
- `vendor/kuberay/`: KubeRay v1.7.0's RayJob CRD and its licence (Apache-2.0); the dev cluster serves
  RayJobs with that schema and the builder tests check rendered RayJobs against it.

A distribution of its own (`devtools/pyproject.toml`, `kubetune-dev`), installed by `make setup`: the
operator's wheel and image hold neither it nor what it needs (kmock, moto, scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

KUBERAY_VERSION = "1.7.0"
RAYJOB_CRD = Path(__file__).resolve().parent / "vendor" / "kuberay" / "ray.io_rayjobs.yaml"
