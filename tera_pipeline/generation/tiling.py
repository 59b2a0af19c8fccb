"""A lattice that tiles a block's span (stride = patch on every axis, the default lattice): its
patches are cut from the state, and their predictions put back, by one reshape each way, on the
device that holds the block. Every voxel lies in exactly one patch: there is nothing to blend."""

from __future__ import annotations

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
    cut by one strided view and one copy where the origins are a regular grid of ``counts``
    starting at 0 (those of a lattice that tiles); None where they are not."""
    grid = origins.reshape(*counts, 3)
    steps = [int(grid[(*(1 if a == ax else 0 for a in range(3)), ax)]) if n > 1 else 1
             for ax, n in enumerate(counts)]  # fmt: skip
    index = np.stack(np.meshgrid(*(np.arange(n) for n in counts), indexing="ij"), axis=-1)
    if min(steps) < 1 or not np.array_equal(grid, index * np.asarray(steps)):
        return None
    view = cond
    for axis, (w, st) in enumerate(zip(shape, steps, strict=True)):
        view = view.unfold(axis + 1, w, st)  # (G, nz', ny', nx', wz, wy, wx)
    nz, ny, nx = counts
    view = view[:, :nz, :ny, :nx].permute(1, 2, 3, 0, 4, 5, 6)
    return view.reshape(nz * ny * nx, cond.shape[0], *shape)
