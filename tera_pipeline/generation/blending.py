"""Patch windows and weighted accumulation of overlapping patch predictions (on the device).

The window is strictly positive everywhere so every voxel covered by at least one patch has a
well-defined normalised blend: ``sum(w * prediction) / sum(w)`` (as chunkflow and MONAI).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from tera_pipeline.core.geometry import Box, Shape

WindowKind = Literal["cosine", "gaussian", "constant"]


@lru_cache(maxsize=16)
def patch_window(patch: Shape, kind: WindowKind = "cosine") -> np.ndarray:
    """A separable, strictly positive weight window of shape ``patch`` (float32)."""
    axes = []
    for n in patch:
        i = np.arange(n, dtype=np.float64) + 0.5
        if kind == "cosine":
            w = 0.5 - 0.5 * np.cos(2 * np.pi * i / n)  # Hann, sampled at voxel centres: > 0
        elif kind == "gaussian":
            sigma = 0.125 * n
            w = np.exp(-0.5 * ((i - n / 2) / sigma) ** 2)
        elif kind == "constant":
            w = np.ones(n)
        else:
            raise ValueError(f"unknown window kind {kind!r}")
        axes.append(np.maximum(w, 1e-3))
    window = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    window = window.astype(np.float32)
    window.setflags(write=False)
    return window


class Accumulator:
    """Weighted sums of patch predictions over a target box (channels first), as torch tensors
    on the device that computed the predictions."""

    def __init__(self, box: Box, channels: int, device: torch.device | str = "cpu") -> None:
        self.box = box
        self.device = torch.device(device)
        self.total = torch.zeros((channels, *box.shape), dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(box.shape, dtype=torch.float32, device=self.device)
        self._windows: dict[int, torch.Tensor] = {}

    def add(self, patch: Box, values: torch.Tensor | np.ndarray, window: np.ndarray) -> None:
        """Add ``values`` (channels, *patch.shape) weighted by ``window`` where they overlap."""
        part = patch.intersect(self.box)
        if part.empty:
            return
        src = part.slices(patch)
        dst = part.slices(self.box)
        w = self._on_device(window)[src]
        values = torch.as_tensor(values, device=self.device)
        self.total[(slice(None), *dst)] += values[(slice(None), *src)] * w
        self.weight[dst] += w

    def _on_device(self, window: np.ndarray) -> torch.Tensor:
        held = self._windows.get(id(window))
        if held is None:
            held = self._windows[id(window)] = torch.tensor(window, device=self.device)
        return held

    def result(self) -> torch.Tensor:
        """The normalised blend; raises if any voxel was covered by no patch."""
        if not bool((self.weight > 0).all()):
            uncovered = int((self.weight <= 0).sum())
            raise RuntimeError(f"{uncovered} voxels of {self.box} got no patch")
        return self.total / self.weight
