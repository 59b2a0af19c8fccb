"""Out-of-core conditioning input: a transcript table partitioned by block, once.

A transcript table (x, y, z, gene; parquet or CSV) can be far larger than memory. It is read in
record batches; each batch is mapped to the volume frame, validated, and its rows are appended to
one small parquet file per block (global bin indices and a gene code), so a block task later reads
only its own transcripts. Memory stays at one batch whatever the table's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box
from tera_pipeline.inputs import vendors
from tera_pipeline.inputs.cells import to_volume_frame
from tera_pipeline.inputs.panel import naming_hint
from tera_pipeline.inputs.synthetic import CellTable
from tera_pipeline.inputs.transcript_cells import (
    CELL_COUNTS,
    TRANSCRIPT_COUNTS,
    CellCentroids,
    centroid_raster,
    centroids_in,
)
from tera_pipeline.storage import ownership

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STAGING_MARKER = ".tera-partition"


def input_key(config: JobConfig, genes: tuple[str, ...]) -> str:
    """Identity of a partitioning: the input file (path, size, mtime) and the layout."""
    path = Path(config.conditioning.source)
    files = vendors.spatialdata_points(path)[0] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    layout = {
        "path": str(path.resolve()), "size": sum(st.st_size for st in stats),
        "mtime": max(st.st_mtime_ns for st in stats),
        "volume": config.volume.model_dump(mode="json"), "block": list(config.storage.block),
        "bin": list(config.conditioning.bin), "affine": config.conditioning.affine,
        "drop_outside": config.conditioning.drop_outside, "genes": list(genes),
        "transcripts": config.conditioning.transcripts.model_dump(mode="json"),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def partition(config: JobConfig, genes: tuple[str, ...], out: Path) -> dict:
    """Partition the job's transcript table into ``out`` (one folder per block); validate as it
    goes. On any error ``out`` is removed and an ``InputError`` raised. Returns the manifest."""
    src = Path(config.conditioning.source)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    key = input_key(config, genes)
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text())["key"] == key:
        return json.loads((out / MANIFEST).read_text())
    ownership.make_side_dir(out, STAGING_MARKER)  # only a staging folder of ours is replaced
    try:
        manifest = _partition(config, genes, src, out, key)
    except BaseException:
        ownership.remove_side_dir(out, STAGING_MARKER)
        raise
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _partition(config: JobConfig, genes: tuple[str, ...], src: Path, out: Path, key: str) -> dict:
    code_of = {g: i for i, g in enumerate(genes)}
    volume = np.asarray(config.volume.shape)
    spacing = np.asarray(config.volume.spacing_um)
    block = np.asarray(config.storage.block)
    bins = np.asarray(config.conditioning.bin)
    grid_shape = np.asarray(config.grid().shape)
    seen = np.zeros(len(genes), dtype=bool)
    rows = kept = outside = 0
    read = vendors.open_reading(src, config.conditioning.transcripts)
    dropped: Counter = Counter()
    extent = vendors.Extent()
    names_seen: set[str] = set()
    centroids = CellCentroids(read.layout.no_cell)
    for part, batch in enumerate(vendors.batches(src, read, dropped)):
        xyz, names, name_index = batch.xyz, batch.names, batch.index
        names_seen.update(names.tolist())
        rows += len(xyz)
        table = to_volume_frame(
            CellTable(xyz[:, ::-1].copy(), np.zeros((len(xyz), 0), np.float32), ()),
            config.volume.origin_um, config.conditioning.affine,
        )  # fmt: skip
        pos = table.position_um
        bad = ~np.isfinite(pos).all(axis=1)
        if bad.any():
            raise InputError(
                f"{src}: {int(bad.sum())} transcripts have non-finite (NaN or infinite) "
                f"coordinates (first at row {rows - len(xyz) + int(np.argmax(bad))})"
            )
        extent.add(pos)
        voxel = np.floor(pos / spacing).astype(np.int64)
        inside = np.all((voxel >= 0) & (voxel < volume), axis=1)
        outside += int((~inside).sum())
        if batch.cells is not None:  # every transcript of a cell places it, whatever its gene
            centroids.add(batch.cells.filter(pa.array(inside)), pos[inside])
        gene_code = np.array([code_of.get(n, -1) for n in names], dtype=np.int64)[name_index]
        seen[np.unique(gene_code[gene_code >= 0])] = True
        dropped["genes not in the panel"] += int((inside & (gene_code < 0)).sum())
        keep = inside & (gene_code >= 0)
        voxel, gene_code = voxel[keep], gene_code[keep].astype(np.int16)
        kept += len(voxel)
        if not len(voxel):  # a batch wholly outside the volume or of other genes
            continue
        _write_by_block(out, part, voxel, gene_code, block, grid_shape, bins)
    if rows == 0:
        raise InputError(f"{src}: empty table (no transcripts)")
    volume_um = volume * spacing
    if config.conditioning.transcripts.units == "auto":
        extent.check_units(volume_um, f"{src} ({read.describe()})")
    if outside and not config.conditioning.drop_outside:
        raise InputError(
            f"{outside} of {rows} transcripts lie outside the volume "
            f"{tuple(map(int, volume))} voxels; map them with origin_um/affine or --drop-outside"
        )
    if not seen.all():
        missing = [g for g, s in zip(genes, seen) if not s]
        hint = naming_hint(sorted(names_seen), genes)
        raise InputError(f"{src}: {len(missing)} requested genes missing: {missing[:8]}{hint}")
    read_rows = rows + sum(n for why, n in dropped.items() if why != "genes not in the panel")
    dropped["outside the volume"] = outside
    manifest = {
        "key": key, "source": str(src), "format": read.describe(), "rows": read_rows, "kept": kept,
        "outside": outside, "dropped": dict(dropped), "genes": list(genes),
        "cells": centroids.write(out), "unassigned_transcripts": centroids.unassigned,
    }  # fmt: skip
    log.info("%s", input_summary(manifest))
    return manifest


def _write_by_block(out: Path, part: int, voxel, gene_code, block, grid_shape, bins) -> None:
    """Append one batch's transcripts (voxels inside the volume, gene codes) to the files of
    the blocks they fall in: global bin indices and the gene code, one parquet part each."""
    block_id = np.ravel_multi_index((voxel // block).T, grid_shape)
    order = np.argsort(block_id, kind="stable")
    block_id, voxel, gene_code = block_id[order], voxel[order], gene_code[order]
    starts = np.flatnonzero(np.r_[True, block_id[1:] != block_id[:-1]])
    ends = np.r_[starts[1:], len(block_id)]
    bin_index = (voxel // bins).astype(np.int32)
    for s, e in zip(starts, ends):
        index = np.unravel_index(block_id[s], grid_shape)
        folder = out / "-".join(str(int(i)) for i in index)
        folder.mkdir(exist_ok=True)
        pq.write_table(pa.table({
            "zbin": bin_index[s:e, 0], "ybin": bin_index[s:e, 1], "xbin": bin_index[s:e, 2],
            "gene": gene_code[s:e],
        }), folder / f"part-{part:05d}.parquet")  # fmt: skip


def input_summary(manifest: dict) -> str:
    """One line: the table's layout, its rows, what was kept and what was dropped, and why."""
    drops = ", ".join(f"{n:,} {why}" for why, n in manifest["dropped"].items() if n)
    cells = manifest.get("cells")
    placed = (
        f"; {cells:,} cells placed at their transcripts' mean"
        if cells
        else "; it assigns no transcripts to cells, so cell_count holds transcripts per bin"
    )
    return (
        f"{manifest['source']}: {manifest['format']}: {manifest['rows']:,} transcripts, "
        f"{manifest['kept']:,} kept" + (f"; dropped {drops}" if drops else "") + placed
    )


