"""Nuclei labels (issue 19): block-wise with a halo on a real cluster, bitwise the same for two
block grids and a whole-volume run, one id per nucleus across block faces, as an OME-Zarr 0.5
label image that ome-zarr-py and ngff-zarr read.

The tiny denoiser paints noise, so the store's DAPI is replaced by spheres of known centres:
some straddle the faces of both label grids, two touch (one component, two nuclei).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tera_pipeline.analysis import label_image, labels
from tera_pipeline.analysis.cells import otsu_threshold
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import AnalysisError
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import lifecycle
from tera_pipeline.storage import ownership, store

SHAPE, SPACING, JOB_BLOCK = (16, 96, 96), (2.0, 1.0, 1.0), (8, 96, 96)
GRIDS = ((4, 32, 32), (8, 64, 64))
LEVELS = [(16, 96, 96), (16, 48, 48)]
STRADDLING = [(16.0, 32.0, 20.0), (8.0, 50.0, 64.0), (16.0, 64.0, 64.0), (24.0, 20.0, 64.0)]
"""Sphere centres (µm) on faces of both grids (z 8 and 16 µm are voxel faces 4 and 8)."""
TOUCHING = [(12.0, 80.0, 12.0), (12.0, 80.0, 19.0)]
"""Two spheres of radius 4 µm, 7 µm apart: one component, two nuclei."""


def blob_dapi(seed: int = 0, count: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A noisy DAPI volume (uint8) with ``count`` spheres (radius 3.5 to 4.5 µm, the first
    ones at ``STRADDLING`` and ``TOUCHING``); returns it and the centres (µm)."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(SHAPE) * SPACING
    centres, radii = [np.asarray(c) for c in STRADDLING + TOUCHING], [4.0] * 6
    while len(centres) < count:
        r, c = rng.uniform(3.5, 4.5), rng.uniform(3.0, extent - 3.0)
        if all(np.linalg.norm(c - o) > r + ro + 2.0 for o, ro in zip(centres, radii)):
            centres.append(c)
            radii.append(r)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    image = 30 + rng.integers(0, 20, size=SHAPE)
    for c, r in zip(centres, radii):
        inside = sum((g - x) ** 2 for g, x in zip(grids, c)) <= r * r
        image = np.where(inside, 200 + rng.integers(-20, 20, size=SHAPE), image)
    return image.astype(np.uint8), np.asarray(centres)


def _levels(root) -> list[np.ndarray]:
    store.forget_handles()
    return [store.open_array(root, f"{label_image.GROUP}/{k}").read().result() for k in range(2)]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory, tiny_checkpoint, client):
    """A generated store (one step of the tiny denoiser) whose DAPI is then the blob volume."""
    job = JobConfig.model_validate(
        {"out": str(tmp_path_factory.mktemp("labels") / "blobs.zarr"),
         "volume": {"shape": SHAPE, "spacing_um": SPACING}, "storage": {"block": JOB_BLOCK},
         "diffusion": {"steps": 1, "seed": 3}, "checkpoint": str(tiny_checkpoint)}
    )  # fmt: skip
    lifecycle.generate(job, client)
    dapi, centres = blob_dapi()
    store.write_box(store.open_array(job.out, "image")[0], Box((0, 0, 0), SHAPE), dapi)
    return job.out, dapi, centres


@pytest.fixture(scope="module")
def labelled(blob_store, client):
    """The labels under each grid, then the first grid again; what each run returned and wrote."""
    root = blob_store[0]
    runs = []
    for block in (*GRIDS, GRIDS[0]):
        result = labels.run(root, client, block)
        runs.append((result, _levels(root)))
    return runs


def test_two_block_grids_and_a_rerun_give_the_same_bits(labelled):
    (first, a), (second, b), (again, c) = labelled
    assert first["block"] == list(GRIDS[0]) and second["block"] == list(GRIDS[1])
    for x, y, z in zip(a, b, c, strict=True):
        assert x.dtype == np.uint64
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert first["nuclei"] == second["nuclei"] == again["nuclei"]
    assert first["threshold"] == second["threshold"]
    # voxels covering 10 + 5 µm (seeds' reach) + 2 µm (seed footprint) + 10 µm (distance cap),
    # + 1 where smoothed (y, x)
    assert first["halo"] == [8 + 1 + 5, 15 + 2 + 10 + 1, 15 + 2 + 10 + 1]


def test_block_wise_equals_one_whole_volume_block(blob_store, labelled):
    """No cluster, one block holding the volume: the same labels as the block tasks wrote."""
    root, dapi, _ = blob_store
    plan = labels.check(root, SHAPE)
    plan = labels.Plan(plan.root, SHAPE, SPACING, SHAPE, 0, int(otsu_threshold(dapi)))
    volume = Box((0, 0, 0), SHAPE)
    read = volume.grow(plan.halo, plan.halo)
    padded = np.zeros(read.shape, np.uint8)
    padded[volume.slices(read)] = dapi
    whole, stats = labels.label_core(padded, read, volume, plan)
    np.testing.assert_array_equal(whole, labelled[0][1][0])
    assert (
        stats.nuclei == labelled[0][0]["nuclei"]
        and stats.unassigned_voxels == labelled[0][0]["unassigned_voxels"]
    )


def test_each_sphere_is_one_nucleus_with_one_id(blob_store, labelled):
    _, _, centres = blob_store
    full = labelled[0][1][0]
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    ids = []
    for c in centres:
        near = sum((g - x) ** 2 for g, x in zip(grids, c)) <= 2.5**2
        seen = np.unique(full[near])
        assert len(seen) == 1 and seen[0] != 0, (c, seen)  # one id, across any block face
        ids.append(int(seen[0]))
    assert len(set(ids)) == len(centres)  # touching spheres split, none merged
    assert labelled[0][0]["nuclei"] == len(np.unique(full)) - 1
    assert abs(labelled[0][0]["nuclei"] - len(centres)) <= 2
    for z, y, x in STRADDLING:  # they do straddle faces of both grids
        voxel = (z / SPACING[0], y, x)
        assert any(v % b == 0 for v, b in zip(voxel, GRIDS[0]))
        assert any(v % b == 0 for v, b in zip(voxel, GRIDS[1]))


def test_an_id_is_one_plus_the_index_of_its_seed_near_the_centre(blob_store, labelled):
    full, centres = labelled[0][1][0], blob_store[2]
    ids = np.unique(full[full > 0])
    seeds = np.stack(np.unravel_index((ids - 1).astype(np.int64), SHAPE), axis=1)
    np.testing.assert_array_equal(full[tuple(seeds.T)], ids)  # a seed lies in its nucleus
    seeds_um = (seeds + 0.5) * SPACING
    nearest = np.linalg.norm(seeds_um[:, None] - centres[None], axis=-1).min(axis=1)
    assert nearest.max() <= 2.0  # the distance transform's maximum: the sphere's centre


def test_mode_downsample_is_the_most_frequent_label_smaller_on_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(3, 5, 7)).astype(np.uint64)
    for f in ((1, 2, 2), (2, 2, 2), (2, 1, 3)):
        got = label_image.mode_downsample(a, f)
        for idx in np.ndindex(*got.shape):
            window = a[tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))].ravel()
            counts = np.bincount(window.astype(np.int64))
            assert got[idx] == np.argmax(counts)


def test_levels_and_metadata(blob_store, labelled):
    root = blob_store[0]
    assert [x.shape for x in labelled[-1][1]] == LEVELS
    np.testing.assert_array_equal(
        labelled[-1][1][1], label_image.mode_downsample(labelled[-1][1][0], (1, 2, 2))
    )
    meta = json.loads((root / label_image.GROUP / "0" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["z", "y", "x"] and meta["data_type"] == "uint64"
    assert store.group_attrs(root / "labels")["ome"] == {"version": "0.5", "labels": ["nuclei"]}
    ome = store.group_attrs(root / label_image.GROUP)["ome"]
    image = store.group_attrs(root)["ome"]["multiscales"][0]
    (scale,) = ome["multiscales"]
    assert [a["name"] for a in scale["axes"]] == ["z", "y", "x"]
    for ours, theirs in zip(scale["datasets"], image["datasets"], strict=True):
        for t, u in zip(ours["coordinateTransformations"], theirs["coordinateTransformations"]):
            assert t[t["type"]] == u[u["type"]][1:]
    label = ome["image-label"]
    assert label["source"] == {"image": "../../"}
    assert label["colors"][0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}
    assert len(label["colors"]) == labelled[-1][0]["nuclei"] + 1


def test_ome_zarr_py_reads_the_image_and_its_labels(blob_store, labelled):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    root = blob_store[0]
    nodes = list(Reader(parse_url(str(root)))())  # 0.5: ome-zarr's current format
    image, label = nodes[0], nodes[-1]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert [tuple(d.shape) for d in image.data] == [(2, *s) for s in LEVELS]
    assert any(isinstance(s, Label) for s in label.specs)
    assert label.metadata["name"] == "nuclei"
    assert [tuple(d.shape) for d in label.data] == LEVELS
    np.testing.assert_array_equal(np.asarray(label.data[1]), labelled[-1][1][1])


def test_ngff_zarr_validates_the_image_and_the_label_image(blob_store, labelled):
    ngff_zarr = pytest.importorskip("ngff_zarr")
    from ngff_zarr.validate import validate

    root = blob_store[0]
    multiscales = ngff_zarr.from_ngff_zarr(str(root / label_image.GROUP), validate=True)
    assert [tuple(i.data.shape) for i in multiscales.images] == LEVELS
    assert multiscales.images[0].dims == ("z", "y", "x")
    validate(store.group_attrs(root / label_image.GROUP), "0.5", "label", strict=True)
    ngff_zarr.from_ngff_zarr(str(root), validate=True)


def test_only_our_label_image_is_replaced(blob_store, labelled, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(blob_store[0], copy)
    theirs = copy / "labels" / "cells"
    label_image.write_group(theirs, {"ome": {"version": "0.5"}})
    (theirs / "notes.txt").write_text("theirs")
    attrs = store.group_attrs(copy / "labels")
    attrs["ome"]["labels"] = ["cells", "nuclei"]
    label_image.write_group(copy / "labels", attrs)
    assert "labels/cells" in ownership.foreign_entries(copy)  # --overwrite would refuse
    label_image.remove_ours(copy)
    assert not (copy / label_image.GROUP).exists() and (theirs / "notes.txt").is_file()
    assert store.group_attrs(copy / "labels")["ome"]["labels"] == ["cells"]
    assert label_image.nuclei_level(copy) is None
    mine = copy / label_image.GROUP
    label_image.write_group(mine, {"ome": {"version": "0.5"}})  # someone else's nuclei
    with pytest.raises(ownership.OwnershipError, match="did not write it"):
        labels.check(copy)
    assert (mine / "zarr.json").is_file()


def test_refusals(blob_store, labelled, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    root = blob_store[0]
    with pytest.raises(AnalysisError, match="three positive"):
        labels.check(root, (0, 32, 32))
    result = CliRunner().invoke(app, ["analyze", "labels", str(root), "--block", "0,32,32"])
    assert result.exit_code == 2 and result.output.startswith("error: the labels block")
    copy = tmp_path / "unfinished.zarr"
    shutil.copytree(root, copy)
    tera = store.group_attrs(copy)["tera_pipeline"] | {"status": "running"}
    store.update_attrs(copy, {"tera_pipeline": tera})
    with pytest.raises(AnalysisError, match="not a finished generation"):
        labels.check(copy)


def test_the_slices_png_draws_the_labels(blob_store, labelled, tmp_path):
    from tera_pipeline.evaluation.views import label_overlay, orthoslices_png

    root = blob_store[0]
    png = orthoslices_png(root, tmp_path / "slices.png")
    assert png.stat().st_size > 10_000
    plane = labelled[-1][1][0][8]
    rgba = label_overlay(plane)
    assert (rgba[plane == 0, 3] == 0).all() and (rgba[plane > 0, 3] > 0).all()
    some = int(plane[plane > 0][0])
    assert (rgba[plane == some, :3] == label_image.label_colours([some])[0, :3]).all()
