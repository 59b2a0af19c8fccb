"""Direct I/O of a zarr v3 array whose chunks are raw bytes (no sharding, no compressor).

Such a chunk is one file, ``c/<i>/<j>/...`` under the array, holding the chunk's values in C
order, little-endian: reading a box is a memory map of each chunk it touches, and writing whole
chunks is one ``pwrite`` each, in place. The sampling state between steps is stored this way
(uncompressed scratch, the default): TensorStore's own read and write of the same bytes cost
several times the CPU in a worker (its threads, its shard index, a new file per write); the
zero-cost job ran 1.235x faster with its state in raw files (docs/raw_scratch_estimate.json,
measured before this module by a prototype). The files are the array's chunks exactly, so
TensorStore, zarr-python and xarray read what is written here, and the other way round.

A chunk is overwritten in place, not replaced: only scratch is stored so, and the sampling state
alternates between two arrays, so no block reads the array being written (a write cut short
is a block the ledger has not recorded, computed again on resume from the other array).

Each process keeps the chunk files it reads mapped (``MAPPED_BYTES``, least recently used out
first): a block's rolled read touches up to 8 chunks, more at the volume's faces, which its
neighbours and the next steps read again, and a mapping of a file overwritten in place shows
the new bytes. A read checks each kept mapping against its file (device, inode, size: one
``stat``); a file replaced or truncated is mapped again, and a file still mapped keeps its
inode, so no new file can pass for it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from tera_pipeline.core.geometry import cells_touching
from tera_pipeline.storage.lru_pool import LruPool

MAPPED_BYTES = 64 << 20
"""Bytes of chunk files each process keeps mapped: the 64 one-block chunks of a 16 x 128 x 128
job's two states (32 x 512 x 512 x 2 stains, float16)."""

_MAPPED = LruPool()


def default_keys(meta: dict[str, Any]) -> bool:
    """Whether zarr.json ``meta`` names its chunks ``c/<i>/<j>/...`` (the default key encoding)."""
    keys = meta.get("chunk_key_encoding", {})
    return (
        keys.get("name") == "default" and keys.get("configuration", {}).get("separator", "/") == "/"
    )


def is_raw(meta: dict[str, Any]) -> bool:
    """Whether zarr.json ``meta`` describes chunks of raw little-endian bytes."""
    codecs = meta.get("codecs", [])
    return (
        default_keys(meta)
        and len(codecs) == 1
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
    )


def chunk_file(array: str | Path, index: tuple[int, ...]) -> str:
    """The file of chunk (or shard) ``index`` of the array at ``array`` (default chunk keys)."""
    return os.path.join(array, "c", *map(str, index))


def chunk_pieces(chunk: tuple[int, ...], begin, end, at):
    """For each chunk overlapping [begin, end): its index, where its part goes in an output
    holding [begin, end) at offset ``at``, and where that part is within the chunk."""
    for index, origin in cells_touching(chunk, begin, end):
        lo = [max(b, o) for b, o in zip(begin, origin, strict=True)]
        hi = [min(e, o + c) for e, o, c in zip(end, origin, chunk, strict=True)]
        dst = tuple(
            slice(a - b + t, z - b + t) for a, z, b, t in zip(lo, hi, begin, at, strict=True)
        )
        src = tuple(slice(a - o, z - o) for a, z, o in zip(lo, hi, origin, strict=True))
        yield index, dst, src


class RawChunks:
    """An array of raw chunks (``is_raw``), read and written without TensorStore; ``handle`` is
    TensorStore's handle of the same array (its shape and dtype)."""

    def __init__(self, path: Path, handle, chunk: tuple[int, ...], fill: float) -> None:
        self.path, self.handle, self.chunk, self.fill = Path(path), handle, tuple(chunk), fill
        self.shape = tuple(handle.shape)
        self.rank = handle.rank
        self.dtype = handle.dtype
        self._numpy_dtype = np.dtype(handle.dtype.numpy_dtype).newbyteorder("<")
        self._folders: set[str] = set()

    def _file(self, index: tuple[int, ...]) -> str:
        return chunk_file(self.path, index)

    def read_into(self, out: np.ndarray, at: tuple[int, ...], begin, end) -> None:
        """Copy the array's [begin, end) (all axes) into ``out`` at offset ``at``; a chunk never
        written reads as the fill value."""
        for index, dst, src in chunk_pieces(self.chunk, begin, end, at):
            values = self._mapped(self._file(index))
            if values is None:
                out[dst] = self.fill
            else:
                out[dst] = values[src]

    def _mapped(self, path: str) -> np.ndarray | None:
        """The chunk file at ``path``, memory-mapped (kept while it is the same file), or None
        where it was never written."""
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        version = (info.st_dev, info.st_ino, info.st_size)
        values = _MAPPED.get(path, version)
        if values is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            values = np.frombuffer(mapped, self._numpy_dtype).reshape(self.chunk)
            _MAPPED.put(path, version, values, MAPPED_BYTES)
        return values

    def whole_chunks(self, begin, end) -> bool:
        """Whether [begin, end) is a union of whole chunks (an edge chunk up to the array's
        end counts as whole)."""
        return all(
            b % c == 0 and (e % c == 0 or e == n)
            for b, e, c, n in zip(begin, end, self.chunk, self.shape, strict=True)
        )

    def write(self, begin, data: np.ndarray) -> None:
        """Write ``data`` at ``begin`` (whole chunks: ``whole_chunks``), a chunk file each."""
        data = np.asarray(data, dtype=self._numpy_dtype)
        end = [b + n for b, n in zip(begin, data.shape, strict=True)]
        for index, origin in cells_touching(self.chunk, begin, end):
            part = tuple(
                slice(o - b, min(o + c, e) - b)
                for o, b, c, e in zip(origin, begin, self.chunk, end, strict=True)
            )
            piece = data[part]
            if piece.shape != self.chunk:  # an edge chunk: padded with the fill value
                full = np.full(self.chunk, self.fill, dtype=self._numpy_dtype)
                full[tuple(slice(0, n) for n in piece.shape)] = piece
                piece = full
            self._write_chunk(index, np.ascontiguousarray(piece))

    def _write_chunk(self, index: tuple[int, ...], values: np.ndarray) -> None:
        path = self._file(index)
        folder = os.path.dirname(path)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, memoryview(values).cast("B"), 0)
        finally:
            os.close(fd)


def forget() -> None:
    """Unmap every kept chunk file (once no array read from it is left)."""
    _MAPPED.clear()