class PartitionedSource:
    """Gene bins of a block from its own partition files only."""

    def __init__(self, folder: Path, genes: tuple[str, ...], grid_block: tuple[int, ...]) -> None:
        self.folder = Path(folder)
        self.genes = genes
        self.block = grid_block

    def rasters(self, box: Box, bins: Box, spacing_um, bin_shape) -> tuple[np.ndarray, np.ndarray]:
        """(gene counts (G, *bins.shape), cell centroids per bin) for a block core ``box``; where
        the input names no cells, transcripts per bin instead."""
        index = tuple(b // s for b, s in zip(box.begin, self.block))
        folder = self.folder / "-".join(map(str, index))
        genes = np.zeros((len(self.genes), *bins.shape), dtype=np.float32)
        for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
            t = pq.read_table(part)
            local = [
                t.column(c).to_numpy() - o for c, o in zip(("zbin", "ybin", "xbin"), bins.begin)
            ]
            flat = np.ravel_multi_index((t.column("gene").to_numpy(), *local), genes.shape)
            genes += np.bincount(flat, minlength=genes.size).reshape(genes.shape)
        centroids = centroids_in(self.folder)
        if centroids is None:  # the input names no cells
            return genes, genes.sum(axis=0)
        return genes, centroid_raster(centroids, bins, spacing_um, bin_shape)

    @property
    def cell_count_kind(self) -> str:
        """What the ``cell_count`` of this input holds."""
        return CELL_COUNTS if centroids_in(self.folder) is not None else TRANSCRIPT_COUNTS
