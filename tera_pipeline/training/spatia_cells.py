"""SPATIA's training cells: cells with their crops, counts and positions, from the synthetic
brain (with known types) or a user's image volume and cell table; their split into training and
validation cells, the sets of them that SPATIA's context stage trains on, and the augmentations
of a training batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tera_pipeline.analysis.cells import cell_voxels, crop_halo, extract_crops
from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.inputs.synthetic import CELL_TYPES, SyntheticBrain
from tera_pipeline.training.user_data import UserData


@dataclass(frozen=True)
class CellSet:
    """Cells with their crops (uint8, (N, C * crop_z, Y, X)), counts and centroid voxels."""

    crops: np.ndarray
    counts: np.ndarray
    voxels: np.ndarray
    genes: tuple[str, ...]
    spacing_um: tuple[float, float, float]
    volume: Shape
    types: np.ndarray | None = None
    type_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.counts)

    def subset(self, index: np.ndarray) -> CellSet:
        types = None if self.types is None else self.types[index]
        return replace(
            self,
            crops=self.crops[index],
            counts=self.counts[index],
            voxels=self.voxels[index],
            types=types,
        )


def crops_of_volume(image: np.ndarray, voxels: np.ndarray, crop: Shape) -> np.ndarray:
    """Crops of cells in a whole volume (C, Z, Y, X), with the fill 0 beyond its edges."""
    below, above = crop_halo(crop)
    padded = np.pad(image, [(0, 0)] + [(b, a) for b, a in zip(below, above, strict=True)])
    frame = Box(tuple(-b for b in below), padded.shape[1:])
    return extract_crops(padded, frame, voxels, crop)


def synthetic_cells(
    seed: int,
    shape: Shape,
    crop: Shape,
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0),
) -> CellSet:
    """Render a synthetic brain box and crop every cell whose centroid lies in it."""
    brain = SyntheticBrain(seed, spacing_um)
    box = Box((0, 0, 0), shape)
    cells = brain.cells(box)
    voxels = cell_voxels(cells.position_um, spacing_um)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
    cells, voxels = cells.select(inside), voxels[inside]
    crops = crops_of_volume(brain.render(box), voxels, crop)
    return CellSet(
        crops,
        cells.counts.astype(np.float32),
        voxels,
        brain.genes,
        tuple(spacing_um),
        tuple(shape),
        cells.cell_type,
        tuple(t.name for t in CELL_TYPES),
    )


def user_cells(data: UserData, crop: Shape, type_key: str | None = "cell_type") -> CellSet:
    """A user's images and cell table (.h5ad / cell .csv) as cells with crops; cell types from
    ``obs[type_key]`` or a ``type_key`` column if present."""
    image, table = data.load()
    voxels = cell_voxels(table.position_um, data.spacing_um)
    labels = _user_labels(Path(data.cells), type_key, len(table))
    types, names = (None, ())
    if labels is not None:
        names_arr, types = np.unique(labels, return_inverse=True)
        names = tuple(str(n) for n in names_arr)
    return CellSet(
        crops_of_volume(image, voxels, crop),
        table.counts.astype(np.float32),
        voxels,
        table.genes,
        tuple(data.spacing_um),
        tuple(image.shape[1:]),
        types,
        names,
    )


def _user_labels(path: Path, key: str | None, n: int) -> np.ndarray | None:
    """The ``key`` labels of the ``n`` cells of a cell table, if it has them for every cell."""
    if not key:
        return None
    if path.suffix.lower() == ".h5ad":
        import anndata

        obs = anndata.read_h5ad(path, backed="r").obs
        values = obs[key].astype(str).to_numpy() if key in obs else None
    elif path.suffix.lower() == ".csv":
        import pandas as pd

        header = pd.read_csv(path, nrows=0).columns
        values = (
            pd.read_csv(path, usecols=[key])[key].astype(str).to_numpy() if key in header else None
        )
    else:
        values = None
    return values if values is not None and len(values) == n else None


def split_cells(cells: CellSet, seed: int) -> tuple[CellSet, CellSet]:
    """(train, validation): a random tenth of the cells (at least one, drawn by ``seed``) held
    out for validation."""
    order = np.random.default_rng(seed).permutation(len(cells))
    held_out = max(1, len(cells) // 10)
    return cells.subset(order[held_out:]), cells.subset(order[:held_out])


# -- sets of cells (niches) and of niches (tissue tiles) ------------------------------------------
def random_windows(
    points: np.ndarray, extent: np.ndarray, size: np.ndarray, k: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Members of ``k`` random windows of ``size`` inside ``extent``: (indices, positions in the
    window in [-1, 1]) each."""
    sets = []
    for _ in range(k):
        lo = rng.uniform(0, np.maximum(extent - size, 0))
        rel = (points - lo) / size
        inside = np.flatnonzero(np.all((rel >= 0) & (rel < 1), axis=1))
        sets.append((inside, (rel[inside] * 2 - 1).astype(np.float32)))
    return sets


def pad_sets(
    sets: list[tuple[np.ndarray, np.ndarray]], features: np.ndarray, max_members: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Stack variable-size sets (member indices, positions) into padded features (B, N, E),
    positions (B, N, 3) and valid (B, N), with each set's members (at most ``max_members``)."""
    n = max(1, min(max_members, max(len(i) for i, _ in sets)))
    x = np.zeros((len(sets), n, features.shape[1]), np.float32)
    pos = np.zeros((len(sets), n, 3), np.float32)
    valid = np.zeros((len(sets), n), bool)
    members = []
    for b, (idx, p) in enumerate(sets):
        idx, p = idx[:n], p[:n]
        x[b, : len(idx)], pos[b, : len(idx)], valid[b, : len(idx)] = features[idx], p, True
        members.append(idx)
    return torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(valid), members


class SetBatch(NamedTuple):
    """Padded sets: member features (B, N, E), positions (B, N, 3), valid (B, N), each set's
    member indices, and the expression values to predict of every member (by index)."""

    x: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    members: list[np.ndarray]
    targets: np.ndarray


# -- augmentation ---------------------------------------------------------------------------------
def thin(counts: np.ndarray, rng: np.random.Generator, low: float = 0.02) -> np.ndarray:
    """Binomial thinning to a random capture rate per cell (log-uniform in [low, 1]; half of
    the cells keep their full depth): SPATIA sees shallow and deep cells alike, and learns to
    reconstruct the full counts from the thinned ones."""
    rate = np.exp(rng.uniform(np.log(low), 0.0, size=(len(counts), 1)))
    rate[rng.random(len(counts)) < 0.5] = 1.0
    return rng.binomial(counts.astype(np.int64), rate).astype(np.float32)


def flip_rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random in-plane rotation by 90° steps and flip of crops (N, C, Y, X)."""
    x = np.rot90(x, int(rng.integers(4)), axes=(2, 3))
    if rng.random() < 0.5:
        x = x[..., ::-1]
    return np.ascontiguousarray(x)
