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

import io
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
    return tuple(_holders(grid, _canonical(grid, _origins([patch])))[0].tolist())


def _origins(patches: list[Box]) -> np.ndarray:
    return np.asarray([p.begin for p in patches], dtype=np.int64).reshape(-1, 3)


def _canonical(grid: BlockGrid, origins: np.ndarray) -> np.ndarray:
    """``PatchLattice.canonical`` of the patches at ``origins`` (N, 3), all at once."""
    lattice = grid.lattice
    if not lattice.wrapped:
        return origins
    volume = np.asarray(grid.volume)
    wrap = np.asarray(lattice.wrap_axes(grid.volume))
    return origins - volume * (wrap & (origins + np.asarray(lattice.patch) > volume))


def _holders(grid: BlockGrid, canonical: np.ndarray) -> np.ndarray:
    """The block whose core holds each canonical origin (N, 3), clipped below at 0."""
    return np.maximum(canonical, 0) // np.asarray(grid.block_shape)


def _crossing(grid: BlockGrid, canonical: np.ndarray, core: Box) -> np.ndarray:
    """Whether each canonical patch (origins N x 3) owned by ``core``'s block reaches another
    block's core, per axis: beyond the core's far face inside the volume, or below 0 on a
    wrapped axis with more than one block (into the far block, through the torus)."""
    volume, end = np.asarray(grid.volume), np.asarray(core.end)
    wrap = np.asarray(grid.lattice.wrap_axes(grid.volume))
    far = (canonical + np.asarray(grid.lattice.patch) > end) & (end < volume)
    return far | (wrap & (canonical < 0) & (np.asarray(grid.shape) > 1))


def _first_rows(rows: np.ndarray) -> np.ndarray:
    """Whether each row is the first of its value."""
    seen: dict[tuple[int, ...], int] = {}
    for i, row in enumerate(rows.tolist()):
        seen.setdefault(tuple(row), i)
    first = np.zeros(len(rows), dtype=bool)
    first[list(seen.values())] = True
    return first


@lru_cache(maxsize=256)
def outgoing(grid: BlockGrid, index: Index) -> tuple[Box, ...]:
    """The (canonical) patches ``index`` owns that reach into another block's core, once each,
    in lattice order."""
    core = grid.block(index).core
    canonical = _canonical(grid, _origins(grid.lattice.patches_touching(core, grid.volume)))
    owned = (_holders(grid, canonical) == np.asarray(index)).all(axis=1)
    keep = _first_rows(canonical) & owned & _crossing(grid, canonical, core).any(axis=1)
    patch = tuple(grid.lattice.patch)
    return tuple(Box.of_ints(tuple(int(v) for v in c), patch) for c in canonical[keep])


def _parts(grid: BlockGrid, patches: np.ndarray, core: Box) -> tuple[np.ndarray, np.ndarray]:
    """(begins, ends) of the part of each outgoing patch (canonical origins, N x 3) any other
    block can need: the half beyond the face it crosses (below 0 for a face crossed through the
    torus), or the whole patch when it crosses an edge or a corner (a box bounding the L)."""
    crossing = _crossing(grid, patches, core)
    ends = patches + np.asarray(grid.lattice.patch)
    core_end, volume = np.asarray(core.end), np.asarray(grid.volume)
    one = crossing & (crossing.sum(axis=1) == 1)[:, None]  # the one face crossed
    far = one & (ends > core_end) & (core_end < volume)
    return np.where(far, core_end, patches), np.where(one & ~far, 0, ends)


@lru_cache(maxsize=256)
def layout(grid: BlockGrid, index: Index) -> tuple[dict[tuple[int, ...], tuple[int, Box]], int]:
    """Where each outgoing patch's part sits in the block's seam file: patch origin -> (offset in
    voxels, part), and the voxels in all; the same for writer and readers, from geometry."""
    patches = outgoing(grid, index)
    if not patches:
        return {}, 0
    begins, ends = _parts(grid, _origins(list(patches)), grid.block(index).core)
    sizes = np.prod(ends - begins, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    rows = {
        p.begin: (o, Box.of_ints(tuple(b), tuple(x - y for x, y in zip(e, b, strict=True))))
        for p, o, b, e in zip(patches, offsets, begins.tolist(), ends.tolist(), strict=True)
    }
    return rows, int(sizes.sum())


def plan(grid: BlockGrid, index: Index, patches: list[Box], share: bool = True) -> SeamPlan:
    """Where each of ``patches`` (the block's patches, lattice order) comes from; without
    ``share``, every one is computed here (a second image of a patch only once)."""
    index = tuple(int(i) for i in index)
    canonical = _canonical(grid, _origins(patches))
    keys = [tuple(c) for c in canonical.tolist()]
    owners = [tuple(h) for h in _holders(grid, canonical).tolist()] if share else None
    out = {p.begin for p in outgoing(grid, index)} if share else set()
    result, first = SeamPlan([], [], {}), {}
    for i, key in enumerate(keys):
        if key in first:
            result.aliases[i] = first[key]
            continue
        first[key] = i
        who = owners[i] if owners is not None else index
        if who != index:
            result.incoming.setdefault(who, []).append(i)
        elif key in out:
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
    values = np.concatenate(parts).astype(np.float32, copy=False)
    with open(tmp, "wb") as f:  # an .npy file (``np.load`` reads it), its header ``_header``'s
        f.write(_header(values.size))
        values.tofile(f)
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
    channels, patch = out.shape[1], tuple(grid.lattice.patch)
    missing: list[int] = []
    for who, positions in plan.incoming.items():
        rows, voxels = layout(grid, who)
        canonical = _canonical(grid, _origins([patches[i] for i in positions])).tolist()
        try:
            with open(path(root, step, who), "rb") as f:
                start = _data_offset(f.fileno(), channels * voxels)
                for i, origin in zip(positions, canonical, strict=True):
                    offset, part = rows[tuple(origin)]
                    at = start + 4 * channels * offset
                    values = _pread_floats(f.fileno(), channels * part.size, at)
                    within = (slice(None), *part.slices(Box.of_ints(tuple(origin), patch)))
                    out[i][within] = values.reshape(channels, *part.shape)
        except (OSError, ValueError):  # not published (yet), or unreadable: compute them
            missing.extend(positions)
    return sorted(missing)


@lru_cache(maxsize=64)
def _header(floats: int) -> bytes:
    """The .npy header (version 1.0) of ``floats`` float32 values: what ``publish`` writes
    before them and ``fetch`` checks."""
    with io.BytesIO() as f:
        descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
        meta = {"descr": descr, "fortran_order": False, "shape": (floats,)}
        np.lib.format.write_array_header_1_0(f, meta)
        return f.getvalue()


def _data_offset(fd: int, floats: int) -> int:
    """Where the values of a seam file of ``floats`` float32 values start, after checking its
    header and length (a partial or foreign file raises ``ValueError``)."""
    header = _header(floats)
    if os.pread(fd, len(header), 0) != header or os.fstat(fd).st_size != len(header) + 4 * floats:
        raise ValueError("not a complete seam file of this block")
    return len(header)


def _pread_floats(fd: int, count: int, at: int) -> np.ndarray:
    data = os.pread(fd, 4 * count, at)
    if len(data) != 4 * count:
        raise ValueError("short seam file")
    return np.frombuffer(data, dtype=np.float32)
