"""Out-of-core training patches (``training.store_patches``): keyed draws, workers, the held-out
box, equality with the in-memory ``sample_offset_batch``, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.inputs.cells import load_cells
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.storage import store
from tera_pipeline.training.denoiser import TrainingData, sample_offset_batch
from tera_pipeline.training.prefetch import Prefetcher
from tera_pipeline.training.store_patches import StorePatches, parse_box

PATCH, CONTEXT, EXTRA, BIN = (4, 32, 32), (1, 1, 1), (0, 1, 1), (1, 16, 16)
VOLUME = (6, 128, 112)
GENES = ("Gad1", "Slc17a7", "Mbp")
SPACING = (4.0, 1.0, 1.0)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def write_store(root, image: np.ndarray, raster: np.ndarray) -> None:
    """A generated store's layout: ``image``, ``conditioning`` and the group's gene panel."""
    root.mkdir(parents=True, exist_ok=True)
    attrs = {"tera_pipeline": {"genes": list(GENES)}}
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    (root / "zarr.json").write_text(json.dumps(meta))
    for name, data, dims, shard in (
        ("image", image, ("c", "z", "y", "x"), (2, 2, 64, 64)),
        ("conditioning", raster, ("gene", "zbin", "ybin", "xbin"), (3, 2, 4, 4)),
    ):
        spec = store.ArraySpec(name, data.shape, data.dtype.name, dims, shard, fill=0)
        store.write_box(store.create_array(root, spec), Box((0, 0, 0), data.shape[1:]), data)


@pytest.fixture
def volume(tmp_path):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 255, (2, *VOLUME), dtype=np.uint8)
    bins = bin_box(Box((0, 0, 0), VOLUME), BIN).shape
    raster = rng.poisson(2.0, (len(GENES), *bins)).astype(np.float32)
    write_store(tmp_path / "job.zarr", image, raster)
    return tmp_path / "job.zarr", image, raster


def source(path, **kwargs) -> StorePatches:
    return StorePatches(path, PATCH, CONTEXT, EXTRA, BIN, **kwargs)


class Replay:
    """A generator that gives ``sample_offset_batch`` a draw's values in its order."""

    def __init__(self, draw, bin_shape=BIN) -> None:
        origin = [o // n for o, n in zip(draw.origin, bin_shape)]
        flips = [0.0 if draw.flip_x else 0.9, 0.0 if draw.flip_z else 0.9]
        offset = [o for o, e in zip(draw.offset, EXTRA) if e]
        self.values = [*origin, draw.k, *flips, *offset]

    def integers(self, *args):
        return self.values.pop(0)

    def random(self):
        return self.values.pop(0)


def in_memory(data: TrainingData, draws) -> tuple[np.ndarray, ...]:
    parts = [sample_offset_batch(data, PATCH, CONTEXT, EXTRA, 1, Replay(d)) for d in draws]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_draws_are_keyed_by_seed_step_and_index(volume):
    path, _, _ = volume
    a, b = source(path, seed=3), source(path, seed=3)
    assert [a.plan(5, i) for i in range(16)] == [b.plan(5, i) for i in range(16)]
    assert [a.plan(5, i) for i in range(16)] != [a.plan(6, i) for i in range(16)]
    assert a.plan(5, 0) != source(path, seed=4).plan(5, 0)
    full = a.draw(5, range(8))
    assert full[0].shape == (8, 2, *PATCH) and full[1].shape == (8, 3, 6, 5, 5)
    assert full[0].dtype == np.float32 and full[2].dtype == np.int64
    halves = [b.draw(5, [0, 1, 2, 3]), b.draw(5, [4, 5, 6, 7])]
    assert_batches_equal(full, tuple(np.concatenate(p) for p in zip(*halves)))
    strided = [b.draw(5, [0, 2, 4, 6]), b.draw(5, [1, 3, 5, 7])]
    order = np.argsort([0, 2, 4, 6, 1, 3, 5, 7])
    assert_batches_equal(full, tuple(np.concatenate(p)[order] for p in zip(*strided)))


def test_patches_and_windows_equal_the_in_memory_read(volume):
    path, image, raster = volume
    data = TrainingData(from_uint8(image), raster, GENES, BIN)
    s = source(path)
    draws = [s.plan(step, i) for step in range(4) for i in range(8)]
    assert {d.k for d in draws} == {0, 1, 2, 3} and {d.flip_x for d in draws} == {True, False}
    assert_batches_equal(s.read(draws), in_memory(data, draws))
    val = [s.validation_plan(i) for i in range(8)]
    assert_batches_equal(s.validation_batch(8), in_memory(data, val))


def test_windows_from_cells_equal_the_in_memory_raster(volume, tmp_path):
    path, image, _ = volume
    rng = np.random.default_rng(1)
    n = 400
    extent = np.asarray(VOLUME) * np.asarray(SPACING)
    cells = pd.DataFrame(
        {
            "x": rng.random(n) * extent[2],
            "y": rng.random(n) * extent[1],
            "z": rng.random(n) * extent[0],
            **{g: rng.poisson(3.0, n) for g in GENES},
        }
    )
    cells.to_csv(tmp_path / "cells.csv", index=False)
    s = StorePatches(
        path / "image", PATCH, CONTEXT, EXTRA, BIN, cells=tmp_path / "cells.csv",
        spacing_um=SPACING,
    )  # fmt: skip
    assert s.genes == GENES
    table = load_cells(tmp_path / "cells.csv")
    raster = rasterize(table, bin_box(Box((0, 0, 0), VOLUME), BIN), SPACING, BIN)
    data = TrainingData(from_uint8(image), raster, GENES, BIN)
    draws = [s.plan(1, i) for i in range(12)]
    batch = s.read(draws)
    assert batch[1].sum() > 0
    assert_batches_equal(batch, in_memory(data, draws))


@pytest.mark.parametrize("workers", [1, 2])
def test_prefetched_batches_equal_the_in_process_ones(volume, workers):
    path, _, _ = volume
    s = source(path)
    indices = range(6)
    with Prefetcher(s, indices, 0, 6, workers=workers, prefetch=2) as fetched:
        got = {step: fetched.draw(step, indices) for step in (0, 1, 2, 4, 5)}
        got[3] = fetched.draw(3, indices)  # out of order: restarts the workers from step 3
    for step, batch in got.items():
        assert_batches_equal(batch, s.draw(step, indices))
    with Prefetcher(s, indices, 0, 2, workers=0) as inline:
        assert_batches_equal(inline.draw(1, indices), s.draw(1, indices))


@pytest.mark.parametrize(
    "held_out", [None, Box((1, 32, 32), (4, 48, 48)), Box((0, 0, 64), (6, 128, 48))]
)
def test_training_never_reads_the_held_out_box(tmp_path, held_out):
    image = np.random.default_rng(0).integers(0, 255, (2, *VOLUME), dtype=np.uint8)
    s0 = source(_store_with(tmp_path / "probe.zarr", image), validation=held_out)
    held = s0.validation
    image[(slice(None), *held.slices())] = 255  # the only voxels that read as 1.0
    s = source(_store_with(tmp_path / "job.zarr", image), validation=held_out)
    top = [(v - r) // n for v, r, n in zip(VOLUME, s.region, BIN)]
    allowed = {
        o for o in np.ndindex(*(t + 1 for t in top)) if s.region_box(_at(o)).intersect(held).empty
    }
    drawn = {tuple(o // n for o, n in zip(s.plan(step, i).origin, BIN))
             for step in range(300) for i in range(8)}  # fmt: skip
    assert drawn == allowed  # every allowed origin is drawn, no other
    for step in range(4):
        assert (s.draw(step, range(16))[0] < 1.0).all()
    val = s.validation_batch(16)[0]
    assert (val == 1.0).all()
    assert all(held.contains(s.region_box(s.validation_plan(i))) for i in range(64))


def _store_with(root, image):
    bins = bin_box(Box((0, 0, 0), VOLUME), BIN).shape
    write_store(root, image, np.ones((len(GENES), *bins), np.float32))
    return root


def _at(index):
    from tera_pipeline.training.store_patches import Draw

    return Draw(tuple(i * n for i, n in zip(index, BIN)), 0, False, False, (0, 0, 0))


def test_refusals_are_one_line_tera_errors(volume, tmp_path):
    path, image, raster = volume
    floats = store.ArraySpec("f", (2, *VOLUME), "float32", ("c", "z", "y", "x"), (2, 2, 64, 64))
    store.create_array(tmp_path, floats)
    flat = store.ArraySpec("flat", VOLUME, "uint8", ("z", "y", "x"), (2, 64, 64))
    store.create_array(tmp_path, flat)
    cases = [
        (lambda: source(tmp_path / "f", conditioning=path / "conditioning"), "uint8"),
        (lambda: source(tmp_path / "flat", conditioning=path / "conditioning"), "uint8"),
        (lambda: source(tmp_path / "nothing"), "not a zarr array"),
        (lambda: StorePatches(path, (8, 32, 32), CONTEXT, EXTRA, BIN), "smaller than a patch"),
        (lambda: StorePatches(path, (4, 128, 32), CONTEXT, EXTRA, BIN), "smaller than a patch"),
        (lambda: source(path, conditioning=path / "image"), "gene bins"),
        (lambda: source(path, channels=3), "stains"),
        (lambda: source(path, validation=Box((0, 0, 0), VOLUME)), "no training patch"),
        (lambda: source(path, validation=Box((0, 0, 0), (6, 16, 16))), "hold a patch"),
        (lambda: parse_box("0:4,0:64"), "validation-box"),
    ]
    for make, words in cases:
        with pytest.raises(TeraError) as err:
            make()
        assert words in str(err.value) and "\n" not in str(err.value)
    assert parse_box("0:6,96:128,0:112") == Box((0, 96, 0), (6, 32, 112))
