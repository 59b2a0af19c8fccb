"""The three MagNet levels of a box of bins, read from any image source.

For the core bins of a block (or of a training window), the bin grid is grown by one ring for
graph attention; the spot and region grids are the tiles holding the core bins, grown by one
tile. Everything is aligned to the volume's global bin grid, so a bin's inputs are the same
whatever block it is computed in. Images beyond the volume read as 0 and their bins and tiles
are marked invalid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.magnet import LevelInputs, MagNetConfig
from tera_pipeline.core.geometry import Box, Shape

Reader = Callable[[Box], np.ndarray]
"""Box (z, y, x voxels) -> (C, z, y, x) uint8, 0 beyond the volume."""


def array_reader(image: np.ndarray) -> Reader:
    """A reader over an in-memory (C, z, y, x) array."""
    whole = Box((0, 0, 0), image.shape[1:])

    def read(box: Box) -> np.ndarray:
        out = np.zeros((image.shape[0], *box.shape), dtype=image.dtype)
        part = box.intersect(whole)
        if not part.empty:
            out[(slice(None), *part.slices(box))] = image[(slice(None), *part.slices())]
        return out

    return read


@dataclass(frozen=True)
class LevelGrids:
    """In-plane index ranges (begin, end) of the bin, spot and region grids, in their own units."""

    bins: tuple[tuple[int, int], tuple[int, int]]
    spots: tuple[tuple[int, int], tuple[int, int]]
    regions: tuple[tuple[int, int], tuple[int, int]]

    @classmethod
    def around(cls, core: Box, config: MagNetConfig) -> LevelGrids:
        """The grids that the core bins ``core`` (z, y, x bins) need."""

        def tiles(size: int) -> tuple[tuple[int, int], ...]:
            return tuple((core.begin[a] // size - 1, (core.end[a] - 1) // size + 2) for a in (1, 2))

        rings = tuple((core.begin[a] - 1, core.end[a] + 1) for a in (1, 2))
        return cls(rings, tiles(config.spot_bins), tiles(config.region_bins))  # type: ignore[arg-type]


def _index_of(bins: tuple[int, int], size: int, grid: tuple[int, int]) -> np.ndarray:
    return np.arange(*bins) // size - grid[0]


def level_inputs(
    read: Reader, core: Box, volume: Box, bin_shape: Shape, config: MagNetConfig
) -> LevelInputs:
    """MagNet's inputs for the core bins ``core`` (z, y, x bins): one slab per z bin. Bins and
    tiles that begin outside ``volume`` (bins) are invalid."""
    if bin_shape[1] != config.bin_px or bin_shape[2] != config.bin_px:
        raise ValueError(
            f"the model reads {config.bin_px} x {config.bin_px} px bins; "
            f"the store's bins are {bin_shape[1]} x {bin_shape[2]}"
        )
    grids = LevelGrids.around(core, config)
    px, m = config.bin_px, config.margin_px
    spans = [(grids.bins[a][0] * px - m, grids.bins[a][1] * px + m) for a in range(2)] + [
        (g[a][0] * n * px, g[a][1] * n * px)
        for g, n in ((grids.spots, config.spot_bins), (grids.regions, config.region_bins))
        for a in range(2)
    ]
    y0 = min(s[0] for s in spans[0::2])
    y1 = max(s[1] for s in spans[0::2])
    x0 = min(s[0] for s in spans[1::2])
    x1 = max(s[1] for s in spans[1::2])
    bz = bin_shape[0]
    box = Box.from_bounds((core.begin[0] * bz, y0, x0), (core.end[0] * bz, y1, x1))
    raw = read(box).astype(np.float32)
    c, _, h, w = raw.shape
    slabs = raw.reshape(c, core.shape[0], bz, h, w).mean(axis=2) / 255.0  # (C, S, H, W)
    slabs = np.ascontiguousarray(slabs.transpose(1, 0, 2, 3))  # (S, C, H, W)

    def window(begin_y: int, begin_x: int, size_y: int, size_x: int) -> np.ndarray:
        return slabs[
            :, :, begin_y - y0 : begin_y - y0 + size_y, begin_x - x0 : begin_x - x0 + size_x
        ]

    crop = config.crop_px
    (by0, by1), (bx0, bx1) = grids.bins
    area = window(
        by0 * px - m, bx0 * px - m, (by1 - by0 - 1) * px + crop, (bx1 - bx0 - 1) * px + crop
    )
    views = np.lib.stride_tricks.sliding_window_view(area, (crop, crop), axis=(2, 3))
    crops = views[:, :, ::px, ::px].transpose(0, 2, 3, 1, 4, 5)  # (S, Hb, Wb, C, p, p)

    def tiles(grid, n_bins: int) -> np.ndarray:
        (g0, g1), (h0, h1) = grid
        side, t = n_bins * px, config.tile_px
        pool = side // t
        a = window(g0 * side, h0 * side, (g1 - g0) * side, (h1 - h0) * side)
        s = a.shape[0]
        a = a.reshape(s, c, g1 - g0, t, pool, h1 - h0, t, pool).mean(axis=(4, 7))
        return a.transpose(0, 2, 4, 1, 3, 5)  # (S, Gy, Gx, C, t, t)

    def valid(grid, n_bins: int) -> np.ndarray:
        ys = np.arange(*grid[0]) * n_bins
        xs = np.arange(*grid[1]) * n_bins
        inside_y = (ys >= volume.begin[1]) & (ys < volume.end[1])
        inside_x = (xs >= volume.begin[2]) & (xs < volume.end[2])
        plane = inside_y[:, None] & inside_x[None, :]
        return np.repeat(plane[None], core.shape[0], axis=0)

    def flat_index(grid, n_bins: int) -> np.ndarray:
        iy = _index_of(grids.bins[0], n_bins, grid[0])
        ix = _index_of(grids.bins[1], n_bins, grid[1])
        return iy[:, None] * (grid[1][1] - grid[1][0]) + ix[None, :]

    spot_n, region_n = config.spot_bins, config.region_bins
    as_tensor = torch.from_numpy
    return LevelInputs(
        crops=as_tensor(np.ascontiguousarray(crops)),
        bin_valid=as_tensor(np.ascontiguousarray(valid(grids.bins, 1))),
        spots=as_tensor(np.ascontiguousarray(tiles(grids.spots, spot_n))),
        spot_valid=as_tensor(np.ascontiguousarray(valid(grids.spots, spot_n))),
        regions=as_tensor(np.ascontiguousarray(tiles(grids.regions, region_n))),
        region_valid=as_tensor(np.ascontiguousarray(valid(grids.regions, region_n))),
        spot_of_bin=as_tensor(flat_index(grids.spots, spot_n)),
        region_of_bin=as_tensor(flat_index(grids.regions, region_n)),
    )


def concat(items: list[LevelInputs]) -> LevelInputs:
    """Stack the slabs of inputs laid out on the same grids (training batches)."""
    first = items[0]
    stacked = {
        name: torch.cat([getattr(i, name) for i in items])
        for name in ("crops", "bin_valid", "spots", "spot_valid", "regions", "region_valid")
    }
    return LevelInputs(**stacked, spot_of_bin=first.spot_of_bin, region_of_bin=first.region_of_bin)
