"""The denoiser's training patches from an in-memory volume: random patches with their gene
windows and sub-bin offsets, drawn from a running stream (``sample_offset_batch``) or keyed by
(seed, step, sample) (``MemoryPatches``, the ``draw(step, indices)`` contract that
``training/store_patches.py`` also keeps, for volumes that do not fit in memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box, Shape, bin_box, patch_bins
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.inputs.synthetic import SyntheticBrain
from tera_pipeline.training.sampling import keyed_rng

PatchBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Patches (B, C, *patch) float32 in [-1, 1], gene windows (B, G, *window), offsets (B, 3)."""


class PatchSource(Protocol):
    """Where a denoiser's training batches come from: samples ``indices`` of step ``step``, and
    ``n`` fixed validation samples held out from them; the panel ``genes`` and the ``volume``."""

    genes: Sequence[str]
    volume: Shape

    def draw(self, step: int, indices: Sequence[int]) -> PatchBatch: ...

    def validation_batch(self, n: int) -> PatchBatch: ...


@dataclass(frozen=True)
class TrainingData:
    """A rendered volume in [-1, 1] (C, Z, Y, X) and its gene bins (G, Zb, Yb, Xb)."""

    image: np.ndarray
    cond: np.ndarray
    genes: tuple[str, ...]
    bin: Shape


def synthetic_training_data(
    seed: int, shape: Shape, spacing_um: tuple[float, float, float], bin_shape: Shape
) -> TrainingData:
    """Render a synthetic brain volume and rasterise its cells (training and validation data)."""
    brain = SyntheticBrain(seed, spacing_um)
    box = Box((0, 0, 0), shape)
    image = from_uint8(brain.render(box))
    bins = bin_box(box, bin_shape)
    cond = rasterize(brain.cells(box), bins, spacing_um, bin_shape)
    return TrainingData(image, cond, brain.genes, tuple(bin_shape))


class _Cutter:
    """Cuts patches and windows out of ``data`` (its gene bins padded by ``context`` once)."""

    def __init__(self, data: TrainingData, patch: Shape, context: Shape, extra: Shape) -> None:
        b = data.bin
        self.data, self.patch, self.context, self.extra = data, patch, context, extra
        self.region = tuple(p + e * n for p, e, n in zip(patch, extra, b, strict=True))
        shape = data.image.shape[1:]
        self.limits = [(s - r) // n for s, r, n in zip(shape, self.region, b, strict=True)]
        if min(self.limits) < 0:
            raise InputError(
                f"training volume {shape} is smaller than a patch and its gene window "
                f"{self.region} voxels"
            )
        self.padded = np.pad(data.cond, [(0, 0)] + [(c, c) for c in context])
        self.frame = Box(tuple(-c for c in context), self.padded.shape[1:])

    def cut(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """One patch, its window and offset: a bin-aligned region at random, its window's bins
        and voxels flipped and rotated in-plane together, the patch cut from the voxels after
        at a random offset within the first bin (where ``extra`` is 1)."""
        b = self.data.bin
        origin = tuple(int(rng.integers(0, m + 1)) * n for m, n in zip(self.limits, b, strict=True))
        box = Box(origin, self.region)
        x = self.data.image[(slice(None), *box.slices())]
        c = self.padded[(slice(None), *patch_bins(box, b, self.context).slices(self.frame))]
        k = int(rng.integers(4))
        x, c = np.rot90(x, k, axes=(2, 3)), np.rot90(c, k, axes=(2, 3))
        if rng.random() < 0.5:
            x, c = x[:, :, :, ::-1], c[:, :, :, ::-1]
        if rng.random() < 0.5:
            x, c = x[:, ::-1], c[:, ::-1]
        offset = tuple(int(rng.integers(n)) if e else 0 for e, n in zip(self.extra, b, strict=True))
        cut = (slice(None), *(slice(o, o + p) for o, p in zip(offset, self.patch, strict=True)))
        return x[cut], c, offset

    def stack(self, samples: list[tuple[np.ndarray, np.ndarray, tuple[int, ...]]]) -> PatchBatch:
        return (
            np.ascontiguousarray(np.stack([s[0] for s in samples])),
            np.ascontiguousarray(np.stack([s[1] for s in samples])),
            np.asarray([s[2] for s in samples], dtype=np.int64).reshape(-1, 3),
        )


def sample_offset_batch(
    data: TrainingData,
    patch: Shape,
    context: Shape,
    extra: Shape,
    batch: int,
    rng: np.random.Generator,
) -> PatchBatch:
    """Random patches with their gene windows and offsets (B, 3) from one running stream: where
    ``extra`` is 1 a patch starts at any voxel of its first bin, and its window is one bin longer
    (a sub-bin-offsets model's input); where 0 it starts on a bin. The window's bins and their
    voxels are cut out whole, flipped and rotated in-plane together, and the patch is cut from
    the voxels after."""
    cutter = _Cutter(data, patch, context, extra)
    return cutter.stack([cutter.cut(rng) for _ in range(batch)])


class MemoryPatches:
    """Keyed patches of an in-memory volume ``data``: sample ``i`` of step ``step`` is cut as
    ``sample_offset_batch`` cuts one, from the stream of (``seed``, step, i) alone; validation
    samples are the first of ``sample_offset_batch`` on ``val`` (default: ``data``) with
    stream 0."""

    def __init__(
        self,
        data: TrainingData,
        patch: Shape,
        context: Shape,
        extra: Shape,
        seed: int,
        val: TrainingData | None = None,
    ) -> None:
        self.cutter, self.seed = _Cutter(data, patch, context, extra), seed
        self.val = (val or data, patch, context, extra)
        self.genes, self.volume = data.genes, tuple(data.image.shape[1:])

    def draw(self, step: int, indices: Sequence[int]) -> PatchBatch:
        return self.cutter.stack([self.cutter.cut(keyed_rng(self.seed, step, i)) for i in indices])

    def validation_batch(self, n: int) -> PatchBatch:
        return sample_offset_batch(*self.val, n, np.random.default_rng(0))
