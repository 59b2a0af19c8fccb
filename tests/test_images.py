"""Microscope images as instruments write them (an OME-TIFF with its voxel size and channel
names; MERSCOPE mosaics with their µm-to-pixel affine) become the (c, z, y, x) uint8 array that
training reads, with the spacing and origin from the files; training then takes it as is."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.images import PERCENTILES, import_images, open_images
from tera_pipeline.training.user_data import read_image

tifffile = pytest.importorskip("tifffile")
runner = CliRunner()


def _volume(seed: int = 0, shape=(2, 4, 64, 96)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 400.0, shape) + np.arange(shape[0])[:, None, None, None] * 500).astype(
        np.uint16
    )


def write_ome_tiff(path, data: np.ndarray, size=(1.5, 0.2125, 0.2125)) -> None:
    """A CZYX OME-TIFF as Xenium's morphology files are: uint16, voxel size and channel names."""
    tifffile.imwrite(
        path, data, ome=True,
        metadata={"axes": "CZYX", "PhysicalSizeZ": size[0], "PhysicalSizeY": size[1],
                  "PhysicalSizeX": size[2], "Channel": {"Name": ["DAPI", "PolyT"]}},
    )  # fmt: skip


def write_merscope_images(folder, data: np.ndarray, px_per_um=9.259, shift=(-120.5, 88.0)) -> None:
    """MERSCOPE's images/: mosaic_{stain}_z{N}.tif and the 3 x 3 µm-to-pixel affine."""
    images = folder / "images"
    images.mkdir(parents=True)
    for c, stain in enumerate(("DAPI", "PolyT")):
        for z in range(data.shape[1]):
            tifffile.imwrite(images / f"mosaic_{stain}_z{z}.tif", data[c, z])
    affine = np.array([[px_per_um, 0, shift[0]], [0, px_per_um, shift[1]], [0, 0, 1]])
    np.savetxt(images / "micron_to_mosaic_pixel_transform.csv", affine, delimiter=" ")


def _expected(data: np.ndarray, c: int, downsample: int = 1) -> np.ndarray:
    """Channel ``c`` scaled as the import does, computed here from the raw planes."""
    values = np.concatenate([data[c, z, ::4, ::4].ravel() for z in range(data.shape[1])])
    lo, hi = np.percentile(values.astype(np.float64), PERCENTILES)
    plane = data[c].astype(np.float32)
    if downsample > 1:
        z, y, x = plane.shape
        plane = plane.reshape(z, y // downsample, downsample, x // downsample, downsample)
        plane = plane.mean(axis=(2, 4))
    return np.clip((plane - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def test_an_ome_tiff_imports_with_its_voxel_size_and_channel_names(tmp_path):
    data = _volume()
    write_ome_tiff(tmp_path / "morphology_focus.ome.tif", data)
    source = open_images(tmp_path / "morphology_focus.ome.tif")
    assert source.channels == ("DAPI", "PolyT") and source.depth == 4
    assert source.spacing_um == (1.5, 0.2125, 0.2125)
    tiff = str(tmp_path / "morphology_focus.ome.tif")
    args = ["import-images", tiff, "--out", str(tmp_path / "img.zarr"), "--downsample", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ome-tiff: 2 channels (DAPI, PolyT)" in result.output
    image = read_image(tmp_path / "img.zarr")
    assert image.shape == (2, 4, 32, 48)
    for c in range(2):
        np.testing.assert_array_equal(image[c], _expected(data, c, downsample=2))
    attrs = json.loads((tmp_path / "img.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["tera_pipeline"]["images"]["spacing_um"] == [1.5, 0.425, 0.425]
    again = runner.invoke(app, ["import-images", tiff, "--out", str(tmp_path / "img.zarr")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_merscope_mosaics_import_with_the_affine_and_need_a_z_step(tmp_path):
    data = _volume(1, (2, 3, 48, 64))
    write_merscope_images(tmp_path / "region_0", data)
    with pytest.raises(InputError, match=r"pass --z-step \(µm between planes"):
        open_images(tmp_path / "region_0")
    source = open_images(tmp_path / "region_0", z_step_um=1.5)
    assert source.layout == "merscope mosaics" and source.channels == ("DAPI", "PolyT")
    np.testing.assert_allclose(source.spacing_um, (1.5, 1 / 9.259, 1 / 9.259))
    np.testing.assert_allclose(source.origin_um[1:], (-88.0 / 9.259, 120.5 / 9.259))
    written = import_images(source, tmp_path / "m.zarr", channels=["PolyT"])
    image = read_image(tmp_path / "m.zarr")
    assert image.shape == (1, 3, 48, 64) and written["channels"] == ["PolyT"]
    np.testing.assert_array_equal(image[0], _expected(data, 1))


def test_training_reads_imported_images_at_their_recorded_spacing(tmp_path):
    """``tera train denoiser --images`` on an imported array takes its recorded spacing: cells
    placed in µm of that spacing fall where they should (else they would lie outside)."""
    data = _volume(2, (2, 4, 128, 128))
    write_ome_tiff(tmp_path / "m.ome.tif", data, size=(4.0, 2.0, 2.0))  # 8 x 256 x 256 µm
    assert runner.invoke(app, ["import-images", str(tmp_path / "m.ome.tif"), "--out",
                               str(tmp_path / "img.zarr")]).exit_code == 0  # fmt: skip
    rng = np.random.default_rng(0)
    n = 200
    cells = pd.DataFrame({"x": rng.uniform(0, 255, n), "y": rng.uniform(0, 255, n),
                          "z": rng.uniform(0, 15.9, n), "Gad1": rng.integers(0, 9, n),
                          "Snap25": rng.integers(0, 9, n)})  # fmt: skip
    cells.to_csv(tmp_path / "cells.csv", index=False)
    args = ["train", "denoiser", "--images", str(tmp_path / "img.zarr"), "--cells",
            str(tmp_path / "cells.csv"), "--out", str(tmp_path / "d.safetensors"), "--steps", "2",
            "--batch", "2", "--size", "tiny"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.safetensors").stat().st_size > 10_000
    too_fine = runner.invoke(app, [*args, "--spacing", "4,1,1", "--out", str(tmp_path / "e.st")])
    assert too_fine.exit_code == 2 and "outside" in too_fine.output
