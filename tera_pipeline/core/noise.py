"""Noise as a pure function of (seed, stream, global position): any block, on any worker, in
any order, draws the same numbers for the same voxels."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tera_pipeline.core.geometry import Box, Shape

NOISE_TILE: Shape = (8, 64, 64)
"""Fixed tile of the counter-based noise field; independent of block and patch sizes."""


def position_noise(seed: int, stream: int, box: Box, channels: int) -> np.ndarray:
    """Standard normal noise for ``box`` (spatial z, y, x) as a pure function of position.

    The field is drawn tile by tile (``NOISE_TILE``) from Philox keyed by (seed, stream, tile
    index), so any box anywhere — even beyond the volume — regenerates the same values.
    ``stream`` separates the initial noise (0) from per-step DDIM noise (step + 1).
    Returns float32 of shape ``(channels, *box.shape)``.
    """
    out = np.empty((channels, *box.shape), dtype=np.float32)
    first = [b // t for b, t in zip(box.begin, NOISE_TILE, strict=True)]
    last = [(e - 1) // t for e, t in zip(box.end, NOISE_TILE, strict=True)]
    for tz in range(first[0], last[0] + 1):
        for ty in range(first[1], last[1] + 1):
            for tx in range(first[2], last[2] + 1):
                tile = Box((tz * NOISE_TILE[0], ty * NOISE_TILE[1], tx * NOISE_TILE[2]), NOISE_TILE)
                # Negative tile indices (reads beyond the low edge) are shifted into the key.
                key = [seed, stream, tz + 2**31, ty + 2**31, tx + 2**31]
                rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))
                values = rng.standard_normal((channels, *NOISE_TILE), dtype=np.float32)
                part = tile.intersect(box)
                out[(slice(None), *part.slices(box))] = values[(slice(None), *part.slices(tile))]
    return out


LATTICE_STREAM = 0x5_1F7
"""Key of the lattice shifts, apart from every noise stream."""


@lru_cache(maxsize=1024)
def lattice_shift(seed: int, step: int, patch: Shape, unit: Shape) -> Shape:
    """The offset of step ``step``'s shifted lattice, a pure function of (seed, step): per axis a
    multiple of ``unit`` (a gene bin, so patches keep whole bins) below ``patch``. The offset of
    step 0 is drawn, and each later step moves it by a drawn nonzero amount, so every seam of a
    step moves at the next (with two positions on an axis, they alternate)."""
    offsets = []
    for axis, (p, u) in enumerate(zip(patch, unit, strict=True)):
        n = p // u  # positions on this axis
        position = int(_draw(seed, 0, axis, n))
        for k in range(1, step + 1):
            position = (position + 1 + int(_draw(seed, k, axis, max(n - 1, 1)))) % n
        offsets.append(u * position if n > 1 else 0)
    return tuple(offsets)


def _draw(seed: int, step: int, axis: int, n: int) -> int:
    key = np.random.SeedSequence([seed, LATTICE_STREAM, step, axis])
    return int(np.random.Generator(np.random.Philox(key)).integers(0, n))
