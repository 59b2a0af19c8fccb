"""User cell inputs in the layouts of public spatial-transcriptomics atlases, as ``CellTable``s.

Formats (all positions in µm; our tables hold them as (z, y, x)):

- **AnnData** ``.h5ad``: ``obsm["spatial"]`` is (N, 3) in the atlas order **(x, y, z)**; ``X``
  (or a layer) is a cells x genes matrix, dense or scipy-sparse; genes are ``var_names``.
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

import csv
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tera_pipeline.config import VolumeSpec
from tera_pipeline.synthetic import CellTable

log = logging.getLogger(__name__)

COORDS: tuple[str, str, str] = ("x", "y", "z")
"""Coordinate columns of the tables, in the atlas order (x, y, z)."""
GENE_COLUMN = "gene"
METADATA_COLUMNS: frozenset[str] = frozenset(
    {"cell_id", "cell_type", "fov", "sample", "section", "slice", "region", "cluster", "volume"}
)
"""Columns of a cell CSV that are not genes (besides x, y, z)."""
TABLE_SUFFIXES = (".parquet", ".pq")
SUPPORTED_SUFFIXES = (".h5ad", *TABLE_SUFFIXES, ".csv")

PathLike = str | Path


class InputError(ValueError):
    """An input that cannot be used; the message is one line naming the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# -- small helpers ------------------------------------------------------------------------------
def _names(names: Iterable[object], limit: int = 5) -> str:
    """'A', 'B', 'C' (+2 more): the first few names for a message."""
    names = list(names)
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for n in names:
        if n in seen:
            dup[n] = None
        seen.add(n)
    return list(dup)


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def _read(path: Path, what: str, reader: Callable[[], object]) -> object:
    """Run a library reader, turning its I/O or format errors into a one-line ``InputError``."""
    try:
        return reader()
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot read as {what}: {first}") from err


def _positions_zyx(xyz: np.ndarray, source: str) -> np.ndarray:
    """(N, 3) atlas (x, y, z) µm -> float64 (z, y, x); other shapes are an error."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(
            f"{source}: coordinates of the wrong dimensionality: shape {xyz.shape}, "
            "need (cells, 3) as (x, y, z) in µm"
        )
    return np.ascontiguousarray(xyz[:, ::-1], dtype=np.float64)


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


def _gene_index(available: Sequence[str], genes: Sequence[str] | None, source: str) -> list[int]:
    """Indices into ``available`` of the requested genes (all when None), in request order."""
    if genes is None:
        dup = _duplicates(available)
        if dup:
            raise InputError(f"{source}: duplicated gene names {_names(dup)}")
        return list(range(len(available)))
    genes = _requested(genes)
    dup = set(_duplicates(available)) & set(genes)
    if dup:
        raise InputError(f"{source}: duplicated gene names {_names(sorted(dup))}")
    where = {name: i for i, name in enumerate(available)}
    missing = [g for g in genes if g not in where]
    if missing:
        raise InputError(
            f"{source}: {len(missing)} requested genes missing: {_names(missing)} "
            f"(the input has {len(available)} genes)"
        )
    return [where[g] for g in genes]


def _requested(genes: Sequence[str]) -> tuple[str, ...]:
    genes = tuple(str(g) for g in genes)
    if not genes:
        raise InputError("empty gene request: name at least one gene")
    dup = _duplicates(genes)
    if dup:
        raise InputError(f"duplicated gene names in the request: {_names(dup)}")
    return genes


HEADER_LIMIT = 8 << 20
"""Longest first line read as a CSV header (bytes)."""
_SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'"}
_COORD_HINT = "coordinates are numbers in µm"
_GENE_HINT = "every column but x, y, z and metadata is a gene; list it in metadata= to skip it"
_GENE_TYPE = pa.dictionary(pa.int32(), pa.string())
_PARSE_ERROR = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")
_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to \w+: (.*)"
)


def csv_header(path: PathLike) -> list[str]:
    """The column names of a comma-separated UTF-8 file (a BOM is skipped; CRLF is fine).

    Binary or non-UTF-8 data, an empty first line and ';'- or tab-separated fields are an
    ``InputError`` naming the file and line 1.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.readline(HEADER_LIMIT)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    if not raw:
        raise InputError(f"{path}: empty file (no header line)")
    if b"\0" in raw:
        raise InputError(f"{path}: line 1: binary data (NUL bytes), not a CSV text file")
    if len(raw) >= HEADER_LIMIT and not raw.endswith(b"\n"):
        raise InputError(f"{path}: line 1 is over {HEADER_LIMIT >> 20} MiB: not a CSV text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path}: line 1: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8 CSV"
        ) from None
    line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    if not line.strip():
        raise InputError(f"{path}: line 1 is blank; the first line must name the columns")
    try:
        header = [h.strip() for h in next(csv.reader([line]))]
    except csv.Error as err:
        raise InputError(f"{path}: line 1: not a CSV header: {err}") from None
    for sep, name in _SEPARATORS.items():
        if len(header) == 1 and sep in line:
            raise InputError(
                f"{path}: line 1: fields separated by {name}; need comma-separated values, "
                "with '.' as the decimal point"
            )
    return header


