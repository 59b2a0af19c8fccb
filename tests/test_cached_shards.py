"""Reads from decoded shards kept in memory (the conditioning, read by every denoising step)
equal TensorStore's, wrapped and rolled reads included; a shard written again is decoded again,
and the pool of kept shards stays within its bytes."""

from __future__ import annotations

import numpy as np
import pytest

from tera_pipeline.core.geometry import Box
from tera_pipeline.storage import cached_shards, store
from tera_pipeline.storage.cached_shards import CachedShards

SHAPE, SHARD = (3, 6, 20, 18), (3, 2, 8, 8)  # partial edge shards on y and x


@pytest.fixture
def array(tmp_path):
    """A compressed sharded array with every shard but one written, opened with and without
    the pool."""
    spec = store.ArraySpec("cond", SHAPE, "float32", ("gene", "z", "y", "x"), SHARD)
    handle = store.create_array(tmp_path, spec)
    values = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    values[:, 0:2, 0:8, 0:8] = 0  # shard (0, 0, 0, 0) is never written: fill
    for z in range(0, 6, 2):
        for y in range(0, 20, 8):
            for x in range(0, 18, 8):
                if (z, y, x) != (0, 0, 0):
                    part = (
                        slice(None),
                        slice(z, z + 2),
                        slice(y, min(y + 8, 20)),
                        slice(x, min(x + 8, 18)),
                    )
                    handle[part].write(values[part]).result()
    store.forget_handles()
    cached = store.open_array(tmp_path, "cond", cache_bytes=1 << 20)
    assert isinstance(cached, CachedShards)
    yield tmp_path, cached, values
    cached_shards.forget()


@pytest.mark.parametrize(
    "box, wrap, frame",
    [
        (Box((0, 0, 0), (6, 20, 18)), None, None),
        (Box((1, 5, 3), (3, 9, 14)), None, None),
        (Box((-1, -4, 10), (4, 12, 12)), (True, True, True), None),  # across the torus
        (Box((2, 3, 4), (4, 8, 8)), (True, True, True), (1, 5, 7)),  # stored rolled
        (Box((4, 16, 14), (4, 8, 8)), None, None),  # beyond the edge: the fill
    ],
)
def test_reads_equal_tensorstore(array, box, wrap, frame):
    root, cached, _ = array
    plain = store.open_array(root, "cond")
    expected = store.read_box(plain, box, wrap=wrap, frame=frame)
    for _ in range(2):  # decoded, then from the pool
        np.testing.assert_array_equal(store.read_box(cached, box, wrap=wrap, frame=frame), expected)


def test_a_shard_written_again_is_decoded_again(array):
    root, cached, values = array
    box = Box((0, 0, 0), (2, 8, 8))
    np.testing.assert_array_equal(store.read_box(cached, box), 0)  # never written: the fill
    plain = store.open_array(root, "cond")
    new = np.full((3, *box.shape), 7, np.float32)
    store.write_box(plain, box, new)  # a repair: the shard file appears
    np.testing.assert_array_equal(store.read_box(cached, box), new)
    newer = new + 1
    store.write_box(plain, box, newer)  # and is replaced
    np.testing.assert_array_equal(store.read_box(cached, box), newer)


def test_the_pool_stays_within_its_bytes(array):
    root, _, values = array
    store.forget_handles()
    shard_bytes = 3 * 2 * 8 * 8 * 4
    small = store.open_array(root, "cond", cache_bytes=2 * shard_bytes)
    whole = Box((0, 0, 0), SHAPE[1:])
    np.testing.assert_array_equal(store.read_box(small, whole), values)  # 27 shards, pool of 2
    assert cached_shards._POOL.nbytes <= 2 * shard_bytes
    assert 2 <= len(cached_shards._POOL.kept) < 27  # the least recently used went out


def test_reads_from_several_threads_agree(array):
    """A worker may run blocks on several threads: their reads share the pool."""
    from concurrent.futures import ThreadPoolExecutor

    root, _, values = array
    store.forget_handles()
    small = store.open_array(root, "cond", cache_bytes=3 * 3 * 2 * 8 * 8 * 4)  # 3 shards
    boxes = [Box((z, y, x), (2, 8, 8)) for z in range(0, 6, 2) for y in (0, 8) for x in (0, 8)]

    def read(box: Box) -> bool:
        got = store.read_box(small, box)
        return np.array_equal(got, values[(slice(None), *box.slices())])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, boxes * 20))
    assert cached_shards._POOL.nbytes == sum(v.nbytes for _, v in cached_shards._POOL.kept.values())
