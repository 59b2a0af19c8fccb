"""AnnData cell tables: positions from ``obsm`` (x, y, z µm; or x, y with z in ``obs``), counts
from ``X`` or a layer, genes by ``var`` name or, for atlases whose ``var`` index is Ensembl ids
(the Allen Brain Cell atlas), by a gene-symbol column of ``var``."""

from __future__ import annotations

from collections.abc import Sequence

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
) -> CellTable:
    """An ``.h5ad`` with ``obsm[spatial_key]`` as (x, y, z) µm and counts in X (or ``layer``)."""
    import anndata

    path = existing_file(path)
    adata = read_user_file(path, "h5ad", lambda: anndata.read_h5ad(path))
    source = str(path)
    if spatial_key not in adata.obsm:
        raise InputError(f"{source}: no obsm[{spatial_key!r}] with (x, y, z) cell positions")
    position = positions_zyx(_xyz(adata, spatial_key, source), source)
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
