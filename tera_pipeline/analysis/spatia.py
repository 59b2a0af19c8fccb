"""SPATIA over the chunk grid: cell embeddings, types, imputed genes, niche and tissue embeddings.

Block tasks (``tasks.run_blocks``) on the job's block grid: a cell belongs to the block that
holds its centroid voxel; the block reads the image over its core grown by the crop's halo (fill
0 beyond the volume), crops every cell, runs the cell encoder in fixed-size batches, then the
niche transformer over each niche of its core. Niches are boxes of a fixed global grid (from the
checkpoint's niche size in µm), so a niche's cells and its embedding do not depend on the block
size; the block grid is coarsened to whole niches when the job's block is not a multiple of one.
A second pass of tasks runs the tissue transformer over tissue tiles of niches.

Outputs: ``<store stem>.spatia.h5ad`` next to the store (X = counts, obsm ``X_spatia`` the fused
cell embedding, ``X_spatia_niche`` the cell in its niche, ``spatial`` (x, y, z) µm; layer
``imputed``; obs predicted type and probability, niche index, crop inside fraction), and in the
store ``spatia_niche`` (zniche, yniche, xniche, feature), ``spatia_niche_cells`` and
``spatia_tissue`` (ztissue, ytissue, xtissue, feature), with µm coordinates; the cells also as
SpatialData elements in the store (``spatial_elements.write_cells``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.checkpoint import load_spatia, read_metadata
from models.spatia import Spatia
from tera_pipeline.analysis import spatial_elements
from tera_pipeline.analysis.cells import (
    cell_voxels,
    centred,
    crop_halo,
    extract_crops,
    inside_fraction,
    niche_positions,
)
from tera_pipeline.analysis.spatia_model import contextualise, encode_cells, group_by
from tera_pipeline.analysis.spatia_plan import Plan, SpatiaError, plan
from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.inputs.synthetic import CellTable
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.cluster import gpu_task
from tera_pipeline.runtime.model_cache import worker_model
from tera_pipeline.storage import layout, ownership, store

PARTS_MARKER = ".tera-spatia-parts"
NICHE_ARRAY = "spatia_niche"
NICHE_CELLS = "spatia_niche_cells"
TISSUE_ARRAY = "spatia_tissue"
H5AD_SUFFIX = ".spatia.h5ad"


# -- block tasks ----------------------------------------------------------------------------------
def get_model(checkpoint: str) -> Spatia:
    """The worker's cached model (loaded once per process), on the worker's GPU if it has one."""
    return worker_model(load_spatia, checkpoint)[0]


def cells_in(source, box: Box, spacing_um: Sequence[float]) -> CellTable:
    """Cells whose centroid voxel lies in ``box``, sorted by id (row numbers of a user table
    without ids)."""
    from tera_pipeline.inputs.conditioning import TableSource

    if isinstance(source, TableSource):
        table = source.table
        if table.cell_id is None:
            table = replace(table, cell_id=np.arange(len(table), dtype=np.int64))
        v = cell_voxels(table.position_um, spacing_um)
        inside = np.all((v >= np.asarray(box.begin)) & (v < np.asarray(box.end)), axis=1)
        cells = table.select(inside)
    else:
        cells = source.cells(box)
        v = cell_voxels(cells.position_um, spacing_um)
        cells = cells.select(np.all((v >= np.asarray(box.begin)) & (v < np.asarray(box.end)), 1))
    return cells.select(np.argsort(cells.cell_id, kind="stable"))


@gpu_task
def spatia_block(p: Plan, index: tuple[int, ...]) -> tasks.BlockStats:
    """Embed every cell whose centroid is in the block, and every niche of its core."""
    import time

    from tera_pipeline.inputs.conditioning import open_source

    t0 = time.perf_counter()
    model = get_model(p.checkpoint)
    job, root = p.job, Path(p.job.out)
    sp = job.volume.spacing_um
    core = p.grid.block(index).core
    niches = Box(
        tuple(b // n for b, n in zip(core.begin, p.niche, strict=True)),
        tuple(-(-s // n) for s, n in zip(core.shape, p.niche, strict=True)),
    )
    cells = cells_in(open_source(job, p.genes), core, sp)
    e = model.cfg.embed_dim
    niche_emb = np.full((*niches.shape, e), np.nan, np.float32)
    niche_count = np.zeros(niches.shape, np.int32)
    if len(cells):
        voxels = cell_voxels(cells.position_um, sp)
        below, above = crop_halo(p.crop)
        frame = core.grow(below, above)
        image = store.read_box(store.open_array(root, layout.IMAGE), frame)
        crops = extract_crops(image, frame, voxels, p.crop)
        mask = None
        if p.masked:
            mask = np.zeros((len(cells), len(p.genes)), bool)
            mask[:, [p.genes.index(g) for g in p.masked]] = True
        enc = encode_cells(model, crops, cells.counts, mask)
        index3, pos = niche_positions(voxels, p.niche)
        keys, groups = group_by(index3)
        context, pooled = contextualise(model.niche, enc["embedding"], pos, groups)
        local = keys - np.asarray(niches.begin)
        niche_emb[tuple(local.T)] = pooled
        niche_count[tuple(local.T)] = [len(g) for g in groups]
        _write_part(p, index, cells, voxels, index3, enc, context)
    store.write_box(_fresh(root, NICHE_ARRAY), niches, np.moveaxis(niche_emb, -1, 0))
    store.write_box(_fresh(root, NICHE_CELLS), niches, niche_count)
    return tasks.BlockStats(items=len(cells), total_s=time.perf_counter() - t0)


def _fresh(root: Path, name: str):
    """An uncached handle: SPATIA's arrays are recreated by every run (their shards follow the
    analysis blocks), so a worker's cached handle from an earlier run would be stale."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(root) / name)}}
    return ts.open(spec, open=True).result()


