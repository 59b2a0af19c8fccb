"""A per-process pool of arrays kept for reuse, bounded in bytes, least recently used out first;
each kept array carries the version of what it was made from (a file's identity), and a read
with another version misses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class LruPool:
    """Arrays by key, with a version each, ``nbytes`` in all (one lock: a worker may run blocks
    on several threads)."""

    def __init__(self) -> None:
        self.kept: OrderedDict[Hashable, tuple[object, np.ndarray]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: object) -> np.ndarray | None:
        with self._lock:
            kept = self.kept.get(key)
            if kept is None or kept[0] != version:
                return None
            self.kept.move_to_end(key)
            return kept[1]

    def put(self, key: Hashable, version: object, values: np.ndarray, limit: int) -> None:
        """Keep ``values``, then drop the least recently used until at most ``limit`` bytes are
        kept (the newest always stays)."""
        with self._lock:
            old = self.kept.pop(key, None)
            self.nbytes += values.nbytes - (old[1].nbytes if old else 0)
            self.kept[key] = (version, values)
            while self.nbytes > limit and len(self.kept) > 1:
                _, (_, dropped) = self.kept.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self.kept.clear()
            self.nbytes = 0
