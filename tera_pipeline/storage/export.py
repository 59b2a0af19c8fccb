"""``tera export --format ome-zarr-0.4``: an unsharded zarr v2 copy of a finished store, in
OME-Zarr 0.4, for readers older than zarr v3 (Fiji/BigDataViewer through n5-zarr, older napari).

The copy ``DEST`` holds:

- at its root, only the group metadata: ``multiscales`` (version 0.4) and ``omero``, converted
  from the store's OME-NGFF 0.5 ``ome`` attributes (same axes, scales and translations in µm);
- one group per level, ``0``, ``1``, ..., holding ``image`` (c, z, y, x) and its own coordinates
  ``c``, ``z``, ``y``, ``x`` (µm): the multiscales datasets are ``0/image``, ``1/image``, ...;
- ``bins``: ``conditioning``, ``cell_count`` and ``magnet_expression`` (when present) with their
  ``gene``, ``zbin``, ``ybin``, ``xbin`` coordinates.

The root holds no array, so each group aligns with it: ``xr.open_datatree(DEST, engine="zarr")``
opens the copy as one tree (the store itself cannot be: its root image's z, y, x are the
dimensions every pyramid group inherits, with other sizes). Every array's ``.zattrs`` carries
``_ARRAY_DIMENSIONS``; its chunks are the store's shards (uncompressed edge chunks padded),
Blosc zstd, ``fill_value`` null (every chunk is written, and xarray then does not mask zeros).

A shard is read at a time with TensorStore (a few in flight), so memory stays a few shards.
Metadata is written atomically, the root ``.zattrs`` and ``.zmetadata`` last. ``DEST`` must be
absent or an empty folder; a failure (or Ctrl-C) removes the files and folders this run made,
nothing else.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import numpy as np

from tera_pipeline.core.errors import TeraError
from tera_pipeline.storage import layout, lock, store
from tera_pipeline.storage.atomic import write_json
from tera_pipeline.storage.ownership import is_our_store

FORMAT = "ome-zarr-0.4"
OME_VERSION = "0.4"
BINS = "bins"
BIN_ARRAYS = (layout.CONDITIONING, layout.CELL_COUNT, "magnet_expression")
Progress = Callable[[str, int, int], None]
"""``progress(array, chunks_done, chunks_total)``, as the CLI's progress bar takes it."""


class ExportError(TeraError):
    """A store that cannot be exported, or a destination that is refused."""


def check_source(root: Path) -> dict:
    """The ``ome`` attributes of a finished store of ours (a refusal otherwise). Reads only."""
    root = Path(root)
    if not is_our_store(root):
        raise ExportError(f"refusing to export {root}: it is not a tera-pipeline store")
    tera = store.group_attrs(root).get("tera_pipeline", {})
    if tera.get("status") != "complete":
        raise ExportError(
            f"refusing to export {root}: the generation is not finished (status "
            f"{tera.get('status', 'unknown')!r}); finish it with tera generate --resume"
        )
    owner = lock.read(root)
    if owner is not None and lock.alive(owner):
        raise ExportError(
            f"refusing to export {root}: a run is writing it ({lock.describe(owner)})"
        )
    ome = store.group_attrs(root).get("ome")
    if not isinstance(ome, dict) or not ome.get("multiscales"):
        raise ExportError(
            f"refusing to export {root}: it has no OME-NGFF metadata (written with its pyramid "
            "by tera generate since 2026-11)"
        )
    return ome


def check_dest(dest: Path, root: Path) -> None:
    """Refuse unless ``dest`` is absent or an empty folder, outside the store. Reads only."""
    dest, why = Path(dest), None
    if dest.is_symlink():
        why = "it is a symbolic link"
    elif dest.exists() and not dest.is_dir():
        why = "it is a file"
    elif dest.exists() and any(dest.iterdir()):
        why = "it is not empty (the export writes only into a new or empty folder)"
    elif dest.resolve() == Path(root).resolve() or Path(root).resolve() in dest.resolve().parents:
        why = "it is inside the store"
    if why:
        raise ExportError(f"refusing to export to {dest}: {why}; choose another --out")