@gpu_task
def tissue_block(p: Plan, index: tuple[int, ...]) -> tasks.BlockStats:
    """The tissue transformer over the non-empty niches of one tissue tile."""
    model = get_model(p.checkpoint)
    root = Path(p.job.out)
    tile = Box(tuple(i * t for i, t in zip(index, p.tissue, strict=True)), p.tissue).intersect(
        Box((0, 0, 0), p.niche_grid)
    )
    emb = store.read_box(_fresh(root, NICHE_ARRAY), tile)  # (E, *tile)
    count = store.read_box(_fresh(root, NICHE_CELLS), tile)
    present = np.argwhere(count > 0)
    out = np.full((emb.shape[0], 1, 1, 1), np.nan, np.float32)
    if len(present):
        features = np.ascontiguousarray(emb[(slice(None), *present.T)].T)
        niche_idx = present + np.asarray(tile.begin)
        pos = centred(niche_idx + 0.5, np.asarray(index), p.tissue)
        _, pooled = contextualise(model.tissue, features, pos, [np.arange(len(present))])
        out[:, 0, 0, 0] = pooled[0]
    store.write_box(_fresh(root, TISSUE_ARRAY), Box(index, (1, 1, 1)), out)
    return tasks.BlockStats(items=len(present))


def _write_part(p: Plan, index, cells: CellTable, voxels, niche_index, enc, context) -> None:
    """One block's cells as an AnnData file (concatenated into the final .h5ad)."""
    import anndata
    import pandas as pd

    obs = pd.DataFrame(
        {
            "cell_id": cells.cell_id.astype(np.int64),
            "z_um": cells.position_um[:, 0],
            "y_um": cells.position_um[:, 1],
            "x_um": cells.position_um[:, 2],
            "zniche": niche_index[:, 0],
            "yniche": niche_index[:, 1],
            "xniche": niche_index[:, 2],
            "crop_inside": inside_fraction(voxels, p.crop, p.job.volume.shape),
        },
        index=cells.names(),  # the input's cell labels where it has them
    )
    names = p.uns["cell_types"]
    if enc["type_prob"] is not None and names:
        best = enc["type_prob"].argmax(axis=1)
        obs["predicted_type"] = pd.Categorical.from_codes(best, categories=names)
        obs["predicted_type_prob"] = enc["type_prob"].max(axis=1)
    if cells.cell_type is not None and names:
        obs["cell_type"] = pd.Categorical.from_codes(cells.cell_type, categories=names)
    adata = anndata.AnnData(
        X=cells.counts.astype(np.float32),
        obs=obs,
        var=pd.DataFrame({"masked": [g in p.masked for g in p.genes]}, index=list(p.genes)),
        obsm={
            "X_spatia": enc["embedding"],
            "X_spatia_niche": context,
            "spatial": np.ascontiguousarray(cells.position_um[:, ::-1]),
        },
        layers={"imputed": enc["imputed"].astype(np.float32)},
    )
    Path(p.parts).mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(Path(p.parts) / f"{'-'.join(f'{i:06d}' for i in index)}.h5ad")


