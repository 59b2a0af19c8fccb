"""The checks every cell table passes: positions as (z, y, x) µm, shapes, names, finite counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.files import duplicated, name_list
from tera_pipeline.inputs.synthetic import CellTable


def positions_zyx(xyz: np.ndarray, source: str) -> np.ndarray:
    """(N, 3) atlas (x, y, z) µm -> float64 (z, y, x); other shapes are an error."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(
            f"{source}: coordinates of the wrong dimensionality: shape {xyz.shape}, "
            "need (cells, 3) as (x, y, z) in µm"
        )
    return np.ascontiguousarray(xyz[:, ::-1], dtype=np.float64)


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
    dup = duplicated(table.genes)
    if dup:
        raise InputError(f"{source}: duplicated gene names {name_list(dup)}")
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
                f"(genes {name_list(genes[c] for c in cols)})"
            )
