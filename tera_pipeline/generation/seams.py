"""Seam patches computed once per step and shared between neighbouring blocks.

A lattice patch that straddles a block boundary touches the cores of up to 8 blocks, and each of
them needs its prediction. Each patch has one *owner*: the block whose core holds the patch's
origin. A block computes the patches it owns, the *outgoing* ones (those reaching into another
block's core) first, and publishes their predictions as one file per (step, block) under the
scratch group; it takes the *incoming* patches it needs (owned by a lower neighbour) from the
neighbours' files, and computes only those not published yet. A patch's prediction is bitwise
the same whichever block computes it (one input state per step, fixed batch shape), and blocks
blend in lattice order as before, so outputs do not change; only the redundant compute goes
(1.42x patch evaluations per step at 16x128x128 blocks of a teravoxel: docs/PERFORMANCE.md).

A file holds, per outgoing patch, only the part beyond the owner's core (half a patch across a
face), as float32. Files are written whole and renamed into place, so a reader sees a complete
file or none; a block removes its own file of the previous step when it publishes the next, and
the scratch group goes at the end of the job.

On a wrapped lattice a patch is known by its canonical box (``PatchLattice.canonical``): the
block at the low face owns the patch across it and publishes its part below 0 for the block at
the far face, which sees the same patch as an image; a block holding two images of one patch
(one block across a wrapped axis) computes it once (``aliases``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tera_pipeline.core.geometry import BlockGrid, Box

SEAMS = "_scratch/seams"

Index = tuple[int, ...]


@dataclass(frozen=True)
class SeamPlan:
    """Positions (into the block's lattice-ordered patch list) by where their prediction comes
    from: computed and published, computed only, or taken from the owner's file."""

    outgoing: list[int]
    interior: list[int]
    incoming: dict[Index, list[int]]
    aliases: dict[int, int] = field(default_factory=dict)
    """Position of a second image of a patch -> position of its first (computed or fetched)."""


def owner(grid: BlockGrid, patch: Box) -> Index:
    """The block whose core holds the (canonical) patch's origin, clipped to the volume: a
    shifted lattice's first patch starts below 0."""
    return _holder(grid.lattice.canonical(patch, grid.volume).begin, grid.block_shape)


def _holder(begin: tuple[int, ...], block: tuple[int, ...]) -> Index:
    return tuple(max(b, 0) // s for b, s in zip(begin, block, strict=True))


def _crossed(grid: BlockGrid, patch: Box, core: Box) -> list[int]:
    """The axes on which a canonical ``patch`` owned by ``core``'s block reaches another block's
    core: beyond the core's far face inside the volume, or below 0 on a wrapped axis with more
    than one block (into the far block, through the torus)."""
    wrap, blocks, volume = grid.lattice.wrap_axes(grid.volume), grid.shape, grid.volume
    pe, ce, pb = patch.end, core.end, patch.begin
    return [
        a
        for a in range(patch.ndim)
        if (pe[a] > ce[a] and ce[a] < volume[a]) or (wrap[a] and pb[a] < 0 and blocks[a] > 1)
    ]


@lru_cache(maxsize=256)
def outgoing(grid: BlockGrid, index: Index) -> tuple[Box, ...]:
    """The (canonical) patches ``index`` owns that reach into another block's core, once each,
    in lattice order."""
    core, seen = grid.block(index).core, set()
    result = []
    for p in grid.lattice.patches_touching(core, grid.volume):
        p = grid.lattice.canonical(p, grid.volume)
        if (
            p.begin not in seen
            and _holder(p.begin, grid.block_shape) == index
            and _crossed(grid, p, core)
        ):
            result.append(p)
        seen.add(p.begin)
    return tuple(result)


def beyond(grid: BlockGrid, patch: Box, core: Box) -> Box:
    """The part of an outgoing ``patch`` any other block can need: the half beyond the face it
    crosses (below 0 for a face crossed through the torus), or the whole patch when it crosses
    an edge or a corner (a box bounding the L)."""
    axes = _crossed(grid, patch, core)
    if len(axes) != 1:
        return patch
    a = axes[0]
    begin, end = list(patch.begin), list(patch.end)
    if patch.end[a] > core.end[a] and core.end[a] < grid.volume[a]:
        begin[a] = core.end[a]
    else:
        end[a] = 0
    return Box.from_bounds(begin, end)


@lru_cache(maxsize=256)
def layout(grid: BlockGrid, index: Index) -> tuple[dict[tuple[int, ...], tuple[int, Box]], int]:
    """Where each outgoing patch's part sits in the block's seam file: patch origin -> (offset in
    voxels, part), and the voxels in all; the same for writer and readers, from geometry."""
    core = grid.block(index).core
    rows, offset = {}, 0
    for p in outgoing(grid, index):
        part = beyond(grid, p, core)
        rows[p.begin] = (offset, part)
        offset += part.size
    return rows, offset


def plan(grid: BlockGrid, index: Index, patches: list[Box], share: bool = True) -> SeamPlan:
    """Where each of ``patches`` (the block's patches, lattice order) comes from; without
    ``share``, every one is computed here (a second image of a patch only once)."""
    out = {p.begin for p in outgoing(grid, index)} if share else set()
    result, first = SeamPlan([], [], {}), {}
    for i, p in enumerate(patches):
        canonical = grid.lattice.canonical(p, grid.volume).begin
        who = _holder(canonical, grid.block_shape) if share else index
        if canonical in first:
            result.aliases[i] = first[canonical]
            continue
        first[canonical] = i
        if who != index:
            result.incoming.setdefault(who, []).append(i)
        elif canonical in out:
            result.outgoing.append(i)
        else:
            result.interior.append(i)
    return result


def path(root: Path, step: int, index: Index) -> Path:
    return Path(root) / SEAMS / str(step) / str(index[0]) / f"{'.'.join(map(str, index[1:]))}.npy"


def publish(root: Path, grid: BlockGrid, step: int, index: Index, predictions: np.ndarray) -> int:
    """Write the part others need of each of the block's outgoing predictions (``predictions``
    in ``outgoing`` order, float32) for ``step`` and remove its file of the step before; returns
    the bytes written."""
    rows, _ = layout(grid, index)
    parts = [
        e[(slice(None), *rows[p.begin][1].slices(p))].ravel()
        for p, e in zip(outgoing(grid, index), predictions, strict=True)
    ]
    target = path(root, step, index)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}")
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate(parts).astype(np.float32, copy=False))
    os.replace(tmp, target)
    if step > 0:
        path(root, step - 1, index).unlink(missing_ok=True)
    return target.stat().st_size


def fetch(
    root: Path, grid: BlockGrid, step: int, patches: list[Box], plan: SeamPlan, out: np.ndarray
) -> list[int]:
    """Fill ``out[i]`` (N, C, *patch) for every incoming patch whose owner has published; return
    the positions still to compute (owner not done yet, or no readable file). Only the part of a
    filled patch beyond its owner's core is set: all this block's core can overlap."""
    channels = out.shape[1]
    missing: list[int] = []
    for who, positions in plan.incoming.items():
        rows, voxels = layout(grid, who)
        try:
            data = np.load(path(root, step, who), mmap_mode="r")
            if data.shape != (channels * voxels,) or data.dtype != np.float32:
                raise ValueError(f"seam file of block {who}: {data.shape} {data.dtype}")
            for i in positions:
                canonical = grid.lattice.canonical(patches[i], grid.volume)
                offset, part = rows[canonical.begin]
                values = data[channels * offset : channels * (offset + part.size)]
                out[i][(slice(None), *part.slices(canonical))] = values.reshape(
                    channels, *part.shape
                )
        except (OSError, ValueError):  # not published (yet), or unreadable: compute them
            missing.extend(positions)
    return sorted(missing)
