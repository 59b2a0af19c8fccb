"""Raw chunks (uncompressed scratch) read and written directly are the array TensorStore and
zarr-python see: the same values either way, a chunk never written reads as the fill, edge
chunks are padded, and a rolled, wrapped read equals TensorStore's."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import tensorstore as ts
import zarr

from tera_pipeline.core.geometry import Box
from tera_pipeline.storage import raw_chunks, store
from tera_pipeline.storage.raw_chunks import RawChunks

SHAPE, CHUNK = (2, 12, 40, 36), (2, 4, 16, 16)  # the edge chunks of y and x are partial


def _spec(name: str, sharded: bool) -> store.ArraySpec:
    return store.ArraySpec(name, SHAPE, "float16", ("c", "z", "y", "x"), CHUNK, CHUNK,
                           codec="none", sharded=sharded)  # fmt: skip


@pytest.fixture
def arrays(tmp_path):
    """The same layout twice: raw chunks (opened as ``RawChunks``) and TensorStore's shards."""
    store.create_array(tmp_path, _spec("raw", sharded=False))
    store.create_array(tmp_path, _spec("sharded", sharded=True))
    store.forget_handles()
    raw, sharded = store.open_array(tmp_path, "raw"), store.open_array(tmp_path, "sharded")
    assert isinstance(raw, RawChunks) and not isinstance(sharded, RawChunks)
    return tmp_path, raw, sharded


def _values(box: Box, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, *box.shape)).astype(np.float16)


def test_what_is_written_directly_is_the_zarr_array(arrays):
    root, raw, sharded = arrays
    writes = [
        Box((0, 0, 0), (4, 16, 16)),
        Box((4, 32, 32), (8, 8, 4)),
        Box((8, 16, 0), (4, 16, 16)),
    ]
    expected = np.zeros(SHAPE, np.float16)
    for seed, box in enumerate(writes):  # whole chunks, one an edge chunk, one two chunks
        data = _values(box, seed)
        crc = store.write_box(raw, box, data)
        assert crc == store.write_box(sharded, box, data)  # the same digest
        expected[(slice(None), *box.slices())] = data
    tensorstore = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / "raw")}}
    ).result()
    np.testing.assert_array_equal(tensorstore.read().result(), expected)
    np.testing.assert_array_equal(zarr.open_array(root / "raw", mode="r")[...], expected)
    np.testing.assert_array_equal(store.read_box(raw, Box((0, 0, 0), SHAPE[1:])), expected)
    assert not (root / "raw" / "c" / "0" / "1" / "0" / "0").exists()  # never written: fill


def test_a_partial_write_goes_through_tensorstore(arrays):
    _, raw, sharded = arrays
    box = Box((1, 3, 5), (2, 9, 7))  # not whole chunks
    data = _values(box, 7)
    store.write_box(raw, box, data)
    store.write_box(sharded, box, data)
    whole = Box((0, 0, 0), SHAPE[1:])
    np.testing.assert_array_equal(store.read_box(raw, whole), store.read_box(sharded, whole))


@pytest.mark.parametrize("frame", [(0, 0, 0), (3, 21, 35)])
def test_rolled_wrapped_and_outside_reads_equal_tensorstores(arrays, frame):
    _, raw, sharded = arrays
    whole = Box((0, 0, 0), SHAPE[1:])
    data = _values(whole, 3)
    for array in (raw, sharded):
        store.write_box(array, whole, data)
    for box, wrap in [
        (Box((-2, 30, 33), (8, 20, 10)), (True, True, True)),  # across every wrapped edge
        (Box((-2, 30, 33), (8, 20, 10)), (False, True, False)),  # beyond the array: fill
        (Box((4, 16, 16), (4, 16, 16)), (False, False, False)),  # one chunk
    ]:
        got = store.read_box(raw, box, fill=-1.0, wrap=wrap, frame=frame)
        want = store.read_box(sharded, box, fill=-1.0, wrap=wrap, frame=frame)
        np.testing.assert_array_equal(got, want)


def test_digests_are_zlibs_crc32():
    """A block's digest is zlib's CRC-32 of its bytes, continued over its arrays, whichever
    library computes it: the digests of stores written before zlib-ng still verify."""
    rng = np.random.default_rng(0)
    state = rng.standard_normal((2, 16, 32, 32)).astype(np.float16)
    image = rng.integers(0, 256, (2, 5, 7), dtype=np.uint8)
    assert store.digest(state) == zlib.crc32(state)
    assert store.digest(image, store.digest(state)) == zlib.crc32(image, zlib.crc32(state))
    assert store.digest(image) != store.digest(image[:, :, ::-1].copy())


def test_kept_mappings_show_what_is_written_and_what_replaced_it(arrays, monkeypatch):
    """A chunk file kept mapped shows bytes written over it in place; a file replaced (the
    array deleted and created again) is mapped anew; the kept mappings stay within their
    bytes; a truncated chunk is an error, not the old bytes."""
    root, raw, _ = arrays
    whole = Box((0, 0, 0), SHAPE[1:])
    first, second = _values(whole, 1), _values(whole, 2)
    store.write_box(raw, whole, first)
    np.testing.assert_array_equal(store.read_box(raw, whole), first)  # every chunk mapped now
    store.write_box(raw, whole, second)  # pwrite over the mapped files
    np.testing.assert_array_equal(store.read_box(raw, whole), second)

    store.create_array(root, _spec("raw", sharded=False))  # replaced: new files, same paths
    raw = store.open_array(root, "raw")  # a new handle (new metadata); the mappings are kept
    store.write_box(raw, whole, first)
    np.testing.assert_array_equal(store.read_box(raw, whole), first)

    chunk_bytes = int(np.prod(CHUNK)) * 2
    monkeypatch.setattr(raw_chunks, "MAPPED_BYTES", 3 * chunk_bytes)
    raw_chunks.forget()
    np.testing.assert_array_equal(store.read_box(raw, whole), first)  # 27 chunks through 3
    assert raw_chunks._MAPPED.nbytes <= 3 * chunk_bytes

    one = root / "raw" / "c" / "0" / "0" / "0" / "0"
    with open(one, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError):
        store.read_box(raw, Box((0, 0, 0), (4, 16, 16)))
