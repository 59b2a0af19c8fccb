"""SpatialData elements inside a store: SPATIA's cells and the bin grid, each with its table.

The store's root stays the OME-Zarr 0.5 image; beside it, in SpatialData's on-disk format
(container 0.2, read by ``spatialdata.read_zarr(store)``):

- ``points/cells``: one 3-D point per SPATIA cell, index ``cell_id``, x, y, z in µm of the
  volume frame (the .h5ad's ``spatial``); ``tables/spatia``: the .h5ad's content, annotating
  ``cells`` by ``cell_id``.
- ``labels/bins``: the bin grid as a label image of bin ids (1, 2, ... in C order over z, y, x;
  0 is no bin); ``tables/<array>`` for every (gene, zbin, ybin, xbin) array of the store
  (``conditioning``, ``magnet_expression``): one row per bin, genes as var, ``cell_count`` in
  obs when the store has it, annotating ``bins`` by ``bin_id``. A table holds at most
  ``TABLE_VALUES`` values: a larger grid's bins are summed into coarser ones (``coarsening``)
  and the full-resolution arrays stay in the store.

Every element maps to the coordinate system ``global``: the store's µm frame, volume origin
included (points: a translation; bins: bin size then translation). The image is not copied:
``images/`` stays empty (README: adding the root image lazily). ``labels/`` is also the root
image's OME-Zarr labels group; ``bins`` is not listed in it (not a segmentation of the image).

An element is written into a hidden folder and swapped in, so readers see the old one, none or
the new one; only an element carrying our ``tera_pipeline`` mark is replaced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.generation.pyramid import OME_VERSION
from tera_pipeline.storage import layout, store
from tera_pipeline.storage.atomic import write_json
from tera_pipeline.storage.ownership import OwnershipError

CELLS, BINS, SPATIA_TABLE = "cells", "bins", "spatia"
GLOBAL = "global"
REGION_KEY = "region"
GENE_BINS = ("gene", "zbin", "ybin", "xbin")
TABLE_VALUES = 2**27
"""Most values (bins x genes, float32: 512 MiB) a bin table holds."""
MARK = "tera_pipeline"
GROUP = {"zarr_format": 3, "node_type": "group"}
CONTAINER = {"version": "0.2"}
"""SpatialData's container format (zarr v3); its elements: tables 0.2, points 0.2, labels 0.3."""


# -- element folders ----------------------------------------------------------------------------
def _group(path: Path) -> None:
    """A zarr v3 group at ``path`` (an existing one is kept as it is). A new ``labels`` is also
    the root image's OME-Zarr labels group: it lists no label image (``bins`` is not one)."""
    if (path / "zarr.json").is_file():
        return
    if path.exists() or path.is_symlink():
        raise OwnershipError(f"refusing to write into {path}: it is not a zarr group")
    path.mkdir()
    attrs = {"ome": {"version": OME_VERSION, "labels": []}} if path.name == "labels" else {}
    write_json(path / "zarr.json", {**GROUP, "attributes": attrs})


def _replace(root: Path, kind: str, name: str, write: Callable[[Path], dict], mark: dict) -> None:
    """Write element ``kind/name`` with ``write`` (into a fresh folder; it returns the element's
    group attributes) and swap it in, replacing only an element we wrote."""
    _group(root / kind)
    target = root / kind / name
    if target.exists() or target.is_symlink():
        attrs = None if target.is_symlink() else _attrs(target)
        if not attrs or MARK not in attrs:
            raise OwnershipError(
                f"refusing to replace {target}: tera-pipeline did not write it; move it away first"
            )
    # a fresh hidden folder of this run's own (no reader lists it), removed if the write fails
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        attrs = write(tmp)
        meta = (
            json.loads((tmp / "zarr.json").read_text())
            if (tmp / "zarr.json").is_file()
            else dict(GROUP)
        )
        meta["attributes"] = {**meta.get("attributes", {}), **attrs, MARK: mark}
        write_json(tmp / "zarr.json", meta)
        if target.exists():
            store.remove(root, f"{kind}/{name}")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _attrs(node: Path) -> dict | None:
    try:
        return store.group_attrs(node)
    except store.StoreError:
        return None


def _finish(root: Path) -> None:
    """Mark the root as a SpatialData container and re-consolidate, so readers list the new
    elements."""
    store.update_attrs(root, {"spatialdata_attrs": CONTAINER})
    store.consolidate(root)


