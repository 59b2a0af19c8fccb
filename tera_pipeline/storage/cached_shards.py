"""Reads of an array that nothing writes while it is read, from decoded shards kept in memory.

The conditioning is written once, by its own phase, and then read by every block of every
denoising step, each block's gene windows reaching into its neighbours' shards. Through
TensorStore (even with its cache of decoded chunks) a block's read cost about 1 ms of a
worker's CPU, most of it the hand-over to TensorStore's threads: as much as the rest of a
zero-cost block of 16 x 64 x 64. Here each shard is decoded once by TensorStore and kept, in
one pool per process bounded in bytes (least recently used out first); every read checks each
shard it takes against its file (inode, size, modification time: one ``stat``), so a shard
written again (a repair) is decoded again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tera_pipeline.storage.lru_pool import LruPool
from tera_pipeline.storage.raw_chunks import chunk_file, chunk_pieces

_POOL = LruPool()
"""The process's decoded shards."""


class CachedShards:
    """An array of shards under the default chunk keys (``c/<i>/<j>/...``), read through the
    process's pool of decoded shards (``limit`` bytes in all); ``handle`` is TensorStore's handle
    of the array, which decodes a shard not in the pool."""

    def __init__(self, path: Path, handle, shard: tuple[int, ...], limit: int) -> None:
        self.path, self.handle, self.shard, self.limit = str(path), handle, tuple(shard), limit
        self.shape, self.rank, self.dtype = tuple(handle.shape), handle.rank, handle.dtype
        self.fill = handle.fill_value

    def read_into(self, out: np.ndarray, at: tuple[int, ...], begin, end) -> None:
        """Copy the array's [begin, end) (all axes) into ``out`` at offset ``at``."""
        for index, dst, src in chunk_pieces(self.shard, begin, end, at):
            out[dst] = self._decoded(index)[src]

    def _decoded(self, index: tuple[int, ...]) -> np.ndarray:
        """Shard ``index`` decoded (clipped to the array's edge), from the pool when its file is
        unchanged."""
        file = chunk_file(self.path, index)
        try:
            info = os.stat(file)
            version: object = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            version = None  # never written: TensorStore reads the fill value
        key = (self.path, index)
        values = _POOL.get(key, version)
        if values is None:
            box = tuple(
                slice(i * s, min((i + 1) * s, n))
                for i, s, n in zip(index, self.shard, self.shape, strict=True)
            )
            values = self.handle[box].read().result()
            _POOL.put(key, version, values, self.limit)
        return values


def forget() -> None:
    """Drop every kept shard."""
    _POOL.clear()
