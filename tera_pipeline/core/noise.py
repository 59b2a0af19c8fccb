"""Noise as a pure function of (seed, stream, global position): any block, on any worker, in
any order, draws the same numbers for the same voxels.

``position_noise`` (sampling) hashes each voxel's global position with the key of (seed,
stream, channel) and draws exactly the voxels asked for; ``tiled_position_noise`` (the synthetic
brain's render, kept as the committed checkpoints were trained on it) draws whole Philox tiles.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tera_pipeline.core.geometry import Box, Shape

NOISE_TILE: Shape = (8, 64, 64)
"""Fixed tile of the counter-based noise field; independent of block and patch sizes."""


_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_AXIS_BITS = 21
"""Bits per axis of a position's counter: positions from -2^20 to 2^20 - 1 on each axis."""


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective 64-bit hash whose every output bit depends on every
    input bit (arrays of uint64, wrapping arithmetic)."""
    out = np.array(z, dtype=np.uint64)
    _mix_in_place(out, np.empty_like(out))
    return out


def _mix_in_place(z: np.ndarray, scratch: np.ndarray) -> None:
    """``_mix`` of ``z`` written into ``z`` (``scratch``: an array of its shape)."""
    for shift, factor in ((30, _MIX[0]), (27, _MIX[1]), (31, None)):
        np.right_shift(z, np.uint64(shift), out=scratch)
        np.bitwise_xor(z, scratch, out=z)
        if factor is not None:
            np.multiply(z, factor, out=z)


def _key(*values: int) -> np.ndarray:
    """A 64-bit key of an ordered tuple of non-negative integers (a chain of hashes)."""
    key = np.zeros(1, dtype=np.uint64)
    for v in values:
        key = _mix((key + np.asarray([v], dtype=np.uint64)) * _GOLDEN)
    return key


SLAB_VOXELS = 1 << 15
"""Voxels drawn at once by ``position_noise`` (z-slabs of a box): its four work arrays, 768
KiB, stay in a core's L2 cache through the dozen passes over them (a 16 x 128 x 128 block's
noise in one process: 5.7-8.0 ms at once, 2.7-4.2 ms in slabs)."""


def position_noise(seed: int, stream: int, box: Box, channels: int) -> np.ndarray:
    """Standard normal noise for ``box`` (spatial z, y, x) as a pure function of position.

    Each voxel's counter (its global z, y, x, 21 bits each) is hashed with the key of (seed,
    stream, channel) by SplitMix64's finaliser; the hash's two 24-bit halves are two uniforms, and
    Box-Muller makes them one standard normal (tails to 5.8 sigma). Only the voxels of ``box`` are
    drawn, anywhere in space (beyond the volume too), and the same ones always give the same
    numbers. ``stream`` separates the initial noise (0) from per-step noise (step + 1).
    Returns float32 of shape ``(channels, *box.shape)``.
    """
    half = 1 << (_AXIS_BITS - 1)
    if any(b < -half or e > half for b, e in zip(box.begin, box.end, strict=True)):
        raise ValueError(f"noise positions are within +-{half} voxels per axis, not {box}")
    # counter x golden ratio as a sum: the axes' bits do not overlap (| is +) and products
    # distribute in wrapping arithmetic, so each axis is multiplied once and a channel's hash
    # input is one broadcast add; every step below writes in place (the same bits as out of
    # place, without a fresh array per operation)
    axes = [
        (np.arange(b + half, b + half + n, dtype=np.int64).astype(np.uint64)
         << np.uint64(_AXIS_BITS * (2 - axis))) * _GOLDEN
        for axis, (b, n) in enumerate(zip(box.begin, box.shape, strict=True))
    ]  # fmt: skip
    out = np.empty((channels, *box.shape), dtype=np.float32)
    depth = max(1, SLAB_VOXELS // max(1, box.shape[1] * box.shape[2]))
    slab = (min(depth, box.shape[0]), *box.shape[1:])
    h, bits = np.empty(slab, dtype=np.uint64), np.empty(slab, dtype=np.uint64)
    u1, u2 = np.empty(slab, dtype=np.float32), np.empty(slab, dtype=np.float32)
    for c in range(channels):
        plane = axes[1][:, None] + axes[2][None, :] + _key(seed, stream, c)
        for z in range(0, box.shape[0], depth):
            n = min(depth, box.shape[0] - z)
            _box_muller(axes[0][z : z + n], plane, out[c, z : z + n], h[:n], bits[:n], u1[:n],
                        u2[:n])  # fmt: skip
    return out


def _box_muller(
    zs: np.ndarray,
    plane: np.ndarray,
    out: np.ndarray,
    h: np.ndarray,
    bits: np.ndarray,
    u1: np.ndarray,
    u2: np.ndarray,
) -> None:
    """The noise of the positions ``zs`` (z terms) x ``plane`` (y, x terms and key) into
    ``out``: the hash's two 24-bit halves as uniforms, Box-Muller to one standard normal."""
    scale = np.float32(2.0**-24)
    np.add(zs[:, None, None], plane[None], out=h)
    _mix_in_place(h, bits)
    np.right_shift(h, np.uint64(40), out=bits)
    u1[...] = bits
    np.add(u1, np.float32(0.5), out=u1)
    np.multiply(u1, scale, out=u1)  # (0, 1)
    np.bitwise_and(h, np.uint64(0xFFFFFF), out=bits)
    u2[...] = bits
    np.multiply(u2, scale, out=u2)
    np.log(u1, out=u1)  # Box-Muller: sqrt(-2 log u1) cos(2 pi u2)
    np.multiply(np.float32(-2.0), u1, out=u1)
    np.sqrt(u1, out=u1)
    np.multiply(np.float32(2 * np.pi), u2, out=u2)
    np.cos(u2, out=u2)
    np.multiply(u1, u2, out=out)


def tiled_position_noise(seed: int, stream: int, box: Box, channels: int) -> np.ndarray:
    """Standard normal noise for ``box`` (spatial z, y, x) as a pure function of position, drawn
    in whole tiles (the synthetic brain's render).

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
