"""The job store: one zarr v3 group; big arrays created and written with TensorStore.

Arrays are sharded (blosc-zstd inner chunks) with ``dimension_names`` set, and the group holds
1-D coordinate arrays in µm, so ``xarray.open_zarr(path)`` gives named dimensions and physical
coordinates. Writes are whole shards by one writer. TensorStore is not fork-safe: processes that
use it are spawned (Dask's default for local workers).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from tera_pipeline.geometry import Box, Shape

SCRATCH = "_scratch"


class StoreError(RuntimeError):
    """A store that cannot be used as asked (exists already, missing array, ...)."""


@dataclass(frozen=True)
class ArraySpec:
    """Layout of one array: shape, dtype, named dimensions, shard and inner chunk shapes."""

    name: str
    shape: Shape
    dtype: str
    dims: tuple[str, ...]
    shard: Shape
    chunk: Shape
    fill: float = 0
    attributes: dict[str, Any] | None = None
    compression_level: int = 3


def _tensorstore_spec(path: Path, spec: ArraySpec | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if spec is None:
        return out
    shuffle = "bitshuffle" if np.dtype(spec.dtype).itemsize == 1 else "shuffle"
    inner = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {
            "name": "blosc",
            "configuration": {
                "cname": "zstd",
                "clevel": spec.compression_level,
                "shuffle": shuffle,
                "typesize": np.dtype(spec.dtype).itemsize,
            },
        },
    ]
    out["metadata"] = {
        "shape": list(spec.shape),
        "data_type": spec.dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(spec.shard)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": spec.fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(spec.chunk),
                    "codecs": inner,
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": list(spec.dims),
        "attributes": spec.attributes or {},
    }
    return out


def create_array(root: Path, spec: ArraySpec) -> ts.TensorStore:
    """Create (or replace) an array ``root/spec.name``."""
    full = _tensorstore_spec(root / spec.name, spec)
    return ts.open(full, create=True, delete_existing=True).result()


@lru_cache(maxsize=64)
def _open_cached(path: str) -> ts.TensorStore:
    return ts.open(_tensorstore_spec(Path(path)), open=True).result()


def open_array(root: Path, name: str) -> ts.TensorStore:
    """Open an existing array (handles are cached per process)."""
    path = Path(root) / name
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{root} has no array {name!r}")
    return _open_cached(str(path.resolve()))


def forget_handles() -> None:
    """Drop cached handles (after arrays were deleted or recreated)."""
    _open_cached.cache_clear()


def read_box(array: ts.TensorStore, box: Box, fill: float = 0.0) -> np.ndarray:
    """Read a spatial box (the last ``box.ndim`` axes) with ``fill`` beyond the array's edge."""
    lead = tuple(array.shape[: array.rank - box.ndim])
    spatial = Box((0,) * box.ndim, tuple(array.shape[array.rank - box.ndim :]))
    out = np.full((*lead, *box.shape), fill, dtype=array.dtype.numpy_dtype)
    part = box.intersect(spatial)
    if not part.empty:
        index = (Ellipsis, *part.slices())
        out[(Ellipsis, *part.slices(box))] = array[index].read().result()
    return out


def write_box(array: ts.TensorStore, box: Box, data: np.ndarray) -> None:
    """Write ``data`` (all leading axes, spatial ``box``) to the array."""
    array[(Ellipsis, *box.slices())].write(
        data.astype(array.dtype.numpy_dtype, copy=False)
    ).result()


def create_group(root: Path, coords: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
    """Create the zarr v3 group with 1-D coordinate arrays (values, attributes) and attributes."""
    import xarray as xr

    variables = {
        name: xr.Variable((name,), values, attrs=coord_attrs)
        for name, (values, coord_attrs) in coords.items()
    }
    ds = xr.Dataset(coords=variables, attrs=attrs)
    ds.to_zarr(root, zarr_format=3, mode="w-", consolidated=False)


def update_attrs(root: Path, attrs: dict) -> None:
    """Merge ``attrs`` into the group's attributes."""
    meta_path = Path(root) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {}).update(attrs)
    meta_path.write_text(json.dumps(meta, indent=2))


def group_attrs(root: Path) -> dict:
    return json.loads((Path(root) / "zarr.json").read_text()).get("attributes", {})


def consolidate(root: Path) -> None:
    """Write consolidated metadata so xarray opens the store in one read."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is not yet in the v3 spec
        zarr.consolidate_metadata(str(root))


def remove(root: Path, name: str) -> None:
    shutil.rmtree(Path(root) / name, ignore_errors=True)
    forget_handles()
