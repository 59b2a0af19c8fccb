"""Cells of a transcript table: where the instrument assigned transcripts to cells (Xenium
``cell_id``, MERSCOPE ``cell_id``, CosMx ``cell_ID``), each cell's centroid is the mean position
of its transcripts, gathered batch by batch; ``cell_count`` then counts those centroids per bin.
A table that names no cells has no cell counts, and the store says so."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tera_pipeline.core.geometry import Box, Shape

CELLS_FILE = "cells.parquet"
"""The centroids in a partition folder: cell, z_um, y_um, x_um (volume frame), transcripts."""
CELL_COUNTS = "cell centroids per bin"
TRANSCRIPT_COUNTS = "transcripts per bin (the input assigns no transcripts to cells)"
"""What ``cell_count`` holds, as the store's attributes say it."""


class CellCentroids:
    """Running sums of the positions of each named cell's transcripts, over batches."""

    def __init__(self, no_cell: tuple[str, ...]) -> None:
        self.no_cell = no_cell
        self.sums: pd.DataFrame | None = None
        self.unassigned = 0

    def add(self, cells: pa.Array, position_um: np.ndarray) -> None:
        """Add a batch: each row's cell id and its position (z, y, x) µm."""
        ids = np.asarray(cells.to_numpy(zero_copy_only=False)).astype(str)
        named = ~np.isin(ids, self.no_cell) & (ids != "None") & (ids != "nan")
        self.unassigned += int((~named).sum())
        if not named.any():
            return
        frame = pd.DataFrame(position_um[named], columns=["z_um", "y_um", "x_um"])
        frame["transcripts"] = 1
        part = frame.groupby(ids[named], sort=False).sum()
        self.sums = part if self.sums is None else self.sums.add(part, fill_value=0)

    def write(self, folder: Path) -> int | None:
        """Write the centroids to ``folder``; returns the number of cells (None: no cells)."""
        if self.sums is None:
            return None
        n = self.sums["transcripts"].to_numpy()
        table = pa.table(
            {
                "cell": self.sums.index.astype(str).to_numpy(),
                **{c: self.sums[c].to_numpy() / n for c in ("z_um", "y_um", "x_um")},
                "transcripts": n.astype(np.int64),
            }
        )
        import pyarrow.parquet as pq

        pq.write_table(table, Path(folder) / CELLS_FILE)
        return len(table)


@lru_cache(maxsize=4)
def _centroids(path: Path, mtime_ns: int) -> np.ndarray:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["z_um", "y_um", "x_um"])
    return np.column_stack([t.column(c).to_numpy() for c in ("z_um", "y_um", "x_um")])


def centroids_in(folder: Path) -> np.ndarray | None:
    """The (N, 3) centroids µm of a partition's cells, or None if its table names no cells."""
    path = Path(folder) / CELLS_FILE
    if not path.is_file():
        return None
    return _centroids(path, path.stat().st_mtime_ns)


def centroid_raster(centroids: np.ndarray, bins: Box, spacing_um: Shape, bin_shape: Shape):
    """Cell centroids per bin over ``bins``: (*bins.shape) float32."""
    voxel = np.floor(centroids / np.asarray(spacing_um)).astype(np.int64)
    idx = voxel // np.asarray(bin_shape) - np.asarray(bins.begin)
    inside = np.all((idx >= 0) & (idx < np.asarray(bins.shape)), axis=1)
    flat = np.ravel_multi_index(idx[inside].T, bins.shape)
    return np.bincount(flat, minlength=bins.size).reshape(bins.shape).astype(np.float32)
