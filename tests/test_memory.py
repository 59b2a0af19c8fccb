"""Process memory: a worker gives its free heap back, but not more often than asked."""

from __future__ import annotations

import sys

import pytest

from tera_pipeline.runtime import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_is_given_back_at_most_once_per_period(monkeypatch):
    monkeypatch.setattr(memory, "_last_trim", [0.0])
    assert memory.keep_freed_memory()  # as a worker does: freed heap is kept, not trimmed
    buffers = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB, freed below
    del buffers
    assert memory.return_freed_memory(every_s=0.0)  # trims (glibc gives pages back)
    assert not memory.return_freed_memory(every_s=3600.0)  # too soon after
