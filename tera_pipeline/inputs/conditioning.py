"""Gene conditioning: cells (µm positions + counts) rasterised to gene bins for any box.

As in Tera-MIND, transcript counts are summed per bin (``bin`` voxels per axis, e.g. one z-slice
by 16 x 16 pixels) with no log or normalisation; the denoiser applies its own transform. The bin
grid is global (bin index = voxel // bin), so the raster of any box is a function of position.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.inputs.synthetic import CellTable, SyntheticBrain


def cell_bins(cells: CellTable, spacing_um: Shape, bin_shape: Shape) -> np.ndarray:
    """Bin index (z, y, x) of each cell's centroid on the global bin grid, (N, 3) int64."""
    voxel = np.floor(cells.position_um / np.asarray(spacing_um, dtype=np.float64)).astype(np.int64)
    return np.floor_divide(voxel, np.asarray(bin_shape, dtype=np.int64))


def rasterize(cells: CellTable, bins: Box, spacing_um: Shape, bin_shape: Shape) -> np.ndarray:
    """Summed counts per gene and bin over ``bins`` (a box in bin units): (G, *bins.shape)."""
    out = np.zeros((len(cells.genes), *bins.shape), dtype=np.float32)
    if len(cells) == 0:
        return out
    idx = cell_bins(cells, spacing_um, bin_shape) - np.asarray(bins.begin)
    inside = np.all((idx >= 0) & (idx < np.asarray(bins.shape)), axis=1)
    idx, counts = idx[inside], cells.counts[inside]
    flat = np.ravel_multi_index(idx.T, bins.shape)
    grid = out.reshape(len(cells.genes), -1)
    for g in range(len(cells.genes)):
        grid[g] = np.bincount(flat, weights=counts[:, g], minlength=grid.shape[1])
    return out


def cell_count_raster(
    cells: CellTable, bins: Box, spacing_um: Shape, bin_shape: Shape
) -> np.ndarray:
    """Number of cell centroids per bin over ``bins``: (*bins.shape) float32."""
    ones = CellTable(cells.position_um, np.ones((len(cells), 1), np.float32), ("cells",))
    return rasterize(ones, bins, spacing_um, bin_shape)[0]


class CellSource:
    """A source of cells for any box; subclasses provide ``genes`` and ``cells(box)``."""

    genes: tuple[str, ...]

    def cells(self, box: Box) -> CellTable:
        raise NotImplementedError

    def rasters(
        self, box: Box, bins: Box, spacing_um: Shape, bin_shape: Shape
    ) -> tuple[np.ndarray, np.ndarray]:
        """(summed counts per gene and bin, cells per bin) of the cells in ``box``."""
        cells = self.cells(box)
        return (
            rasterize(cells, bins, spacing_um, bin_shape),
            cell_count_raster(cells, bins, spacing_um, bin_shape),
        )


class SyntheticSource(CellSource):
    """The embedded synthetic brain."""

    def __init__(self, brain: SyntheticBrain) -> None:
        self.brain = brain
        self.genes = brain.genes

    def cells(self, box: Box) -> CellTable:
        return self.brain.cells(box)


class TableSource(CellSource):
    """Cells read from a user's file (see ``tera_pipeline.inputs``), served per box."""

    def __init__(self, table: CellTable, spacing_um: Shape) -> None:
        self.table = table
        self.genes = table.genes
        self._voxel = np.floor(table.position_um / np.asarray(spacing_um)).astype(np.int64)

    def cells(self, box: Box) -> CellTable:
        """Cells whose centroid voxel lies in ``box``."""
        inside = np.all(
            (self._voxel >= np.asarray(box.begin)) & (self._voxel < np.asarray(box.end)), axis=1
        )
        return self.table.select(inside)


def open_source(config: JobConfig, genes: tuple[str, ...] | None = None, cells_dir=None):
    """The cell source a job is conditioned on (``genes``, ``rasters(box, bins, ...)``).

    For a file, ``genes`` (the checkpoint's panel) are selected by name; a panel file given in
    the config must equal them. Cell tables are read once per process; transcript tables are
    partitioned by block once (``tera_pipeline.partition``) and read from ``cells_dir``.
    """
    from tera_pipeline.inputs.partition import PartitionedSource
    from tera_pipeline.inputs.vendors import is_transcript_table

    spec = config.conditioning
    if spec.source == "synthetic":
        return SyntheticSource(SyntheticBrain(config.synthetic_seed, config.volume.spacing_um))
    genes = _panel(spec, genes)
    if is_transcript_table(spec.source):
        folder = cells_dir or Path(config.out) / CELLS_DIR
        return PartitionedSource(folder, genes, config.storage.block)
    return _table_source(config.volume, spec, genes)


CELLS_DIR = "_cells"


def _panel(spec, genes: tuple[str, ...] | None) -> tuple[str, ...] | None:
    from tera_pipeline.inputs.panel import check_panel, read_gene_panel

    if spec.gene_panel is None:
        return genes
    panel = read_gene_panel(spec.gene_panel)
    if genes is not None:
        check_panel(panel, genes)
    return panel


@lru_cache(maxsize=2)
def _table_source(volume, spec, genes: tuple[str, ...] | None) -> TableSource:
    from tera_pipeline.inputs.cells import load_cells

    table = load_cells(
        spec.source, genes, volume.origin_um, spec.affine, volume=volume,
        drop_outside=spec.drop_outside,
    )  # fmt: skip
    return TableSource(table, volume.spacing_um)
