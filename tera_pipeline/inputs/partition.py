"""Out-of-core conditioning input: a transcript table partitioned by block, once.

A transcript table (x, y, z, gene; parquet or CSV) can be far larger than memory. It is read in
record batches; each batch is mapped to the volume frame, validated, and its rows are appended to
one small parquet file per block (global bin indices and a gene code), so a block task later reads
only its own transcripts. Memory stays at one batch whatever the table's size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box
from tera_pipeline.inputs.cells import to_volume_frame
from tera_pipeline.inputs.csv_text import csv_header, transcript_csv_batches
from tera_pipeline.inputs.files import COORDS, GENE_COLUMN
from tera_pipeline.inputs.synthetic import CellTable
from tera_pipeline.storage import ownership

BATCH_ROWS = 1_000_000
MANIFEST = "manifest.json"
STAGING_MARKER = ".tera-partition"


def is_transcript_table(path: Path) -> bool:
    """A parquet table, or a CSV whose header has a ``gene`` column."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    if path.suffix.lower() == ".csv" and path.is_file():
        return GENE_COLUMN in csv_header(path)  # binary, non-UTF-8: InputError naming the file
    return False


def _batches(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(positions (n, 3) as x, y, z in µm, gene names, gene index per row) per record batch."""
    needed = [*COORDS, GENE_COLUMN]
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            reader = pq.ParquetFile(path)
            missing = [c for c in needed if c not in reader.schema_arrow.names]
            if missing:
                raise InputError(f"{path}: missing columns {missing}; need {needed}")
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=needed):
                yield _columns(batch, path)
        else:  # checked as it streams: fields per row, numbers, UTF-8, a gene on every row
            for batch in transcript_csv_batches(path, block_size=64 << 20):
                yield _columns(batch, path)
    except (pa.ArrowInvalid, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path}: cannot read as a transcript table: {first}") from err


def _columns(batch: pa.RecordBatch, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        xyz = np.stack(
            [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in COORDS],
            axis=1,
        )
    except (ValueError, TypeError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: coordinates x, y, z must be numbers (µm)") from err
    column = batch.column(GENE_COLUMN)
    if column.null_count:
        raise InputError(f"{path}: {column.null_count} transcripts have no gene")
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    names = column.dictionary.to_numpy(zero_copy_only=False).astype(str)
    return xyz, names, column.indices.to_numpy(zero_copy_only=False)


def input_key(config: JobConfig, genes: tuple[str, ...]) -> str:
    """Identity of a partitioning: the input file (path, size, mtime) and the layout."""
    path = Path(config.conditioning.source)
    stat = path.stat()
    layout = {
        "path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
        "volume": config.volume.model_dump(mode="json"), "block": list(config.storage.block),
        "bin": list(config.conditioning.bin), "affine": config.conditioning.affine,
        "drop_outside": config.conditioning.drop_outside, "genes": list(genes),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def partition(config: JobConfig, genes: tuple[str, ...], out: Path) -> dict:
    """Partition the job's transcript table into ``out`` (one folder per block); validate as it
    goes. On any error ``out`` is removed and an ``InputError`` raised. Returns the manifest."""
    src = Path(config.conditioning.source)
    if not src.is_file():
        raise InputError(f"{src}: no such file")
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
    for part, (xyz, names, name_index) in enumerate(_batches(src)):
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
        voxel = np.floor(pos / spacing).astype(np.int64)
        inside = np.all((voxel >= 0) & (voxel < volume), axis=1)
        outside += int((~inside).sum())
        gene_code = np.array([code_of.get(n, -1) for n in names], dtype=np.int64)[name_index]
        seen[np.unique(gene_code[gene_code >= 0])] = True
        keep = inside & (gene_code >= 0)
        voxel, gene_code = voxel[keep], gene_code[keep].astype(np.int16)
        kept += len(voxel)
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
    if rows == 0:
        raise InputError(f"{src}: empty table (no transcripts)")
    if outside and not config.conditioning.drop_outside:
        raise InputError(
            f"{outside} of {rows} transcripts lie outside the volume "
            f"{tuple(map(int, volume))} voxels; map them with origin_um/affine or --drop-outside"
        )
    if not seen.all():
        missing = [g for g, s in zip(genes, seen) if not s]
        raise InputError(f"{src}: {len(missing)} requested genes missing: {missing[:8]}")
    return {"key": key, "source": str(src), "rows": rows, "kept": kept, "outside": outside,
            "genes": list(genes)}  # fmt: skip


class PartitionedSource:
    """Gene bins of a block from its own partition files only."""

    def __init__(self, folder: Path, genes: tuple[str, ...], grid_block: tuple[int, ...]) -> None:
        self.folder = Path(folder)
        self.genes = genes
        self.block = grid_block

    def rasters(self, box: Box, bins: Box, spacing_um, bin_shape) -> tuple[np.ndarray, np.ndarray]:
        """(gene counts (G, *bins.shape), transcripts per bin) for a block core ``box``."""
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
        return genes, genes.sum(axis=0)