# -- the run ------------------------------------------------------------------------------------
def prepare(p: Plan) -> None:
    """Create the niche and tissue arrays (replacing earlier ones) and their coordinates."""
    root = Path(p.job.out)
    e = read_metadata(Path(p.checkpoint))["config"]["embed_dim"]
    per_block = tuple(b // n for b, n in zip(p.block, p.niche, strict=True))
    nan = float("nan")
    feature = "spatia_feature"
    specs = [
        store.ArraySpec(
            NICHE_ARRAY,
            (e, *p.niche_grid),
            "float32",
            (feature, "zniche", "yniche", "xniche"),
            (e, *per_block),
            fill=nan,
            attributes={"long_name": "SPATIA niche embedding (NaN: no cells)"},
        ),
        store.ArraySpec(
            NICHE_CELLS,
            p.niche_grid,
            "int32",
            ("zniche", "yniche", "xniche"),
            per_block,
            attributes={"long_name": "cells per niche"},
        ),
        store.ArraySpec(
            TISSUE_ARRAY,
            (e, *p.tissue_grid),
            "float32",
            (feature, "ztissue", "ytissue", "xtissue"),
            (e, 1, 1, 1),
            fill=nan,
            attributes={"long_name": "SPATIA tissue embedding"},
        ),
    ]
    for spec in specs:
        store.create_array(root, spec)
    tile = tuple(n * t for n, t in zip(p.niche, p.tissue, strict=True))
    coords = {feature: (np.arange(e), {})}
    coords |= layout.grid_coordinates(p.job.volume, "niche", p.niche_grid, p.niche)
    coords |= layout.grid_coordinates(p.job.volume, "tissue", p.tissue_grid, tile)
    store.add_coordinates(root, coords)
    ownership.make_side_dir(Path(p.parts), PARTS_MARKER)  # fresh; only a folder of ours is reused


def h5ad_path(root: Path) -> Path:
    root = Path(root)
    return root.parent / f"{root.stem}{H5AD_SUFFIX}"


def assemble(p: Plan) -> Path:
    """Concatenate the blocks' AnnData parts (on disk) into the final .h5ad; remove the parts."""
    from anndata.experimental import concat_on_disk

    parts = sorted(Path(p.parts).glob("*.h5ad"))
    if not parts:
        raise SpatiaError(f"{p.job.out}: the cell source has no cells in the volume")
    out = h5ad_path(Path(p.job.out))
    ownership.check_side_file(Path(p.job.out), out)  # replace only our own earlier table
    out.unlink(missing_ok=True)
    concat_on_disk(parts, out, merge="same")
    import h5py
    from anndata.io import write_elem

    info = {**p.uns, "spacing_um": list(p.job.volume.spacing_um)}
    with h5py.File(out, "a") as f:  # run-level facts, written once
        if "uns" in f:
            write_elem(f["uns"], "spatia", info)
        else:
            write_elem(f, "uns", {"spatia": info})
    ownership.remove_side_dir(Path(p.parts), PARTS_MARKER)
    ownership.record_side_file(Path(p.job.out), out)
    return out


def run(
    root: Path,
    client,
    checkpoint: Path | None = None,
    masked: Sequence[str] = (),
    progress=None,
    block: Shape | None = None,
) -> dict:
    """SPATIA over every block, then every tissue tile; writes the .h5ad and the store arrays."""
    root = Path(root)
    p, _ = plan(root, checkpoint, masked, block)
    prepare(p)
    grid, tiles = p.grid, p.tissue_grid
    cell_phase = tasks.BlockTask(
        "spatia cells", spatia_block, (p,), np.ndindex(*grid.shape), grid.num_blocks
    )
    cells = tasks.run_task(client, p.job, cell_phase, progress)
    tissue_phase = tasks.BlockTask(
        "spatia tissue", tissue_block, (p,), np.ndindex(*tiles), math.prod(tiles)
    )
    tasks.run_task(client, p.job, tissue_phase, progress)
    out = assemble(p)
    attrs = {"h5ad": str(out), "cells": cells.stats.items, **p.uns}
    store.update_attrs(root, {"spatia": attrs})
    spatial_elements.write_cells(root, out)  # points/cells and tables/spatia; consolidates
    return {
        "h5ad": str(out),
        "store": str(root),
        "cells": cells.stats.items,
        "blocks": grid.num_blocks,
        "block": list(p.block),
        "niches": list(p.niche_grid),
    }
