"""Metadata written so that a kill at any instant leaves the old or the new file, never half.

The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
renamed over the target (``os.replace`` is atomic on POSIX filesystems); the folder is then
synced so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    write_with(path, lambda f: f.write(data))


def write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` atomically with what ``write`` writes to the open file it is given (a
    large file streamed, not held in memory); a failed write leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
