"""Test and demo infrastructure: an embedded stand-in for everything a cluster provides.

NOT part of the product. `kubetune demo` and the end-to-end tests run the real operator against these
stand-ins, each a real protocol endpoint on 127.0.0.1:

- `kubeapi`: a Kubernetes API (kmock's emulator, extended until a real kubectl, kopf and the
  kubernetes client work against it: resource versions, watches that resume, selectors, server-side
  tables, status subresources, finalizers, garbage collection of owned objects, service-account tokens).
- `kuberay`: a local stand-in for the KubeRay operator that runs each RayJob's entrypoint on a local
  Ray cluster and reports its status the way KubeRay does.
- `s3`: moto's S3 server behind a small proxy that can inject faults.
- `seed`: the demo's data (scikit-learn digits as an ImageFolder) and base weights.
- `cluster.DevCluster`: brings all of it up and down, and runs the operator against it.

Importing this package does not import torch or Ray: only `seed` does, lazily, when asked to train
base weights.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DevCluster"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m kubetune_dev.devcluster.<module>` and light imports stay light.
    if name == "DevCluster":
        from kubetune_dev.devcluster.cluster import DevCluster

        return DevCluster
    raise AttributeError(name)