def ome_04(ome: dict, paths: list[str]) -> dict:
    """OME-Zarr 0.4 root attributes from the store's 0.5 ``ome`` ones, datasets at ``paths``."""
    multiscales = []
    for scale in ome["multiscales"]:
        datasets = [
            {"path": path, "coordinateTransformations": d["coordinateTransformations"]}
            for path, d in zip(paths, scale["datasets"], strict=True)
        ]
        multiscales.append({"version": OME_VERSION, **scale, "datasets": datasets})
    out: dict = {"multiscales": multiscales}
    if "omero" in ome:
        out["omero"] = {"version": OME_VERSION, **ome["omero"]}
    return out


class _Written:
    """The files and folders this run made (recorded before they are made), to undo."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.dirs: list[Path] = []
        self.meta: dict[str, dict] = {}
        """Every metadata document written, by key relative to DEST (for ``.zmetadata``)."""

    def mkdir(self, path: Path) -> Path:
        if not path.is_dir():
            self.dirs.append(path)
            path.mkdir()
        return path

    def json(self, dest: Path, key: str, data: dict) -> None:
        path = dest / key
        self.files.append(path)
        write_json(path, data)
        self.meta[key] = data

    def undo(self) -> None:
        """Remove what this run made: its files, then its folders if left empty."""
        for path in reversed(self.files):  # write_json removes its own temporary on failure
            path.unlink(missing_ok=True)
        for folder in reversed(self.dirs):
            with suppress(OSError):  # something not ours inside: it stays, and the folder
                folder.rmdir()


def _blosc(dtype: np.dtype, clevel: int):
    from numcodecs import Blosc

    shuffle = Blosc.BITSHUFFLE if dtype.itemsize == 1 else Blosc.SHUFFLE
    return Blosc(cname="zstd", clevel=clevel, shuffle=shuffle)


def _clevel(meta: dict) -> int:
    """The Blosc level of the store's array (inside its sharding codec), else 3."""
    for codec in meta.get("codecs", []):
        for inner in [codec, *codec.get("configuration", {}).get("codecs", [])]:
            if inner.get("name") == "blosc":
                return int(inner["configuration"].get("clevel", 3))
    return 3


def _shard_shape(meta: dict) -> tuple[int, ...]:
    return tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])


def _blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    yield from np.ndindex(*(math.ceil(n / c) for n, c in zip(shape, chunks)))


def _array_meta(shape, chunks, dtype: np.dtype, codec) -> dict:
    return {
        "zarr_format": 2,
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": dtype.str,
        "compressor": codec.get_config(),
        "fill_value": None,
        "order": "C",
        "filters": None,
        "dimension_separator": ".",
    }


def _write_chunk(folder: Path, index, data: np.ndarray, chunks, codec, written: _Written) -> None:
    """One v2 chunk: the block, padded to the chunk shape at the far edges, compressed."""
    if data.shape != tuple(chunks):
        full = np.zeros(chunks, data.dtype)
        full[tuple(slice(0, n) for n in data.shape)] = data
        data = full
    path = folder / ".".join(map(str, index))
    written.files.append(path)
    path.write_bytes(codec.encode(np.ascontiguousarray(data)))


def _attrs(meta: dict) -> dict:
    """An array's ``.zattrs``: its attributes (less xarray's v3 encoding) and dimensions."""
    attrs = {k: v for k, v in meta.get("attributes", {}).items() if k != "_FillValue"}
    return attrs | {"_ARRAY_DIMENSIONS": list(meta["dimension_names"])}


def _copy_array(
    root: Path,
    source: str,
    dest: Path,
    key: str,
    written: _Written,
    progress: Progress | None,
    threads: int,
) -> int:
    """Copy the sharded array ``root/source`` to the v2 array ``dest/key``, one shard per chunk,
    ``threads`` shards in flight; returns the chunks written."""
    meta = json.loads((root / source / "zarr.json").read_text())
    array = store.open_array(root, source)
    shape, chunks = tuple(array.shape), _shard_shape(meta)
    dtype = np.dtype(array.dtype.numpy_dtype)
    codec = _blosc(dtype, _clevel(meta))
    folder = written.mkdir(dest / key)
    written.json(dest, f"{key}/.zarray", _array_meta(shape, chunks, dtype, codec))
    written.json(dest, f"{key}/.zattrs", _attrs(meta))

    def copy(index: tuple[int, ...]) -> None:
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        _write_chunk(folder, index, array[box].read().result(), chunks, codec, written)

    total = math.prod(math.ceil(n / c) for n, c in zip(shape, chunks))
    done, pending = 0, deque[Future]()
    with ThreadPoolExecutor(threads) as pool:
        try:
            for index in _blocks(shape, chunks):
                pending.append(pool.submit(copy, index))
                while len(pending) > 2 * threads or (pending and pending[0].done()):
                    pending.popleft().result()
                    done += 1
                    if progress is not None:
                        progress(key, done, total)
            while pending:
                pending.popleft().result()
                done += 1
                if progress is not None:
                    progress(key, done, total)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return total


