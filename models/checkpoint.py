"""Checkpoint I/O: safetensors weights with the model's config and provenance in the metadata."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from models.denoiser import ConditionalUNet3D, DenoiserConfig

DEFAULT_DENOISER = Path(__file__).parent / "checkpoints" / "denoiser.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not match what it is used for."""


def save_checkpoint(path: Path, model: torch.nn.Module, kind: str, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-able; must hold "config") to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"kind": kind, **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint, JSON-decoded, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
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


def load_model(
    path: Path, kind: str, build: Callable[[dict[str, Any]], torch.nn.Module]
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a ``kind`` model built by ``build(config_dict)``; eval mode on the CPU."""
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not a {kind}")
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model config in its metadata")
    model = build(meta["config"])
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its config: {err}") from err
    return model.eval(), meta


def load_denoiser(path: Path) -> tuple[ConditionalUNet3D, dict[str, Any]]:
    """Load a denoiser and its metadata; the model is in eval mode on the CPU."""
    return load_model(  # type: ignore[return-value]
        path, "denoiser", lambda c: ConditionalUNet3D(DenoiserConfig.from_dict(c))
    )