_csv_header = csv_header


def _line_of_row(path: Path, row: int) -> int:
    """The line of CSV record ``row`` as Arrow numbers them (from 1, the header included, blank
    lines skipped); streams the file (called on errors only). Falls back to ``row``."""
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            seen = 0
            for record in reader:
                seen += bool(record)
                if seen == row:
                    return reader.line_num
    except (csv.Error, OSError):
        pass
    return row


def _csv_stream(
    path: Path,
    header: Sequence[str],
    types: dict[int, pa.DataType],
    hints: dict[int, str],
    block_size: int = 64 << 20,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the columns ``types`` (by position, named ``str(position)``) of a CSV,
    strictly: each row has one field per header column and each value converts, else an
    ``InputError`` naming the file and line. Memory stays at one block of ``block_size`` bytes."""
    import pyarrow.csv as pcsv

    names = [str(i) for i in range(len(header))]  # by position: duplicated names stay distinct
    read = pcsv.ReadOptions(
        use_threads=False,  # serial parsing: Arrow's errors then carry the row number
        block_size=block_size,
        column_names=names,
        skip_rows=1,
    )
    convert = pcsv.ConvertOptions(
        column_types={str(i): t for i, t in types.items()},
        include_columns=[str(i) for i in types],
    )
    try:
        yield from pcsv.open_csv(path, read_options=read, convert_options=convert)
    except (pa.ArrowException, OSError) as err:
        raise _csv_error(path, header, hints, err) from err


def _csv_error(path: Path, header: Sequence[str], hints: dict[int, str], err: Exception):
    text = " ".join(str(err).split())
    if m := _PARSE_ERROR.search(text):
        row, want, got = (int(g) for g in m.groups())
        hint = (
            "; quote values that contain ',' and use '.' as the decimal point"
            if got > want
            else "; every row needs a field for every column"
        )
        return InputError(
            f"{path}: line {_line_of_row(path, row)}: {got} fields, the header has {want}{hint}"
        )
    if m := _CONVERSION_ERROR.search(text):
        column, row, detail = int(m[1]), int(m[2]), m[3]
        where = f"{path}: line {_line_of_row(path, row)}"
        name = header[column] if column < len(header) else f"#{column + 1}"
        value = re.fullmatch(r"invalid value '(.*)'", detail)
        if "UTF8" in detail or (value and "\ufffd" in value[1]):
            return InputError(f"{where}: not UTF-8 text (column {name!r}); save the file as UTF-8")
        if value is None:
            return InputError(f"{where}: column {name!r}: {detail}")
        hints_here = [hints[column]] if column in hints else []
        if "," in value[1]:
            hints_here.insert(0, "use '.' as the decimal point")
        shown = value[1] if len(value[1]) <= 40 else value[1][:40] + "..."
        return InputError(
            f"{where}: column {name!r} is not numeric: {shown!r}"
            + "".join(f"; {h}" for h in hints_here)
        )
    return InputError(f"{path}: cannot read as CSV: {text[:300]}")


def transcript_csv_batches(path: PathLike, block_size: int = 64 << 20) -> Iterator[pa.RecordBatch]:
    """A transcript CSV in record batches of ``x``, ``y``, ``z`` (float64, µm) and ``gene``
    (dictionary), checked as it streams (header, field counts, numbers, UTF-8, a gene on every
    row); memory stays at one block whatever the file's size."""
    path = Path(path)
    header = csv_header(path)
    needed = [*COORDS, GENE_COLUMN]
    _require_columns(header, needed, str(path))
    dup = [c for c in _duplicates(header) if c in needed]
    if dup:
        raise InputError(f"{path}: duplicated columns {_names(dup)}")
    cols = [header.index(c) for c in needed]
    types = {c: pa.float64() for c in cols[:3]} | {cols[3]: _GENE_TYPE}
    rows = 0
    for batch in _csv_stream(path, header, types, dict.fromkeys(cols[:3], _COORD_HINT), block_size):
        batch = pa.RecordBatch.from_arrays([batch.column(str(c)) for c in cols], names=needed)
        gene = batch.column(GENE_COLUMN)
        names = gene.dictionary.to_pylist()
        bad = [i for i, n in enumerate(names) if n is None or not n.strip()]
        if bad or gene.null_count:
            index = gene.indices.to_numpy(zero_copy_only=False)
            missing = np.isin(index, bad) | ~np.asarray(gene.is_valid())
            first = int(np.argmax(missing))
            raise InputError(
                f"{path}: {int(missing.sum())} transcripts have no gene "
                f"(first at line {_line_of_row(path, rows + first + 2)})"
            )
        rows += len(batch)
        yield batch


def _require_columns(columns: Sequence[str], needed: Sequence[str], source: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"{source}: missing columns {_names(missing)}; need {_names(needed)}")


# -- validation ---------------------------------------------------------------------------------
def validate_cells(table: CellTable, source: str = "cells") -> CellTable:
    """Check shapes, emptiness, gene names, finite coordinates and finite non-negative counts."""
    pos, counts = np.asarray(table.position_um), np.asarray(table.counts)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise InputError(
            f"{source}: coordinates of the wrong dimensionality: shape {pos.shape}, need (cells, 3)"
        )
    if len(pos) == 0:
        raise InputError(f"{source}: empty table (no cells)")
    if not table.genes:
        raise InputError(f"{source}: empty table (no genes)")
    if counts.shape != (len(pos), len(table.genes)):
        raise InputError(
            f"{source}: counts shape {counts.shape} does not match "
            f"{len(pos)} cells x {len(table.genes)} genes"
        )
    dup = _duplicates(table.genes)
    if dup:
        raise InputError(f"{source}: duplicated gene names {_names(dup)}")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise InputError(
            f"{source}: {int(bad.sum())} of {len(pos)} cells have non-finite (NaN or infinite) "
            f"coordinates (first at row {int(np.argmax(bad))})"
        )
    _check_counts(counts, table.genes, source)
    return table


def _check_counts(counts: np.ndarray, genes: Sequence[str], source: str) -> None:
    for bad, what in (
        (~np.isfinite(counts), "non-finite (NaN or infinite)"),
        (counts < 0, "negative"),
    ):
        if bad.any():
            cols = np.flatnonzero(bad.any(axis=0))
            raise InputError(
                f"{source}: {what} counts in {int(bad.any(axis=1).sum())} cells "
                f"(genes {_names(genes[c] for c in cols)})"
            )


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


def check_panel(genes: Sequence[str], checkpoint_genes: Sequence[str]) -> None:
    """Raise unless ``genes`` is exactly the checkpoint's panel, in the same order."""
    genes, ckpt = [str(g) for g in genes], [str(g) for g in checkpoint_genes]
    if genes == ckpt:
        return
    have, known = set(genes), set(ckpt)
    missing = [g for g in ckpt if g not in have]
    extra = [g for g in genes if g not in known]
    if missing or extra:
        raise InputError(
            f"gene panel does not match the checkpoint ({len(genes)} vs {len(ckpt)} genes): "
            f"missing {_names(missing) or 'none'}; not in checkpoint {_names(extra) or 'none'}"
        )
    dup = _duplicates(genes)
    if dup:
        raise InputError(f"gene panel has duplicated gene names {_names(dup)}")
    first = next(i for i, (a, b) in enumerate(zip(genes, ckpt)) if a != b)
    raise InputError(
        f"gene panel order differs from the checkpoint at position {first} "
        f"({genes[first]!r} vs {ckpt[first]!r}); reorder with select_genes(table, checkpoint_genes)"
    )


# -- genes --------------------------------------------------------------------------------------
def read_gene_panel(path: PathLike) -> tuple[str, ...]:
    """Gene names, one per line; blank lines and ``#`` comments are ignored."""
    path = _existing(path)
    raw = _read(path, "a gene panel", path.read_bytes)
    if b"\0" in raw:
        raise InputError(f"{path}: binary data (NUL bytes), not a gene panel text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text; save the gene panel as UTF-8") from None
    genes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if len(name.split()) > 1:
            raise InputError(f"{path}:{number}: one gene name per line, got {name!r}")
        genes.append(name)
    if not genes:
        raise InputError(f"{path}: empty gene panel")
    dup = _duplicates(genes)
    if dup:
        raise InputError(f"{path}: duplicated gene names {_names(dup)}")
    return tuple(genes)


def select_genes(table: CellTable, genes: Sequence[str]) -> CellTable:
    """The table with count columns for ``genes`` in that order; missing genes are named."""
    index = _gene_index(table.genes, genes, "cells")
    return replace(table, counts=np.ascontiguousarray(table.counts[:, index]), genes=tuple(genes))


# -- readers ------------------------------------------------------------------------------------
def read_anndata(
    path: PathLike,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    spatial_key: str = "spatial",
) -> CellTable:
    """An ``.h5ad`` with ``obsm[spatial_key]`` as (x, y, z) µm and counts in X (or ``layer``)."""
    import anndata

    path = _existing(path)
    adata = _read(path, "h5ad", lambda: anndata.read_h5ad(path))
    source = str(path)
    if spatial_key not in adata.obsm:
        raise InputError(f"{source}: no obsm[{spatial_key!r}] with (x, y, z) cell positions")
    position = _positions_zyx(np.asarray(adata.obsm[spatial_key]), source)
    available = [str(g) for g in adata.var_names]
    index = _gene_index(available, genes, source)
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{source}: no layer {layer!r} (layers: {_names(adata.layers.keys())})")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise InputError(f"{source}: no count matrix X")
    selected = matrix[:, index]
    dense = selected.toarray() if hasattr(selected, "toarray") else np.asarray(selected)
    counts = np.ascontiguousarray(dense, dtype=np.float32)
    names = tuple(available[i] for i in index)
    table = validate_cells(CellTable(position, counts, names), source)
    fraction = dense != np.floor(dense)  # validated finite
    if fraction.any():
        cell, gene = (int(i) for i in np.argwhere(fraction)[0])
        where = "X" if layer is None else f"layer {layer!r}"
        raise InputError(
            f"{source}: {where} holds counts that are not whole numbers in "
            f"{int(fraction.any(axis=1).sum())} cells (first {dense[cell, gene]:g} of gene "
            f"{names[gene]!r} in cell {str(adata.obs_names[cell])!r}); need raw counts per cell, "
            "not normalized values"
        )
    return table


def read_transcripts(path: PathLike, genes: Sequence[str] | None = None) -> CellTable:
    """A transcript table (x, y, z, gene): one row per transcript, one-hot counts over genes.

    Genes default to the sorted distinct names; a requested gene with no transcript is missing.
    """
    path = _existing(path)
    needed = [*COORDS, GENE_COLUMN]
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        import pyarrow.parquet as pq

        schema = _read(path, "parquet", lambda: pq.read_schema(path))
        _require_columns(schema.names, needed, str(path))
        frame = _read(path, "parquet", lambda: pd.read_parquet(path, columns=needed))
    elif suffix == ".csv":
        batches = list(transcript_csv_batches(path))
        schema = pa.schema([*((c, pa.float64()) for c in COORDS), (GENE_COLUMN, _GENE_TYPE)])
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
    panel = tuple(sorted(set(names))) if genes is None else _requested(genes)
    _gene_index(sorted(set(names)), panel, source)  # names missing requested genes
    where = {g: i for i, g in enumerate(panel)}
    codes = np.array([where.get(n, -1) for n in names], dtype=np.int64)[category.codes]
    keep = codes >= 0
    xyz = np.stack([_numeric(frame, c, c, source) for c in COORDS], axis=1)[keep]
    counts = np.zeros((int(keep.sum()), len(panel)), dtype=np.float32)
    counts[np.arange(len(counts)), codes[keep]] = 1.0
    return validate_cells(CellTable(_positions_zyx(xyz, source), counts, panel), source)


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
    path = _existing(path)
    source = str(path)
    header = _csv_header(path)
    _require_columns(header, COORDS, source)
    dup = [c for c in _duplicates(header) if c in COORDS]
    if dup:
        raise InputError(f"{source}: duplicated columns {_names(dup)}")
    skip = {*COORDS, *metadata}
    gene_cols = [i for i, name in enumerate(header) if name not in skip]
    index = _gene_index([header[i] for i in gene_cols], genes, source)
    coord_cols = [header.index(c) for c in COORDS]
    id_col = header.index("cell_id") if "cell_id" in header else None
    chosen = [gene_cols[j] for j in index]
    types = {i: pa.float64() for i in (*coord_cols, *chosen)}
    hints = dict.fromkeys(coord_cols, _COORD_HINT) | dict.fromkeys(chosen, _GENE_HINT)
    if id_col is not None and id_col not in types:
        types[id_col] = pa.string()
    schema = pa.schema([(str(i), t) for i, t in types.items()])
    frame = pa.Table.from_batches(list(_csv_stream(path, header, types, hints)), schema)
    if frame.num_rows == 0:
        raise InputError(f"{source}: empty table (no cells)")

    def column(i: int) -> np.ndarray:
        return frame.column(str(i)).to_numpy()

    xyz = np.stack([column(i) for i in coord_cols], axis=1)
    counts = np.stack([column(i) for i in chosen], axis=1) if chosen else np.zeros((len(xyz), 0))
    names = tuple(header[i] for i in chosen)
    table = CellTable(
        _positions_zyx(xyz, source),
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
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        table = read_anndata(path, genes)
    elif suffix in TABLE_SUFFIXES:
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
