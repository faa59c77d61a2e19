"""Local paths from remote names: an S3 key or a COCO `file_name` never leaves the folder it is put in.

Whoever can write to a bucket chooses its keys, and S3 allows any UTF-8 in them: `a/../../x.png`,
`a//b.png`, a leading "/", a backslash, a NUL. Every place that turns a remote name into a local path
goes through `local_path`, which refuses a name with an empty, "." or ".." segment (or a character
that is a separator or a terminator elsewhere) instead of normalising it: two keys normalising to one
file would overwrite each other, and a refused key is reported, never silently renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubetune_trainer.errors import UnsafeNameError

MAX_NAME_BYTES = 1024  # S3's own limit on a key
MAX_SEGMENT_BYTES = 255  # a file name on Linux file systems


def unsafe_reason(name: str) -> str | None:
    """Why `name` cannot become a path below a folder, or None when it can."""
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if "\\" in name:
        return "holds a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            return f"has a {'empty' if not segment else repr(segment)} path segment"
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            return f"has a path segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def local_path(folder: Path, name: str, source: str) -> Path:
    """`folder / name`, or UnsafeNameError naming `source` (the s3:// URI or field the name came from)."""
    reason = unsafe_reason(name)
    path = folder / name
    # Belt and braces: whatever the segment rules miss, the path must still lie below the folder.
    if reason is None and not os.path.normpath(path).startswith(os.path.join(os.path.normpath(folder), "")):
        reason = "leaves its folder"
    if reason is not None:
        raise UnsafeNameError(f"refused {source}: the name {name!r} {reason}, so it cannot be a file below its folder")
    return path
