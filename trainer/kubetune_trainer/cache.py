"""A per-node cache of S3 objects, filled once per node whatever the number of workers on it.

Entries are keyed by endpoint, URI, ETag and size, so a changed object gets a new entry and a stale one
is never read. Workers on one node serialise on a file lock: the first downloads, the others find the
entry complete. Files are written under a temporary name and renamed, so a crash leaves no half file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubetune_trainer.errors import StorageError
from kubetune_trainer.localpaths import local_path
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri

CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
# The largest object (base weights) a node caches: far above any vision model's weights, far below a disk.
MAX_OBJECT_BYTES = 64 * 1024**3


def cache_root() -> Path:
    """KUBETUNE_CACHE_DIR, else <tmp>/kubetune-cache (in the worker pods: an emptyDir there, with a size limit)."""
    root = Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "kubetune-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on this node (flock on `path`.lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_object(store: S3Store, uri: S3Uri, info: ObjectInfo, root: Path | None = None) -> Path:
    """The local path of `uri` (as described by `info`), downloading it once per node.

    The file keeps the object's name (its suffix says how to read it), and that name must stay in its
    entry (UnsafeNameError otherwise); an object over MAX_OBJECT_BYTES is refused before any download."""
    if info.size > MAX_OBJECT_BYTES:
        raise StorageError(f"{uri} is {info.size:,} bytes, more than the {MAX_OBJECT_BYTES:,} bytes a node caches")
    entry = (root or cache_root()) / "objects" / digest(store.endpoint, uri, info.etag, info.size)
    path = local_path(entry, uri.name or "object", str(uri))
    if path.is_file() and path.stat().st_size == info.size:
        return path
    with node_lock(entry):
        if not (path.is_file() and path.stat().st_size == info.size):
            store.download_file(uri, path, size=info.size)
    return path
