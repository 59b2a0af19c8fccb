"""What a user's input holds, read out of core: layout, units, extent, genes, counts, cells."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tera_pipeline.core.transcript_spec import TranscriptSpec
from tera_pipeline.inputs import vendors
from tera_pipeline.inputs.files import existing_file


def inspect_input(
    path: Path,
    spec: TranscriptSpec | None = None,
    panel: Sequence[str] | None = None,
    spacing_um: Sequence[float] = (4.0, 1.0, 1.0),
    block: Sequence[int] = (16, 128, 128),
) -> dict:
    """A summary of an input file: its detected format, units, extent (µm), genes (and their
    overlap with ``panel``), rows kept and dropped (and why), cells, and the volume it fills."""
    path, spec = Path(path), spec or TranscriptSpec()
    if not path.is_dir():
        existing_file(path)
    info = _transcripts(path, spec) if vendors.is_transcript_table(path) else _cells(path)
    if panel is not None:
        present = set(info.pop("_names"))
        info["panel"] = {
            "genes": len(panel),
            "present": sum(g in present for g in panel),
            "missing": [g for g in panel if g not in present][:20],
        }
    else:
        info.pop("_names")
    lo, hi = info["extent_um"]["min"], info["extent_um"]["max"]
    if all(math.isfinite(v) for v in (*lo, *hi)):
        origin = [float(math.floor(v)) if v < 0 or v > 16 * s else 0.0
                  for v, s in zip(reversed(lo), spacing_um, strict=True)]  # fmt: skip
        shape = [
            max(1, math.ceil((h - o) / s / b)) * b
            for h, o, s, b in zip(reversed(hi), origin, spacing_um, block, strict=True)
        ]  # z, y, x voxels from the origin (kept at 0 for positions near it), whole blocks
        info["volume"] = {"shape_zyx": shape, "origin_um": origin, "spacing_um": list(spacing_um)}
    return info


def _transcripts(path: Path, spec: TranscriptSpec) -> dict:
    read = vendors.open_reading(path, spec)
    dropped: Counter = Counter()
    genes: Counter = Counter()
    cells: set = set()
    extent = vendors.Extent()
    kept = 0
    for batch in vendors.batches(path, read, dropped):
        kept += len(batch.xyz)
        extent.add(batch.xyz)
        per_name = np.bincount(batch.index, minlength=len(batch.names))
        genes.update({n: int(c) for n, c in zip(batch.names, per_name) if c})
        if batch.cells is not None:
            cells.update(pc.unique(batch.cells.cast(pa.string())).to_pylist())
    rows = kept + sum(dropped.values())
    no_cell = {*read.layout.no_cell, None, ""}
    return {
        "path": str(path),
        "kind": "transcripts",
        "format": read.describe(),
        "rows": rows,
        "kept": kept,
        "dropped": dict(dropped),
        "genes": len(genes),
        "top_genes": [g for g, _ in genes.most_common(10)],
        "cells": len(cells - no_cell) if read.layout.cell else None,
        "extent_um": {"min": extent.lo.tolist(), "max": extent.hi.tolist(), "axes": "x, y, z"},
        "_names": list(genes),
    }


def _cells(path: Path) -> dict:
    from tera_pipeline.inputs.anndata_cells import ATLAS_METADATA
    from tera_pipeline.inputs.cells import load_cells

    table = load_cells(path)
    kind = "h5ad" if path.suffix.lower() == ".h5ad" else "cell table"
    if kind == "h5ad" and _atlas(path):
        kind = f"allen atlas h5ad, positions from {ATLAS_METADATA} (mm)"
    xyz = np.asarray(table.position_um)[:, ::-1]
    totals = np.asarray(table.counts).sum(axis=0)
    order = np.argsort(-totals)[:10]
    return {
        "path": str(path),
        "kind": "cells",
        "format": kind,
        "rows": len(table),
        "kept": len(table),
        "dropped": {},
        "genes": len(table.genes),
        "top_genes": [table.genes[i] for i in order],
        "cells": len(table),
        "extent_um": {
            "min": xyz.min(axis=0).tolist(),
            "max": xyz.max(axis=0).tolist(),
            "axes": "x, y, z",
        },  # fmt: skip
        "_names": list(table.genes),
    }


def _atlas(path: Path) -> bool:
    """Whether an h5ad's positions came from the atlas metadata beside it (no obsm spatial)."""
    import h5py

    from tera_pipeline.inputs.anndata_cells import ATLAS_METADATA

    with h5py.File(path, "r") as f:
        has_spatial = "obsm" in f and "spatial" in f["obsm"]
    return not has_spatial and (path.with_name(ATLAS_METADATA)).is_file()


def summary_lines(info: dict) -> list[str]:
    """The summary as a person reads it."""
    lo, hi = info["extent_um"]["min"], info["extent_um"]["max"]
    span = " x ".join(f"[{a:.4g}, {b:.4g}]" for a, b in zip(lo, hi, strict=True))
    lines = [
        f"{info['path']}: {info['kind']}, {info['format']}",
        f"rows: {info['rows']:,}; kept {info['kept']:,}"
        + "".join(f"; dropped {n:,} {why}" for why, n in info["dropped"].items() if n),
        f"extent (x, y, z): {span} µm",
        f"genes: {info['genes']} (most frequent: {', '.join(info['top_genes'][:6])})",
    ]
    if info["cells"] is None:
        lines.append("cells: not known (a transcript table without cell ids)")
    else:
        lines.append(f"cells: {info['cells']:,}")
    if "panel" in info:
        p = info["panel"]
        miss = f"; missing {', '.join(p['missing'][:8])}" if p["missing"] else ""
        lines.append(f"checkpoint panel: {p['present']} of {p['genes']} genes present{miss}")
    if "volume" in info:
        v = info["volume"]
        shape = ",".join(map(str, v["shape_zyx"]))
        where = "" if not any(v["origin_um"]) else f" from volume.origin_um {v['origin_um']}"
        lines.append(
            f"fills a volume of --shape {shape} voxels{where} at {v['spacing_um']} µm (z, y, x)"
        )
    return lines
