"""Cells on the voxel grid: centroid voxels, crops around them, niches, nucleus measurement.

A cell's voxel is floor(position / spacing), as for the conditioning bins. Its crop is the box
of ``crop`` voxels (z, y, x) with the centroid voxel at index ``crop // 2``. Crops reaching past
the volume read the fixed fill 0 there (as the engine does) and each cell records the fraction
of its crop inside the volume; a centroid outside the volume, or a crop larger than the volume,
is a ``CropError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.geometry import Box, Shape


class CropError(TeraError, ValueError):
    """Crops that cannot be taken: a cell outside the volume, or a crop bigger than it."""


def cell_voxels(position_um: np.ndarray, spacing_um: Sequence[float]) -> np.ndarray:
    """Voxel (z, y, x) of each centroid, (N, 3) int64."""
    return np.floor(np.asarray(position_um) / np.asarray(spacing_um, np.float64)).astype(np.int64)


def crop_halo(crop: Shape) -> tuple[Shape, Shape]:
    """Voxels a crop reaches (below, above) its centroid voxel."""
    below = tuple(c // 2 for c in crop)
    return below, tuple(c - b - 1 for c, b in zip(crop, below, strict=True))


def check_crop(crop: Shape, volume: Shape) -> None:
    """A crop must fit in the volume (the fill covers a cell's overhang, not a whole crop)."""
    if any(c > v for c, v in zip(crop, volume, strict=True)):
        raise CropError(
            f"crop {tuple(crop)} voxels (z, y, x) is larger than the volume {tuple(volume)}: "
            "use a model trained with a smaller crop, or a bigger volume"
        )


def check_inside(voxels: np.ndarray, volume: Shape, ids: np.ndarray | None = None) -> None:
    """Every centroid voxel must lie inside the volume."""
    outside = ~np.all((voxels >= 0) & (voxels < np.asarray(volume)), axis=1)
    if outside.any():
        first = int(np.argmax(outside))
        name = f"cell {ids[first]}" if ids is not None else f"row {first}"
        raise CropError(
            f"{int(outside.sum())} cells have centroids outside the volume {tuple(volume)} "
            f"(first: {name} at voxel {voxels[first].tolist()}); their crops would be fill only"
        )


def extract_crops(image: np.ndarray, frame: Box, voxels: np.ndarray, crop: Shape) -> np.ndarray:
    """Crops (N, C * crop_z, crop_y, crop_x) of ``image`` (C, *frame.shape), which must cover
    every crop box (read it with the halo of ``crop_halo``)."""
    below, _ = crop_halo(crop)
    c = image.shape[0]
    out = np.empty((len(voxels), c, *crop), dtype=image.dtype)
    for i, v in enumerate(voxels):
        box = Box(tuple(int(a - b) for a, b in zip(v, below, strict=True)), crop)
        if not frame.contains(box):
            raise CropError(f"crop {box} is not inside the read box {frame}")
        out[i] = image[(slice(None), *box.slices(frame))]
    return out.reshape(len(voxels), c * crop[0], crop[1], crop[2])


def inside_fraction(voxels: np.ndarray, crop: Shape, volume: Shape) -> np.ndarray:
    """Fraction of each cell's crop inside the volume (1 for cells away from the edges)."""
    below, _ = crop_halo(crop)
    lo = voxels - np.asarray(below)
    hi = lo + np.asarray(crop)
    inside = np.clip(np.minimum(hi, volume) - np.maximum(lo, 0), 0, None)
    return np.prod(inside / np.asarray(crop), axis=1)


def niche_positions(voxels: np.ndarray, niche: Shape):
    """(niche index (N, 3), position in the niche in [-1, 1] (N, 3)) of centroid voxels on the
    global niche grid (niche boxes of ``niche`` voxels starting at 0)."""
    index = np.floor_divide(voxels, np.asarray(niche))
    return index, centred(voxels + 0.5, index, niche)


def centred(points: np.ndarray, index: np.ndarray, size: Shape) -> np.ndarray:
    """Points (in grid units) relative to the centre of their grid cell, scaled to [-1, 1]."""
    size = np.asarray(size, dtype=np.float64)
    return ((points - (index + 0.5) * size) / (size / 2)).astype(np.float32)


def nucleus_area(dapi: np.ndarray, threshold: float | None = None) -> float:
    """Pixels of the nucleus at the centre of a 2-D DAPI crop (uint8): pixels above Otsu's
    threshold (or ``threshold``) within the radius where the median of the 1-px rings around
    the centre first falls to the threshold, so touching neighbours are not counted."""
    t = otsu_threshold(dapi) if threshold is None else threshold
    h, w = dapi.shape
    dist = np.hypot(*np.mgrid[:h, :w] - np.array([h // 2, w // 2])[:, None, None])
    ring = np.rint(dist).astype(int)
    median = ndimage.median(dapi, labels=ring, index=np.arange(min(h, w) // 2 + 1))
    below = np.flatnonzero(np.asarray(median) <= t)
    extent = below[0] if len(below) else min(h, w) // 2
    return float(((dapi > t) & (dist <= extent + 0.5)).sum())


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values."""
    return histogram_otsu(np.bincount(values.ravel(), minlength=256))


def histogram_otsu(hist: np.ndarray) -> float:
    """Otsu's threshold of a 256-bin histogram of uint8 values (foreground: value > it)."""
    hist = np.asarray(hist, dtype=np.float64)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))
