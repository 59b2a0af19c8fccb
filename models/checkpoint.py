"""Checkpoints: safetensors weights with the model's config and provenance in the metadata.

The one registry of model kinds (``KINDS``: each kind's model class, config class and committed
default file) and the one loader (``load_checkpoint``): read the metadata, check the kind, build
the model from its config, load the weights strictly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.checkpoint_files import CHECKPOINT_DIR, CheckpointError, read_metadata
from models.denoiser import ConditionalUNet3D, DenoiserConfig
from models.magnet import BinCNN, MagNet, MagNetConfig
from models.spatia import Spatia, SpatiaConfig


@dataclass(frozen=True)
class ModelKind:
    """A kind of checkpoint: its model class, built from its config class (``from_dict``)."""

    name: str
    model: Callable[[Any], nn.Module]
    config: type[Any]

    @property
    def default(self) -> Path:
        """The committed checkpoint of this kind."""
        return CHECKPOINT_DIR / f"{self.name}.safetensors"

    def build(self, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised model from a checkpoint's config dict."""
        return self.model(self.config.from_dict(config))


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind("denoiser", ConditionalUNet3D, DenoiserConfig),
        ModelKind("magnet", MagNet, MagNetConfig),
        ModelKind("magnet_bin_cnn", BinCNN, MagNetConfig),  # MagNet's bin-crop-only baseline
        ModelKind("spatia", Spatia, SpatiaConfig),
    )
}
DEFAULT_DENOISER = KINDS["denoiser"].default
DEFAULT_MAGNET = KINDS["magnet"].default
DEFAULT_MAGNET_BIN_CNN = KINDS["magnet_bin_cnn"].default
DEFAULT_SPATIA = KINDS["spatia"].default


def save_checkpoint(path: Path, model: torch.nn.Module, kind: str, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-able; must hold "config") to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"kind": kind, **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_checkpoint(path: Path, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``kind`` model (a name in ``KINDS``) and its metadata; eval mode on the CPU."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not a {kind}")
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model config in its metadata")
    model = KINDS[kind].build(meta["config"])
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its config: {err}") from err
    return model.eval(), meta


def load_denoiser(path: Path) -> tuple[ConditionalUNet3D, dict[str, Any]]:
    """A denoiser checkpoint and its metadata (``load_checkpoint``)."""
    model, meta = load_checkpoint(path, "denoiser")
    return cast(ConditionalUNet3D, model), meta


def load_magnet(path: Path) -> tuple[MagNet, dict[str, Any]]:
    """A MagNet checkpoint and its metadata (gene panel, bin shape, training figures)."""
    model, meta = load_checkpoint(path, "magnet")
    return cast(MagNet, model), meta


def load_spatia(path: Path) -> tuple[Spatia, dict[str, Any]]:
    """A SPATIA checkpoint and its metadata (``load_checkpoint``)."""
    model, meta = load_checkpoint(path, "spatia")
    return cast(Spatia, model), meta
