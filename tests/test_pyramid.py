"""Viewer-ready output: the block-wise pyramid and its OME-NGFF 0.5 metadata, validated with the
public ``ome-zarr-models`` package; every level opens with xarray in µm."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import xarray as xr
import zarr

from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle, pyramid
from tera_pipeline.storage import store


def _window_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Independent reference: loop over output voxels, mean of the voxels each window holds."""
    c, *spatial = a.shape
    out_shape = [-(-n // k) for n, k in zip(spatial, f)]
    out = np.zeros((c, *out_shape), np.uint8)
    for idx in np.ndindex(*out_shape):
        sl = tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))
        window = a[(slice(None), *sl)].astype(np.float64)
        out[(slice(None), *idx)] = np.rint(window.mean(axis=(1, 2, 3)))
    return out


def test_downsample_is_the_window_mean_with_partial_edges():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(2, 5, 7, 9), dtype=np.uint8)
    for f in ((1, 2, 2), (2, 2, 2), (2, 1, 3)):
        np.testing.assert_array_equal(pyramid.downsample(a, f), _window_mean(a, f))


def test_levels_become_isotropic_then_halve_until_small():
    job = JobConfig.model_validate(
        {"volume": {"shape": (64, 1024, 1024), "spacing_um": (4.0, 1.0, 1.0)},
         "storage": {"block": (16, 256, 256)}}
    )  # fmt: skip
    levels = pyramid.plan_levels(job)
    assert [lvl.factor for lvl in levels[1:]] == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [lvl.spacing_um for lvl in levels][-1] == (16.0, 16.0, 16.0)
    assert levels[-1].shape == (16, 64, 64) and max(levels[-2].shape[1:]) > pyramid.MIN_SIZE
    assert all(b <= n for lvl in levels for b, n in zip(lvl.block, lvl.shape))


@pytest.fixture(scope="module")
def pyramid_store(tmp_path_factory, tiny_checkpoint, client):
    """A generated 4 x 96 x 160 volume (blocks 4 x 32 x 32): levels 4x48x80 and 4x24x40, whose
    blocks do not divide them (partial edge shards)."""
    job = JobConfig.model_validate(
        {
            "out": str(tmp_path_factory.mktemp("pyr") / "p.zarr"),
            "volume": {"shape": (4, 96, 160), "spacing_um": (3.0, 0.5, 0.5),
                       "origin_um": (10.0, -20.0, 5.0)},
            "storage": {"block": (4, 32, 32)},
            "diffusion": {"steps": 1, "seed": 2},
            "checkpoint": str(tiny_checkpoint),
        }
    )  # fmt: skip
    lifecycle.generate(job, client)
    return job


def test_every_level_opens_with_xarray_in_micrometres(pyramid_store):
    job, root = pyramid_store, pyramid_store.out
    levels = pyramid.plan_levels(job)
    assert [lvl.shape for lvl in levels] == [(4, 96, 160), (4, 48, 80), (4, 24, 40)]
    ome = store.group_attrs(root)["ome"]["multiscales"][0]
    previous = None
    for lvl, dataset in zip(levels, ome["datasets"], strict=True):
        ds = xr.open_zarr(root, group=lvl.group or None)
        image = ds["image"]
        assert image.dims == ("c", "z", "y", "x") and image.shape == (2, *lvl.shape)
        assert list(ds["c"].values) == ["DAPI", "PolyT"]
        transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
        scale, translation = transforms["scale"]["scale"], transforms["translation"]["translation"]
        for axis, name in enumerate("zyx", start=1):
            assert ds[name].attrs["units"] == "micrometer"
            # xarray's coordinates are the OME transform of the voxel indices
            expected = np.arange(image.shape[axis]) * scale[axis] + translation[axis]
            np.testing.assert_allclose(ds[name].values, expected)
        values = image.values
        if previous is not None:  # each level is the window mean of the one above
            np.testing.assert_array_equal(values, _window_mean(previous, lvl.factor))
        previous = values
    assert previous.std() > 0


def test_levels_are_written_as_whole_shards(pyramid_store):
    root = pyramid_store.out
    for lvl in pyramid.plan_levels(pyramid_store)[1:]:
        shards = [p for p in (root / lvl.path / "c").rglob("*") if p.is_file()]
        assert len(shards) == int(np.prod(lvl.grid()))  # one file per output block
        meta = json.loads((root / lvl.path / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, *lvl.block]
        assert meta["dimension_names"] == ["c", "z", "y", "x"]


def test_ome_ngff_metadata_validates(pyramid_store):
    from ome_zarr_models.v05.image import Image

    root = pyramid_store.out
    group = zarr.open_group(str(root), mode="r")
    image = Image.from_zarr(group)
    (multiscale,) = image.ome_attributes.multiscales
    assert image.ome_attributes.version == "0.5"
    assert [a.name for a in multiscale.axes] == ["c", "z", "y", "x"]
    assert [a.unit for a in multiscale.axes[1:]] == ["micrometer"] * 3
    assert [d.path for d in multiscale.datasets] == [
        "image", "pyramid/1/image", "pyramid/2/image"]  # fmt: skip
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    assert scales == [[1.0, 3.0, 0.5, 0.5], [1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 2.0, 2.0]]
    origin = multiscale.datasets[0].coordinateTransformations[1].translation
    assert origin == [0.0, 11.5, -19.75, 5.25]  # origin + half a voxel: voxel centres


def test_the_validator_rejects_broken_metadata(pyramid_store, tmp_path):
    """The validation has teeth: a level path that is not there, or levels out of order (finest
    first is required), are refused."""
    from ome_zarr_models.v05.image import Image
    from pydantic import ValidationError

    good = zarr.open_group(str(pyramid_store.out), mode="r").attrs.asdict()["ome"]
    for breakage in ("path", "order"):
        ome = copy.deepcopy(good)
        datasets = ome["multiscales"][0]["datasets"]
        if breakage == "path":
            datasets[1]["path"] = "pyramid/9/image"
        else:
            datasets[1], datasets[2] = datasets[2], datasets[1]
        broken = zarr.open_group(str(tmp_path / f"{breakage}.zarr"), mode="w", zarr_format=3)
        broken.attrs["ome"] = ome
        for lvl in pyramid.plan_levels(pyramid_store):
            broken.create_array(lvl.path, shape=(2, *lvl.shape), dtype="uint8",
                                dimension_names=("c", "z", "y", "x"))  # fmt: skip
        with pytest.raises((ValidationError, ValueError)):
            Image.from_zarr(zarr.open_group(str(tmp_path / f"{breakage}.zarr"), mode="r"))
