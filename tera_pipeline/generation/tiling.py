"""A lattice that tiles a block's span (stride = patch on every axis, the default lattice): its
patches are cut from the state, and their predictions put back, by one reshape each way, on the
device that holds the block. Every voxel lies in exactly one patch: there is nothing to blend."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from tera_pipeline.core.geometry import PatchLattice, Shape


def tiles(lattice: PatchLattice) -> bool:
    """Whether the lattice's patches tile space (stride = patch on every axis)."""
    return lattice.stride == lattice.patch


def cut(span: torch.Tensor, patch: Shape) -> torch.Tensor:
    """(C, *span) -> (N, C, *patch): the patches tiling ``span``, in lattice (C) order."""
    c, (pz, py, px) = span.shape[0], patch
    nz, ny, nx = (s // p for s, p in zip(span.shape[1:], patch, strict=True))
    if (nz * pz, ny * py, nx * px) != tuple(span.shape[1:]):
        raise ValueError(f"a span of {tuple(span.shape[1:])} is not whole patches {patch}")
    grid = span.reshape(c, nz, pz, ny, py, nx, px).permute(1, 3, 5, 0, 2, 4, 6)
    return grid.reshape(nz * ny * nx, c, pz, py, px)


def join(patches: torch.Tensor, counts: Shape) -> torch.Tensor:
    """(N, C, *patch) in lattice order, ``counts`` patches per axis -> (C, *span): ``cut``'s
    inverse."""
    n, c, pz, py, px = patches.shape
    nz, ny, nx = counts
    if nz * ny * nx != n:
        raise ValueError(f"{n} patches do not tile {counts}")
    grid = patches.reshape(nz, ny, nx, c, pz, py, px).permute(3, 0, 4, 1, 5, 2, 6)
    return grid.reshape(c, nz * pz, ny * py, nx * px)


def windows(
    cond: torch.Tensor, origins: np.ndarray, counts: Shape, shape: Shape
) -> torch.Tensor | None:
    """(G, *bins) -> (N, G, *shape): the gene windows at ``origins`` (N, 3), in lattice order,
    gathered at once where the origins are a regular grid of ``counts`` starting at 0 (those of
    a lattice that tiles); None where they are not."""
    grid = origins.reshape(*counts, 3)
    steps = [int(grid[(*(1 if a == ax else 0 for a in range(3)), ax)]) if n > 1 else 1
             for ax, n in enumerate(counts)]  # fmt: skip
    index = np.stack(np.meshgrid(*(np.arange(n) for n in counts), indexing="ij"), axis=-1)
    if min(steps) < 1 or not np.array_equal(grid, index * np.asarray(steps)):
        return None
    genes, n = cond.shape[0], math.prod(counts)
    at = _window_voxels(tuple(cond.shape[1:]), tuple(counts), tuple(steps), tuple(shape),
                        cond.device)  # fmt: skip
    picked = cond.reshape(genes, -1).index_select(1, at)  # (G, N * window)
    return picked.reshape(genes, n, *shape).transpose(0, 1).contiguous()


@lru_cache(maxsize=64)
def _window_voxels(
    bins: Shape, counts: Shape, steps: Shape, shape: Shape, device: torch.device
) -> torch.Tensor:
    """Flat positions in a (Z, Y, X) raster of every voxel of the windows of ``shape`` on the
    regular grid of ``counts`` origins ``steps`` apart, window by window (one gather, several
    times faster than copying a strided view whose rows are a few voxels long), kept on
    ``device`` so a GPU block does not copy them over again."""
    strides = np.asarray([bins[1] * bins[2], bins[2], 1])
    origins = np.stack(
        np.meshgrid(*(np.arange(n) * s for n, s in zip(counts, steps, strict=True)), indexing="ij"),
        axis=-1,
    ).reshape(-1, 3)
    inside = np.stack(np.meshgrid(*(np.arange(w) for w in shape), indexing="ij"), axis=-1)
    flat = origins @ strides
    at = (flat[:, None] + (inside.reshape(-1, 3) @ strides)[None, :]).ravel()
    return torch.from_numpy(at).to(device)
