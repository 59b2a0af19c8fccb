"""Metadata written so that a kill at any instant leaves the old or the new file, never half.

The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
renamed over the target (``os.replace`` is atomic on POSIX filesystems); the folder is then
synced so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def write_json(path: Path, data: object) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_bytes(path, json.dumps(data, indent=2).encode())


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