def _copy_coordinate(root: Path, source: str, dest: Path, key: str, written: _Written) -> None:
    """Copy a small 1-D coordinate array whole (strings as fixed-width unicode, for v2)."""
    import zarr

    meta = json.loads((root / source / "zarr.json").read_text())
    values = np.asarray(zarr.open_array(root / source, mode="r")[...])
    if values.dtype.kind not in "biuf":
        values = np.array(values.tolist(), dtype=str)
    codec = _blosc(values.dtype, 3)
    written.mkdir(dest / key)
    written.json(
        dest, f"{key}/.zarray", _array_meta(values.shape, values.shape, values.dtype, codec)
    )
    written.json(dest, f"{key}/.zattrs", _attrs(meta))
    _write_chunk(dest / key, (0,), values, values.shape, codec, written)


def _copy_group(
    root: Path,
    arrays: list[tuple[str, str]],
    dest: Path,
    group: str,
    attrs: dict,
    written: _Written,
    progress: Progress | None,
    threads: int,
) -> None:
    """The group ``dest/group`` with ``arrays`` (store path, name) and the coordinates of their
    dimensions, from the store group beside each array."""
    written.mkdir(dest / group)
    written.json(dest, f"{group}/.zgroup", {"zarr_format": 2})
    if attrs:
        written.json(dest, f"{group}/.zattrs", attrs)
    coords: dict[str, str] = {}
    for source, name in arrays:
        meta = json.loads((root / source / "zarr.json").read_text())
        parent = source.rsplit("/", 1)[0] + "/" if "/" in source else ""
        for dim in meta["dimension_names"]:
            if (root / f"{parent}{dim}" / "zarr.json").is_file():
                coords.setdefault(dim, f"{parent}{dim}")
        _copy_array(root, source, dest, f"{group}/{name}", written, progress, threads)
    for dim, source in coords.items():
        _copy_coordinate(root, source, dest, f"{group}/{dim}", written)


def export_ome_zarr_04(
    root: Path, dest: Path, progress: Progress | None = None, threads: int = 4
) -> dict:
    """Write the OME-Zarr 0.4 (zarr v2) copy of the finished store ``root`` into ``dest`` (see
    the module docstring); returns what was written: levels and their shapes, bin arrays."""
    root, dest = Path(root), Path(dest)
    ome = check_source(root)
    check_dest(dest, root)
    levels = [d["path"] for d in ome["multiscales"][0]["datasets"]]
    bins = [n for n in BIN_ARRAYS if (root / n / "zarr.json").is_file()]
    written = _Written()
    try:
        missing = [p for p in [*reversed(dest.parents), dest] if not p.exists()]
        for folder in missing:
            written.mkdir(folder)
        written.json(dest, ".zgroup", {"zarr_format": 2})
        for k, path in enumerate(levels):
            arrays = [(path, layout.IMAGE)]
            _copy_group(root, arrays, dest, str(k), {"level": k}, written, progress, threads)
        if bins:
            arrays = [(n, n) for n in bins]
            _copy_group(root, arrays, dest, BINS, {}, written, progress, threads)
        paths = [f"{k}/{layout.IMAGE}" for k in range(len(levels))]
        written.json(dest, ".zattrs", ome_04(ome, paths))
        consolidated = {"zarr_consolidated_format": 1, "metadata": dict(written.meta)}
        written.json(dest, ".zmetadata", consolidated)
    except BaseException:
        written.undo()
        raise
    shapes = [written.meta[f"{p}/.zarray"]["shape"] for p in paths]
    return {"out": str(dest), "format": FORMAT, "levels": dict(zip(paths, shapes)), "bins": bins}
