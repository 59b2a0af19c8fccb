"""``tera export --format ome-zarr-0.4``: the zarr v2 / OME-Zarr 0.4 copy of a generated store,
read back bitwise by zarr-python, by ome-zarr-py (the reader under napari-ome-zarr), by xarray's
``open_datatree``; and its refusals, which write nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from tera_pipeline.storage import export, store
from tests.conftest import tiny_job

LEVELS = {"0/image": (2, 4, 96, 160), "1/image": (2, 4, 48, 80), "2/image": (2, 4, 24, 40)}
SOURCES = {"0/image": "image", "1/image": "pyramid/1/image", "2/image": "pyramid/2/image"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME and the working directory in a temporary folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_checkpoint, client):
    """A generated 4 x 96 x 160 volume in 4 x 32 x 32 blocks: three levels, the coarser ones
    with partial edge shards."""
    from tera_pipeline.generation.lifecycle import generate

    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp))
        mp.chdir(tmp)
        job = tiny_job(tmp / "s.zarr", (4, 96, 160), (4, 32, 32), 1, 4, tiny_checkpoint)
        generate(job, client)
    return job.out


@pytest.fixture(scope="module")
def exported(generated, tmp_path_factory):
    dest = tmp_path_factory.mktemp("dest") / "nested" / "copy.ome.zarr"
    written = export.export_ome_zarr_04(generated, dest)
    assert written["levels"] == {k: list(v) for k, v in LEVELS.items()}
    assert written["bins"] == ["conditioning", "cell_count"]
    return dest


def test_zarr_v2_copy_is_bitwise_equal(generated, exported):
    source = zarr.open_group(generated, mode="r")
    copy = zarr.open_group(exported, mode="r", zarr_format=2)
    for key, path in SOURCES.items():
        array = copy[key]
        assert array.metadata.zarr_format == 2 and array.dtype == np.uint8
        assert array.shape == LEVELS[key] and array.attrs["_ARRAY_DIMENSIONS"] == list("czyx")
        np.testing.assert_array_equal(array[...], source[path][...])
    for name in ("conditioning", "cell_count"):
        np.testing.assert_array_equal(copy[f"bins/{name}"][...], source[name][...])
    meta = json.loads((exported / "0" / "image" / ".zarray").read_text())
    assert meta["chunks"] == [2, 4, 32, 32] and meta["compressor"]["cname"] == "zstd"
    assert not list(exported.rglob("zarr.json"))  # no v3 metadata: older readers see one format


def test_ome_zarr_04_metadata(generated, exported):
    """The 0.4 attributes carry the store's 0.5 axes, transforms and channels; the public
    ``ome-zarr-models`` validates them."""
    from ome_zarr_models.v04.image import Image
    from pydantic_zarr.v2 import ArraySpec

    ome = store.group_attrs(generated)["ome"]
    attrs = json.loads((exported / ".zattrs").read_text())
    (scale,) = attrs["multiscales"]
    assert scale["version"] == "0.4" and scale["axes"] == ome["multiscales"][0]["axes"]
    assert [d["path"] for d in scale["datasets"]] == list(LEVELS)
    transforms = [d["coordinateTransformations"] for d in ome["multiscales"][0]["datasets"]]
    assert [d["coordinateTransformations"] for d in scale["datasets"]] == transforms
    assert attrs["omero"]["channels"] == ome["omero"]["channels"]
    Image.model_rebuild(_types_namespace={"ArraySpec": ArraySpec})  # ome-zarr-models 1.6
    image = Image.from_zarr(zarr.open_group(exported, mode="r", zarr_format=2))
    assert [d.path for d in image.attributes.multiscales[0].datasets] == list(LEVELS)


def test_ome_zarr_py_reads_the_levels(generated, exported):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    node = next(iter(Reader(parse_url(str(exported), fmt=FormatV04()))()))
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    assert [tuple(level.shape) for level in node.data] == list(LEVELS.values())
    assert node.metadata["channel_names"] == ["DAPI", "PolyT"]
    assert [a["unit"] for a in node.metadata["axes"][1:]] == ["micrometer"] * 3
    source = zarr.open_group(generated, mode="r")
    np.testing.assert_array_equal(np.asarray(node.data[2]), source["pyramid/2/image"][...])


def test_datatree_opens_the_copy_but_not_the_store(generated, exported):
    """The store's root image shares z, y, x with the pyramid groups below it, at other sizes:
    the tree is refused as not aligned. The copy's levels are sibling groups under an empty
    root, each with its own µm coordinates: one tree."""
    with pytest.raises(ValueError, match="is not aligned with its parents"):
        xr.open_datatree(generated, engine="zarr")
    tree = xr.open_datatree(exported, engine="zarr")
    for key, shape in LEVELS.items():
        level = tree[key.split("/")[0]]
        assert level["image"].shape == shape and level["image"].dtype == np.uint8
        assert list(level["c"].values) == ["DAPI", "PolyT"]
        per_group = xr.open_zarr(generated, group=SOURCES[key].rpartition("/")[0] or None)
        xr.testing.assert_equal(level["image"], per_group["image"])
    assert tree["bins"]["conditioning"].dims == ("gene", "zbin", "ybin", "xbin")


def _listing(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"")
                  for p in path.rglob("*"))  # fmt: skip


def test_refusals_write_nothing(generated, home):
    full = home / "full"
    full.mkdir()
    (full / "theirs.txt").write_text("keep")
    before = _listing(generated)
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_ome_zarr_04(generated, full)
    assert _listing(full) == [("theirs.txt", b"keep")]
    with pytest.raises(export.ExportError, match="not a tera-pipeline store"):
        export.export_ome_zarr_04(full, home / "new")
    with pytest.raises(export.ExportError, match="inside the store"):
        export.export_ome_zarr_04(generated, generated / "copy")
    (home / "file").write_text("x")
    with pytest.raises(export.ExportError, match="is a file"):
        export.export_ome_zarr_04(generated, home / "file")
    unfinished = home / "unfinished.zarr"
    shutil.copytree(generated, unfinished)
    tera = store.group_attrs(unfinished)["tera_pipeline"] | {"status": "running"}
    store.update_attrs(unfinished, {"tera_pipeline": tera})
    with pytest.raises(export.ExportError, match="not finished"):
        export.export_ome_zarr_04(unfinished, home / "new")
    assert not (home / "new").exists() and not (generated / "copy").exists()
    assert _listing(generated) == before


def test_a_failure_removes_only_what_the_export_wrote(generated, home, monkeypatch):
    """Midway, someone drops a file into the copy and the export fails: the
    export's own files and folders go, theirs stays (and so does its folder)."""
    write, calls, drop = export._write_chunk, [], [home / "empty" / "0" / "theirs.txt"]

    def failing(folder, *args):
        calls.append(folder)
        if len(calls) == 20:  # level 0 is written (15 chunks, 4 coordinates)
            for path in drop:
                path.write_text("keep")
            raise OSError("disk full")
        return write(folder, *args)

    monkeypatch.setattr(export, "_write_chunk", failing)
    (home / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        export.export_ome_zarr_04(generated, home / "empty", threads=1)
    assert _listing(home / "empty") == [("0", b""), ("0/theirs.txt", b"keep")]
    calls.clear(), drop.clear()
    with pytest.raises(OSError, match="disk full"):
        export.export_ome_zarr_04(generated, home / "new" / "deep" / "copy")
    assert not (home / "new").exists()  # the folders it made, parents included, are gone


def test_the_command(generated, home):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(generated), "--out", "copy"])
    assert result.exit_code == 0, result.output
    assert "wrote copy (ome-zarr-0.4, zarr v2): 0/image 2x4x96x160" in result.output
    assert zarr.open_group(home / "copy", mode="r", zarr_format=2)["2/image"].shape == (
        2,
        4,
        24,
        40,
    )
    result = runner.invoke(app, ["export", str(generated), "--out", "copy"])
    assert result.exit_code == 2 and "error: refusing to export to copy: it is not empty" in (
        result.output
    )
