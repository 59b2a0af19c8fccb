"""User cell inputs in the layouts of public spatial-transcriptomics atlases, as ``CellTable``s.

Formats (all positions in µm; our tables hold them as (z, y, x)):

- **AnnData** ``.h5ad``: ``obsm["spatial"]`` is (N, 3) in the atlas order **(x, y, z)** (or
  (x, y) with z in ``obs``); ``X`` (or a layer) is a cells x genes matrix, dense or
  scipy-sparse; genes are ``var_names`` or a gene-symbol column (``anndata_cells``).
- **Transcript table** (``.parquet``/``.pq``, or ``.csv`` with a ``gene`` column): one row per
  transcript with columns ``x``, ``y``, ``z``, ``gene``. Each transcript becomes one row of the
  table with one-hot counts over the chosen genes; transcripts of other genes are dropped.
- **Cell CSV**: columns ``x``, ``y``, ``z`` and one column per gene. Every column except ``x``,
  ``y``, ``z`` and the metadata columns (``METADATA_COLUMNS`` by default) is a gene and must be
  numeric; an integer ``cell_id`` column is kept as ``CellTable.cell_id``.

CSVs are comma-separated UTF-8 text with '.' as the decimal point (a BOM and CRLF line endings
are fine), read strictly and streamed with Arrow: binary or non-UTF-8 data, another separator, a
row with the wrong number of fields, a coordinate or count that is not a number (a decimal
comma, text) and a cell count that is not a whole number are refused naming the file and line.

Every problem raises ``InputError`` with a one-line message, before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tera_pipeline.core.config import VolumeSpec
from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.anndata_cells import read_anndata
from tera_pipeline.inputs.cell_checks import positions_zyx, validate_cells
from tera_pipeline.inputs.csv_text import (
    COORD_HINT,
    GENE_HINT,
    GENE_TYPE,
    _line_of_row,
    csv_header,
    csv_stream,
    require_columns,
    transcript_csv_batches,
)
from tera_pipeline.inputs.files import (
    COORDS,
    GENE_COLUMN,
    METADATA_COLUMNS,
    PARQUET_SUFFIXES,
    PathLike,
    duplicated,
    existing_file,
    name_list,
    read_user_file,
)
from tera_pipeline.inputs.panel import gene_index, requested_genes
from tera_pipeline.inputs.synthetic import CellTable

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".h5ad", *PARQUET_SUFFIXES, ".csv")


# -- small helpers ------------------------------------------------------------------------------


def _numeric(frame: pd.DataFrame, column: object, label: str, source: str) -> np.ndarray:
    series = frame[column]
    if not pd.api.types.is_numeric_dtype(series.dtype):
        hint = (
            "coordinates are µm"
            if label in COORDS
            else "every column but x, y, z and metadata is a gene; list it in metadata= to skip it"
        )
        raise InputError(
            f"{source}: column {label!r} is not numeric (dtype {series.dtype}); {hint}"
        )
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


_csv_header = csv_header


def check_inside(
    table: CellTable,
    volume_shape: Sequence[int],
    spacing_um: Sequence[float],
    drop_outside: bool = False,
) -> CellTable:
    """Cells whose voxel (floor(position / spacing)) is inside the volume; else an error.

    With ``drop_outside`` the outside cells are dropped and their number logged (warning).
    """
    shape = np.asarray(volume_shape, dtype=np.int64)
    spacing = np.asarray(spacing_um, dtype=np.float64)
    voxel = np.floor(table.position_um / spacing)
    inside = np.all((voxel >= 0) & (voxel < shape), axis=1)
    outside = int(len(table) - inside.sum())
    if outside == 0:
        return table
    extent = " x ".join(f"[0, {s * d:g})" for s, d in zip(shape, spacing, strict=True))
    what = (
        f"{outside} of {len(table)} cells lie outside the volume {tuple(int(s) for s in shape)} "
        f"voxels = {extent} µm (z, y, x)"
    )
    if not drop_outside:
        raise InputError(f"{what}; map them with origin_um/affine or pass drop_outside=True")
    if outside == len(table):
        raise InputError(f"{what}; no cell is left")
    log.warning("dropping %s", what)
    return table.select(inside)


# -- genes --------------------------------------------------------------------------------------


# -- readers ------------------------------------------------------------------------------------
def read_transcripts(path: PathLike, genes: Sequence[str] | None = None) -> CellTable:
    """A transcript table (x, y, z, gene): one row per transcript, one-hot counts over genes.

    Genes default to the sorted distinct names; a requested gene with no transcript is missing.
    """
    path = existing_file(path)
    needed = [*COORDS, GENE_COLUMN]
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        schema = read_user_file(path, "parquet", lambda: pq.read_schema(path))
        require_columns(schema.names, needed, str(path))
        frame = read_user_file(path, "parquet", lambda: pd.read_parquet(path, columns=needed))
    elif suffix == ".csv":
        batches = list(transcript_csv_batches(path))
        schema = pa.schema([*((c, pa.float64()) for c in COORDS), (GENE_COLUMN, GENE_TYPE)])
        frame = pa.Table.from_batches(batches, schema).to_pandas()
    else:
        raise _unsupported(path)
    return _transcripts_table(frame, genes, str(path))


def _transcripts_table(frame: pd.DataFrame, genes: Sequence[str] | None, source: str) -> CellTable:
    if len(frame) == 0:
        raise InputError(f"{source}: empty table (no transcripts)")
    category = pd.Categorical(frame[GENE_COLUMN])
    if (category.codes < 0).any():
        raise InputError(f"{source}: {int((category.codes < 0).sum())} transcripts have no gene")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in category.categories]
    panel = tuple(sorted(set(names))) if genes is None else requested_genes(genes)
    gene_index(sorted(set(names)), panel, source)  # names missing requested genes
    where = {g: i for i, g in enumerate(panel)}
    codes = np.array([where.get(n, -1) for n in names], dtype=np.int64)[category.codes]
    keep = codes >= 0
    xyz = np.stack([_numeric(frame, c, c, source) for c in COORDS], axis=1)[keep]
    counts = np.zeros((int(keep.sum()), len(panel)), dtype=np.float32)
    counts[np.arange(len(counts)), codes[keep]] = 1.0
    return validate_cells(CellTable(positions_zyx(xyz, source), counts, panel), source)


def read_cell_csv(
    path: PathLike,
    genes: Sequence[str] | None = None,
    *,
    metadata: Iterable[str] = METADATA_COLUMNS,
) -> CellTable:
    """A cell CSV: x, y, z (µm) and one numeric column per gene; ``metadata`` columns ignored.

    Read strictly: a row with the wrong number of fields, a value that is not a number (a
    decimal comma, text) in a coordinate or gene column, and a count that is not a whole number
    are refused naming the file and line."""
    path = existing_file(path)
    source = str(path)
    header = _csv_header(path)
    require_columns(header, COORDS, source)
    dup = [c for c in duplicated(header) if c in COORDS]
    if dup:
        raise InputError(f"{source}: duplicated columns {name_list(dup)}")
    skip = {*COORDS, *metadata}
    gene_cols = [i for i, name in enumerate(header) if name not in skip]
    index = gene_index([header[i] for i in gene_cols], genes, source)
    coord_cols = [header.index(c) for c in COORDS]
    id_col = header.index("cell_id") if "cell_id" in header else None
    chosen = [gene_cols[j] for j in index]
    types = {i: pa.float64() for i in (*coord_cols, *chosen)}
    hints = dict.fromkeys(coord_cols, COORD_HINT) | dict.fromkeys(chosen, GENE_HINT)
    if id_col is not None and id_col not in types:
        types[id_col] = pa.string()
    schema = pa.schema([(str(i), t) for i, t in types.items()])
    frame = pa.Table.from_batches(list(csv_stream(path, header, types, hints)), schema)
    if frame.num_rows == 0:
        raise InputError(f"{source}: empty table (no cells)")

    def column(i: int) -> np.ndarray:
        return frame.column(str(i)).to_numpy()

    xyz = np.stack([column(i) for i in coord_cols], axis=1)
    counts = np.stack([column(i) for i in chosen], axis=1) if chosen else np.zeros((len(xyz), 0))
    names = tuple(header[i] for i in chosen)
    table = CellTable(
        positions_zyx(xyz, source),
        counts.astype(np.float32),
        names,
        cell_id=None if id_col is None else _cell_ids(column(id_col)),
    )
    table = validate_cells(table, source)
    fraction = counts != np.floor(counts)  # validated finite
    if fraction.any():
        row, gene = (int(i) for i in np.argwhere(fraction)[0])
        raise InputError(
            f"{source}: line {_line_of_row(path, row + 2)}: count {counts[row, gene]:g} of gene "
            f"{names[gene]!r} is not a whole number; need raw counts per cell, not normalized "
            "values"
        )
    return table


def _cell_ids(values: np.ndarray) -> np.ndarray | None:
    """Integer cell ids, or None when the column holds anything else."""
    try:
        ids = values.astype(np.int64) if values.dtype.kind in "OUS" else values
    except (ValueError, TypeError, OverflowError):
        return None
    if ids.dtype.kind == "f":
        if not np.isfinite(ids).all() or (ids != np.floor(ids)).any():
            return None
        ids = ids.astype(np.int64)
    return ids if ids.dtype.kind in "iu" else None


# -- coordinates and the entry point ------------------------------------------------------------
def to_volume_frame(
    table: CellTable,
    origin_um: Sequence[float] = (0.0, 0.0, 0.0),
    affine: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> CellTable:
    """Positions in the volume frame: ``affine`` first, then minus ``origin_um`` (z, y, x).

    ``affine`` is 4 x 4 acting on column vectors (z, y, x, 1) in µm, last row (0, 0, 0, 1):
    ``p' = A[:3, :3] @ p + A[:3, 3]``. It can also convert units (e.g. a diagonal of 1000 for mm).
    """
    origin = np.asarray(origin_um, dtype=np.float64)
    if origin.shape != (3,) or not np.isfinite(origin).all():
        raise InputError(f"origin_um must be 3 finite numbers (z, y, x), got {origin.tolist()}")
    position = np.asarray(table.position_um, dtype=np.float64)
    if affine is not None:
        a = _affine(affine)
        position = position @ a[:3, :3].T + a[:3, 3]
    return replace(table, position_um=position - origin)


def _affine(affine: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputError(
            f"affine must be 4 x 4 in the (z, y, x, 1) convention, got shape {a.shape}"
        )
    if not np.isfinite(a).all() or not np.allclose(a[3], (0.0, 0.0, 0.0, 1.0)):
        raise InputError(f"affine must be finite with last row (0, 0, 0, 1), got {a[3].tolist()}")
    return a


def _unsupported(path: Path) -> InputError:
    return InputError(
        f"{path}: unsupported suffix {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


def load_cells(
    path: PathLike,
    genes: Sequence[str] | None = None,
    origin_um: Sequence[float] = (0.0, 0.0, 0.0),
    affine: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    volume: VolumeSpec | None = None,
    drop_outside: bool = False,
) -> CellTable:
    """Read any supported input (by suffix), choose genes, map to the volume frame, validate.

    ``.h5ad`` -> ``read_anndata``; ``.parquet``/``.pq`` -> ``read_transcripts``; ``.csv`` ->
    ``read_transcripts`` if it has a ``gene`` column, else ``read_cell_csv``. With ``volume``,
    cells outside it are an error (or dropped with ``drop_outside``).
    """
    path = existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        table = read_anndata(path, genes)
    elif suffix in PARQUET_SUFFIXES:
        table = read_transcripts(path, genes)
    elif suffix == ".csv":
        is_transcripts = GENE_COLUMN in _csv_header(path)
        table = (read_transcripts if is_transcripts else read_cell_csv)(path, genes)
    else:
        raise _unsupported(path)
    table = validate_cells(to_volume_frame(table, origin_um, affine), str(path))
    if volume is not None:
        table = check_inside(table, volume.shape, volume.spacing_um, drop_outside)
    return table
