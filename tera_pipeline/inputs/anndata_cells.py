"""AnnData cell tables: positions from ``obsm`` (x, y, z µm; or x, y with z in ``obs``) or, as
the Allen Brain Cell atlas ships them, from a ``cell_metadata.csv`` beside the file (``cell_label``
with x, y, z in mm); counts from ``X`` or a layer; genes by ``var`` name or, for atlases whose
``var`` index is Ensembl ids, by a gene-symbol column of ``var``. Cell labels are kept."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.cell_checks import positions_zyx, validate_cells
from tera_pipeline.inputs.files import PathLike, existing_file, name_list, read_user_file
from tera_pipeline.inputs.panel import gene_index
from tera_pipeline.inputs.synthetic import CellTable

Z_COLUMNS = ("z", "z_um", "z_position")
"""``obs`` columns read as z (µm) when ``obsm["spatial"]`` holds (x, y) only."""
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name", "symbol")
"""``var`` columns of gene symbols, used when the requested genes are not ``var`` names."""
ATLAS_METADATA = "cell_metadata.csv"
"""The Allen Brain Cell atlas's positions file, looked for beside an ``.h5ad`` without them."""
ATLAS_COLUMNS = ("cell_label", "x", "y", "z")
"""Its key and coordinates (mm, the atlas's reconstructed section coordinates)."""
MM_TO_UM = 1000.0

log = logging.getLogger("tera_pipeline.inputs")


def atlas_positions(adata, metadata: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, z) µm of the cells of ``adata`` that ``metadata`` places (joined on its
    ``cell_label`` and ``obs_names``), and the mask of those cells; the others are counted."""
    import pandas as pd

    header = pd.read_csv(metadata, nrows=0).columns
    missing = [c for c in ATLAS_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{metadata}: not an atlas cell_metadata.csv: missing columns {name_list(missing)} "
            f"(need {', '.join(ATLAS_COLUMNS)}, x y z in mm)"
        )
    table = pd.read_csv(
        metadata, usecols=list(ATLAS_COLUMNS), dtype={"cell_label": str}, index_col="cell_label"
    )
    if table.index.has_duplicates:
        raise InputError(
            f"{metadata}: cell_label repeats ({table.index[table.index.duplicated()][0]!r})"
        )
    labels = pd.Index([str(n) for n in adata.obs_names])
    rows = table.index.get_indexer(labels)
    placed = rows >= 0
    if not placed.any():
        raise InputError(
            f"{source}: none of its {len(labels)} cells (obs_names such as {labels[0]!r}) is a "
            f"cell_label of {metadata}"
        )
    if not placed.all():
        log.warning(
            "%s: %d of %d cells have no row in %s and are left out",
            source, int((~placed).sum()), len(labels), metadata.name,
        )  # fmt: skip
    xyz = table[["x", "y", "z"]].to_numpy(np.float64)[rows[placed]] * MM_TO_UM
    log.info("%s: positions from %s (mm -> µm), %d cells", source, metadata.name, int(placed.sum()))
    return xyz, placed


def _xyz(adata, spatial_key: str, source: str) -> np.ndarray:
    """(N, 3) x, y, z µm: ``obsm[spatial_key]``, with z from ``obs`` when it is (x, y)."""
    xy = np.asarray(adata.obsm[spatial_key])
    if xy.ndim != 2 or xy.shape[1] != 2:
        return xy
    column = next((c for c in Z_COLUMNS if c in adata.obs.columns), None)
    if column is None:
        raise InputError(
            f"{source}: obsm[{spatial_key!r}] holds (x, y) only: give z in µm as obs['z'] "
            "(0 for a single section)"
        )
    z = np.asarray(adata.obs[column], dtype=np.float64)
    return np.column_stack([xy.astype(np.float64), z])


def _gene_names(adata, genes: Sequence[str] | None) -> list[str]:
    """``var_names``, or a symbol column when it, not they, holds the requested genes."""
    names = [str(g) for g in adata.var_names]
    if genes is None or all(g in set(names) for g in genes):
        return names
    for column in SYMBOL_COLUMNS:
        if column in adata.var.columns:
            symbols = [str(g) for g in adata.var[column]]
            if sum(g in set(symbols) for g in genes) > sum(g in set(names) for g in genes):
                return symbols
    return names


def read_anndata(
    path: PathLike,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    spatial_key: str = "spatial",
    cell_metadata: PathLike | None = None,
) -> CellTable:
    """An ``.h5ad`` with ``obsm[spatial_key]`` as (x, y, z) µm, or positions in an atlas
    ``cell_metadata`` (default: ``cell_metadata.csv`` beside it), and counts in X (or
    ``layer``)."""
    import anndata

    path = existing_file(path)
    adata = read_user_file(path, "h5ad", lambda: anndata.read_h5ad(path))
    source = str(path)
    metadata = Path(cell_metadata) if cell_metadata else path.with_name(ATLAS_METADATA)
    if spatial_key in adata.obsm:
        xyz = _xyz(adata, spatial_key, source)
    elif cell_metadata is not None or metadata.is_file():
        xyz, placed = atlas_positions(adata, existing_file(metadata), source)
        adata = adata[placed]
    else:
        raise InputError(
            f"{source}: no obsm[{spatial_key!r}] with (x, y, z) cell positions, and no "
            f"{ATLAS_METADATA} beside it (an atlas's cell_label, x, y, z in mm)"
        )
    position = positions_zyx(xyz, source)
    available = _gene_names(adata, genes)
    index = gene_index(available, genes, source)
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{source}: no layer {layer!r} (layers: {name_list(adata.layers.keys())})")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise InputError(f"{source}: no count matrix X")
    selected = matrix[:, index]
    dense = selected.toarray() if hasattr(selected, "toarray") else np.asarray(selected)
    counts = np.ascontiguousarray(dense, dtype=np.float32)
    names = tuple(available[i] for i in index)
    labels = np.asarray([str(n) for n in adata.obs_names], dtype=object)
    table = validate_cells(CellTable(position, counts, names, cell_label=labels), source)
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
