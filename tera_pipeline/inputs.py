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

Every problem raises ``InputError`` with a one-line message, before anything is written.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

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


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise InputError(f"{path}: empty file (no header line)")
    return [h.strip() for h in header]


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
    genes: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
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
    return validate_cells(CellTable(position, counts, names), source)


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
        _require_columns(_csv_header(path), needed, str(path))
        frame = _read(path, "CSV", lambda: pd.read_csv(path, usecols=needed))
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
    """A cell CSV: x, y, z (µm) and one numeric column per gene; ``metadata`` columns ignored."""
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
    id_col = [header.index("cell_id")] if "cell_id" in header else []
    chosen = [gene_cols[j] for j in index]
    usecols = [*coord_cols, *chosen, *id_col]
    names = list(range(len(header)))  # by position: duplicated names stay distinct
    frame = _read(path, "CSV", lambda: pd.read_csv(path, header=0, names=names, usecols=usecols))
    if len(frame) == 0:
        raise InputError(f"{source}: empty table (no cells)")
    xyz = np.stack([_numeric(frame, i, header[i], source) for i in coord_cols], axis=1)
    counts = [_numeric(frame, i, header[i], source) for i in chosen]
    table = CellTable(
        _positions_zyx(xyz, source),
        np.stack(counts, axis=1).astype(np.float32) if counts else np.zeros((len(frame), 0)),
        tuple(header[i] for i in chosen),
        cell_id=_cell_ids(frame, id_col),
    )
    return validate_cells(table, source)


def _cell_ids(frame: pd.DataFrame, id_col: list[int]) -> np.ndarray | None:
    if not id_col or not pd.api.types.is_integer_dtype(frame[id_col[0]].dtype):
        return None
    return frame[id_col[0]].to_numpy(dtype=np.int64)


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