# -- coordinate systems (SpatialData's NGFF transformations with named systems) -----------------
def _system(name: str, axes: str) -> dict:
    unit = "micrometer" if name == GLOBAL else "unit"
    return {"name": name, "axes": [{"name": a, "type": "space", "unit": unit} for a in axes]}


def _transform(axes: str, kind: str, values: Sequence[float]) -> dict:
    return {"type": kind, kind: [float(v) for v in values],
            "input": _system(axes, axes), "output": _system(GLOBAL, axes)}  # fmt: skip


def to_global(axes: str, origin_zyx: Sequence[float], scale_zyx: Sequence[float] | None) -> dict:
    """Intrinsic -> ``global``: an optional scale, then the volume origin, on ``axes``."""
    order = ["zyx".index(a) for a in axes]
    shift = _transform(axes, "translation", [origin_zyx[i] for i in order])
    if scale_zyx is None:
        return shift
    scale = _transform(axes, "scale", [scale_zyx[i] for i in order])
    return {"type": "sequence", "transformations": [scale, shift],
            "input": _system(axes, axes), "output": _system(GLOBAL, axes)}  # fmt: skip


# -- tables ---------------------------------------------------------------------------------------
def _table(adata, region: str, instance_key: str) -> Callable[[Path], dict]:
    """A writer of ``adata`` as a SpatialData table annotating ``region`` (zarr v3)."""
    import anndata
    import dask
    import pandas as pd

    adata.obs[REGION_KEY] = pd.Categorical([region] * adata.n_obs)
    keys = {"region": region, "region_key": REGION_KEY, "instance_key": instance_key}
    adata.uns["spatialdata_attrs"] = keys

    def write(path: Path) -> dict:
        with (
            anndata.settings.override(zarr_write_format=3, auto_shard_zarr_v3=True),
            dask.config.set(scheduler="threads"),
        ):
            adata.write_zarr(path)
        return {"spatialdata-encoding-type": "ngff:regions_table", **keys, "version": "0.2"}

    return write


