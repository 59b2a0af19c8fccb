"""The ledger's records: flags and digests written in place in chunks of raw bytes (stores
since 2026-12-08), read back by the ledger and by zarr; a ledger of TensorStore shards (the
stores before) records and forgets as before."""

from __future__ import annotations

import pytest
import zarr

from tera_pipeline.core.config import JobConfig
from tera_pipeline.storage import ledger, store
from tera_pipeline.storage.raw_chunks import RawChunks

# 65 blocks along x: two ledger chunks per phase row (chunks of at most 64 blocks an axis)
SHAPE, BLOCK = (16, 32, 65 * 32), (16, 32, 32)


@pytest.fixture
def job(tmp_path) -> JobConfig:
    return JobConfig.model_validate(
        {"out": str(tmp_path / "s.zarr"), "volume": {"shape": list(SHAPE)},
         "storage": {"block": list(BLOCK)}}
    )  # fmt: skip


def _sharded_ledger(job: JobConfig) -> None:
    """The ledger as stores before 2026-12-08 have it: TensorStore shards, zstd."""
    shape = (job.diffusion.steps + 2, *job.grid().shape)
    chunk = (1, *(min(n, 64) for n in job.grid().shape))
    dims = ("phase", "zblock", "yblock", "xblock")
    store.create_array(job.out, store.ArraySpec(ledger.LEDGER, shape, "uint8", dims, chunk))
    store.create_array(job.out, store.ArraySpec(ledger.DIGESTS, shape, "uint32", dims, chunk))


@pytest.mark.parametrize("layout", ["raw", "sharded"])
def test_records_and_forgets_blocks_in_either_layout(job, layout):
    root = job.out
    if layout == "raw":
        ledger.create(root, job, {"job": "test"})
    else:
        _sharded_ledger(job)
    store.forget_handles()
    assert isinstance(store.open_array(root, ledger.LEDGER), RawChunks) == (layout == "raw")
    far = (0, 0, 64)  # in the second chunk of the row, created by this record
    ledger.mark(root, 2, [((0, 0, 0), 7), (far, 2**32 - 1)])
    ledger.mark(root, 2, [((0, 0, 5), 11)])  # in place, beside what is there
    assert sorted(ledger.finished(root, 2)) == [((0, 0, 0), 7), ((0, 0, 5), 11), (far, 2**32 - 1)]
    assert ledger.count_pending(root, 2) == 65 - 3
    assert ledger.count_pending(root, 1) == 65  # other rows untouched
    ledger.unmark(root, 2, [(0, 0, 0)])
    assert [i for i, _ in ledger.finished(root, 2)] == [(0, 0, 5), far]
    assert next(ledger.pending(root, 2)) == (0, 0, 0)

    flags = zarr.open_array(root / ledger.LEDGER, mode="r")[...]  # what other readers see
    digests = zarr.open_array(root / ledger.DIGESTS, mode="r")[...]
    assert flags.sum() == 2 and flags[2, 0, 0, 5] == flags[2, 0, 0, 64] == 1
    assert digests[2, 0, 0, 64] == 2**32 - 1 and digests[2, 0, 0, 5] == 11
    if layout == "raw":  # one file of raw bytes per chunk, no temporary left behind
        row = root / ledger.LEDGER / "c" / "2"
        files = sorted(str(p.relative_to(row)) for p in row.rglob("*") if p.is_file())
        assert files == ["0/0/0", "0/0/1"]
