"""Checkpoint files without torch: where the committed ones live, what their metadata says and
their digest (for commands and checks that only look, such as ``tera inspect`` and the
ownership of side files, so they start fast and small)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
"""The committed checkpoints, one per kind: ``<kind>.safetensors``."""
DEFAULT_DENOISER = CHECKPOINT_DIR / "denoiser.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not match what it is used for."""


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint, JSON-decoded, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {err}") from err
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def file_digest(path: Path) -> str:
    """SHA-256 of a file (recorded in the output store for provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