# -- SPATIA's cells -------------------------------------------------------------------------------
def write_cells(root: Path, h5ad: Path) -> dict:
    """``points/cells`` and ``tables/spatia`` from SPATIA's .h5ad (read lazily: X, layers and
    obsm are copied a block of rows at a time)."""
    import anndata
    import h5py
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    root = Path(root)
    origin = layout.job_of(root).volume.origin_um
    with h5py.File(h5ad, "r") as f:
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        rows = max(1, 2**24 // max(1, len(var)))  # 64 MiB of float32 per block of X

        def lazy(group: str) -> dict:
            return {k: read_elem_lazy(f[group][k]) for k in f[group]} if group in f else {}

        cells = anndata.AnnData(
            X=read_elem_lazy(f["X"], chunks=(rows, len(var))), obs=obs, var=var,
            obsm=lazy("obsm"), layers=lazy("layers"), uns=read_elem(f["uns"]) if "uns" in f else {},
        )  # fmt: skip
        mark = {"source": str(Path(h5ad).resolve()), "cells": cells.n_obs}
        _replace(root, "points", CELLS, _points(obs, origin), mark)
        _replace(root, "tables", SPATIA_TABLE, _table(cells, CELLS, "cell_id"), mark)
    _finish(root)
    return {"points": f"points/{CELLS}", "tables": [SPATIA_TABLE], "cells": len(obs)}


def _points(obs, origin_zyx: Sequence[float]) -> Callable[[Path], dict]:
    """A writer of the cells' centroids as a SpatialData points element (parquet)."""
    import pandas as pd

    table = pd.DataFrame(
        {a: obs[f"{a}_um"].to_numpy(np.float64) for a in "xyz"},
        index=pd.Index(obs["cell_id"].to_numpy(np.int64), name="cell_id"),
    )

    def write(path: Path) -> dict:
        (path / "points.parquet").mkdir(parents=True)
        table.to_parquet(path / "points.parquet" / "part.0.parquet", index=True)
        return {"encoding-type": "ngff:points", "axes": list("xyz"),
                "coordinateTransformations": [to_global("xyz", origin_zyx, None)],
                "spatialdata_attrs": {"version": "0.2"}}  # fmt: skip

    return write


# -- the bin grid -------------------------------------------------------------------------------
def coarsening(grid: Sequence[int], bin_um: Sequence[float], max_bins: int) -> tuple[int, ...]:
    """Factors (z, y, x) that sum ``grid``'s bins into at most ``max_bins``: doubled one axis at
    a time, the one whose (coarsened) bins are smallest in µm (x, then y, then z on a tie)."""
    factor = [1, 1, 1]
    while math.prod(-(-g // f) for g, f in zip(grid, factor)) > max(1, max_bins):
        grow = [a for a in range(3) if factor[a] < grid[a]]
        axis = min(grow, key=lambda a: (bin_um[a] * factor[a], -a))
        factor[axis] *= 2
    return tuple(factor)


def write_bins(root: Path, max_values: int = TABLE_VALUES) -> dict:
    """``labels/bins`` and a table per (gene, zbin, ybin, xbin) array of the store (none when
    the store has no such array)."""
    import anndata
    import pandas as pd
    import xarray as xr

    root = Path(root)
    job = layout.job_of(root)
    ds = xr.open_zarr(root, consolidated=False)
    names = [str(n) for n, v in ds.data_vars.items() if v.dims == GENE_BINS]
    if not names:
        return {}
    genes = [str(g) for g in ds["gene"].values]
    b, sp = job.conditioning.bin, job.volume.spacing_um
    grid = bin_box(Box((0, 0, 0), job.volume.shape), b).shape
    bin_um = tuple(n * s for n, s in zip(b, sp))
    factor = coarsening(grid, bin_um, max_values // len(genes))
    shape = tuple(-(-g // f) for g, f in zip(grid, factor))
    size_um = tuple(u * f for u, f in zip(bin_um, factor))
    ids = np.arange(1, math.prod(shape) + 1, dtype=np.uint32)
    mark = {"bin_voxels": list(b), "factor": list(factor), "bin_um": list(size_um)}
    _replace(root, "labels", BINS, _bin_labels(ids.reshape(shape), size_um, job.volume.origin_um),
             mark)  # fmt: skip
    index = np.stack(np.unravel_index(ids - 1, shape), axis=1)
    obs = pd.DataFrame(
        {"bin_id": ids, **{f"{a}bin": index[:, i] for i, a in enumerate("zyx")}},
        index=ids.astype(str),
    )
    if layout.CELL_COUNT in ds:
        obs[layout.CELL_COUNT] = _summed(ds[layout.CELL_COUNT], factor).ravel()
    spatial = (index[:, ::-1] + 0.5) * np.asarray(size_um[::-1])  # (x, y, z) µm, volume frame
    for name in names:
        counts = _summed(ds[name], factor).reshape(len(genes), -1).T
        table = anndata.AnnData(
            X=np.ascontiguousarray(counts, np.float32), obs=obs.copy(),
            var=pd.DataFrame(index=genes), obsm={"spatial": spatial},
            uns={"tera_pipeline": {"array": name, **mark}},
        )  # fmt: skip
        _replace(root, "tables", name, _table(table, BINS, "bin_id"), {"array": name, **mark})
    _finish(root)
    return {"labels": f"labels/{BINS}", "tables": names, "bins": len(ids), "factor": factor}


def _summed(array, factor: Sequence[int]) -> np.ndarray:
    """``array`` summed over ``factor`` windows of (zbin, ybin, xbin) (partial ones at the far
    edges hold the bins they have), computed by the active Dask scheduler."""
    if tuple(factor) != (1, 1, 1):
        windows = dict(zip(("zbin", "ybin", "xbin"), factor))
        array = array.coarsen(windows, boundary="pad").sum()
    return np.asarray(array.values)


def _bin_labels(ids: np.ndarray, size_um, origin_zyx) -> Callable[[Path], dict]:
    """A writer of the bin grid as a SpatialData labels element (OME-Zarr with SpatialData's
    transformation to ``global``; one level)."""
    import zarr

    def write(path: Path) -> dict:
        group = zarr.open_group(path, mode="w", zarr_format=3)
        chunks = tuple(min(n, c) for n, c in zip(ids.shape, (16, 512, 512)))
        group.create_array("s0", data=ids, chunks=chunks, dimension_names=("z", "y", "x"))
        multiscale = {
            "name": BINS,
            "axes": [{"name": a, "type": "space"} for a in "zyx"],
            "datasets": [
                {
                    "path": "s0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}],
                }
            ],  # fmt: skip
            "coordinateTransformations": [to_global("zyx", origin_zyx, size_um)],
        }
        ome = {"version": "0.5-dev-spatialdata", "multiscales": [multiscale],
               "image-label": {"version": "0.5"}}  # fmt: skip
        return {"ome": ome, "spatialdata_attrs": {"version": "0.3"}}

    return write
