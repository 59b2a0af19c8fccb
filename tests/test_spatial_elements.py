"""SpatialData elements in a store: spatialdata.read_zarr reads SPATIA's cells and the bin tables
linked to their regions, in the store's µm frame; the root stays an OME-Zarr image."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.analysis import magnet, spatia, spatial_elements
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle
from tera_pipeline.storage import layout, ownership

from .test_magnet import write_magnet
from .test_spatia import write_tiny_spatia

ORIGIN = (100.0, -50.0, 2000.0)  # z, y, x µm


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_checkpoint, client) -> Path:
    """A generated 8 x 64 x 96 store (origin away from 0) after MagNet and SPATIA."""
    root = tmp_path_factory.mktemp("elements")
    job = JobConfig.model_validate(
        {
            "out": str(root / "gen.zarr"),
            "volume": {"shape": (8, 64, 96), "origin_um": ORIGIN},
            "storage": {"block": (4, 32, 32)},
            "diffusion": {"steps": 2, "seed": 3},
            "checkpoint": str(tiny_checkpoint),
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.chdir(root)
        lifecycle.generate(job, client)
        store = Path(job.out)
        magnet.run(store, client, write_magnet(root / "magnet.safetensors"))
        spatia.run(store, client, write_tiny_spatia(root / "spatia.safetensors"))
    return store


def _copy(store: Path, tmp_path: Path) -> Path:
    """The store and its .h5ad, elsewhere."""
    shutil.copytree(store, tmp_path / store.name)
    shutil.copy(spatia.h5ad_path(store), spatia.h5ad_path(tmp_path / store.name))
    return tmp_path / store.name


def read(store: Path, **kwargs):
    sd = pytest.importorskip("spatialdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sd.read_zarr(store, **kwargs)


def test_spatialdata_reads_cells_and_bins_linked_to_their_regions(analysed):
    sdata = read(analysed)
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    assert set(sdata.points) == {"cells"} and set(sdata.labels) == {"bins"}
    assert set(sdata.tables) == {"spatia", "magnet_expression", "conditioning"}
    assert not sdata.images  # the image stays at the root (not copied)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a table annotating a missing element, or ids' dtypes
        for table in sdata.tables.values():
            sdata.validate_table_in_spatialdata(table)

    # cells: the .h5ad's cells, one point each, linked by cell_id
    h5ad = anndata.read_h5ad(spatia.h5ad_path(analysed))
    cells, points = sdata.tables["spatia"], sdata.points["cells"].compute()
    assert get_table_keys(cells) == ("cells", "region", "cell_id")
    assert cells.n_obs == len(points) == h5ad.n_obs > 20
    np.testing.assert_array_equal(cells.obs["cell_id"], h5ad.obs["cell_id"])
    np.testing.assert_array_equal(np.sort(points.index), np.sort(h5ad.obs["cell_id"]))
    at = points.loc[h5ad.obs["cell_id"].to_numpy()]
    np.testing.assert_allclose(at[["x", "y", "z"]].to_numpy(), h5ad.obsm["spatial"])
    np.testing.assert_allclose(cells.obsm["X_spatia"], h5ad.obsm["X_spatia"])
    np.testing.assert_allclose(cells.layers["imputed"], h5ad.layers["imputed"])
    shift = get_transformation(sdata.points["cells"], "global")
    np.testing.assert_allclose(shift.translation, ORIGIN[::-1])  # x, y, z

    # bins: one label per bin of the conditioning grid, one row per bin, genes as var
    ds = xr.open_zarr(analysed, consolidated=False)
    labels = sdata.labels["bins"]
    assert labels.dims == ("z", "y", "x") and labels.shape == ds["cell_count"].shape
    ids = labels.values.ravel()
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # bin ids in C order
    for name in ("magnet_expression", "conditioning"):
        table = sdata.tables[name]
        assert get_table_keys(table) == ("bins", "region", "bin_id")
        assert list(table.var_names) == list(ds["gene"].values)
        order = np.argsort(table.obs["bin_id"].to_numpy())
        np.testing.assert_array_equal(table.obs["bin_id"].to_numpy()[order], ids)
        expected = ds[name].values.reshape(len(table.var_names), -1).T  # bins x genes
        np.testing.assert_allclose(table.X[order], expected)
        cell_count = table.obs["cell_count"].to_numpy()[order]
        np.testing.assert_allclose(cell_count, ds["cell_count"].values.ravel())
    # bin (z, y, x) = (1, 2, 3) starts at the origin plus its index times the bin size (µm)
    matrix = get_transformation(labels, "global").to_affine_matrix(("z", "y", "x"), ("z", "y", "x"))
    np.testing.assert_allclose(matrix @ [1, 2, 3, 1], [100 + 4, -50 + 32, 2000 + 48, 1])


def test_ome_zarr_readers_still_read_the_root_image(analysed):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    node = next(iter(Reader(parse_url(str(analysed)))()))
    assert node.load(Multiscales) is not None
    assert node.data[0].shape == (2, 8, 64, 96)  # (c, z, y, x) level 0: the root's `image`
    ome = json.loads((analysed / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["multiscales"][0]["datasets"][0]["path"] == "image"
    from ome_zarr_models.v05.image import Image

    image = Image.from_zarr(zarr.open_group(analysed, mode="r"))  # labels/ lists no image
    assert image.labels is not None and image.labels.attributes.ome.labels == []


def test_the_root_image_joins_the_spatialdata_object_without_a_copy(analysed):
    """The README's recipe: the root image, lazily, in the same ``global`` frame."""
    sdata = read(analysed)
    import dask.array as da
    from spatialdata.models import Image3DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    job = layout.job_of(analysed)
    image = Image3DModel.parse(
        da.from_zarr(str(analysed / "image")),
        dims=("c", "z", "y", "x"),
        c_coords=list(job.volume.stains),
        transformations={
            "global": Sequence(
                [Scale(list(job.volume.spacing_um), "zyx"), Translation(list(ORIGIN), "zyx")]
            )
        },
    )
    sdata.images["image"] = image
    assert sdata.images["image"].shape == (2, 8, 64, 96)


def test_large_grids_are_summed_into_coarser_bins(analysed, tmp_path):
    store = _copy(analysed, tmp_path)
    genes = len(layout.job_genes(store))
    written = spatial_elements.write_bins(store, max_values=genes * 12)
    assert written["factor"] == (4, 2, 2) and written["bins"] == 12  # 8 x 4 x 6 bins -> 2 x 2 x 3
    sdata = read(store)
    assert sdata.labels["bins"].shape == (2, 2, 3)
    ds = xr.open_zarr(store, consolidated=False)
    for name in ("magnet_expression", "conditioning"):
        table = sdata.tables[name]
        assert table.n_obs == 12
        np.testing.assert_allclose(table.X.sum(0), ds[name].values.sum((1, 2, 3)), rtol=1e-5)
    assert spatial_elements.coarsening((8, 4, 6), (4.0, 16.0, 16.0), 12) == (4, 2, 2)
    assert spatial_elements.coarsening((3, 1, 1), (1.0, 1.0, 1.0), 1) == (4, 1, 1)


def test_only_our_elements_are_replaced(analysed, tmp_path):
    store = _copy(analysed, tmp_path)
    ownership.check_replaceable(store)  # every element is ours: --overwrite may clear the store
    zarr.open_group(store / "points" / "mine", mode="w", zarr_format=3)  # a user's element
    with pytest.raises(ownership.OwnershipError, match="points/mine"):
        ownership.check_replaceable(store)
    spatial_elements.write_cells(store, spatia.h5ad_path(store))  # ours replaced, theirs kept
    assert (store / "points" / "mine" / "zarr.json").is_file()
    meta_path = store / "tables" / "conditioning" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["tera_pipeline"]  # as if a user had written it
    meta_path.write_text(json.dumps(meta))
    before = sorted(p.name for p in (store / "tables").iterdir())
    with pytest.raises(ownership.OwnershipError, match="tables/conditioning"):
        spatial_elements.write_bins(store)
    assert sorted(p.name for p in (store / "tables").iterdir()) == before  # nothing left behind
    result = CliRunner().invoke(app, ["analyze", "tables", str(store)])
    assert result.exit_code == 2 and "tables/conditioning" in result.output


def test_cli_rewrites_the_elements_beside_ome_labels(analysed, tmp_path):
    """`tera analyze tables` with an OME-Zarr `labels/nuclei` (ome.labels lists it) present:
    the labels group's list is kept, OME readers see nuclei only, spatialdata reads the rest."""
    store = _copy(analysed, tmp_path)
    labels = store / "labels"
    nuclei = {"version": "0.5", "labels": ["nuclei"]}
    (labels / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ome": nuclei}})
    )
    group = zarr.open_group(labels / "nuclei", mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((8, 64, 96), np.uint64), dimension_names=list("zyx"))
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    scale = [{"type": "scale", "scale": [4.0, 1.0, 1.0]}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": scale}]}
        ],
        "image-label": {"source": {"image": "../../"}},
    }
    result = CliRunner().invoke(app, ["analyze", "tables", str(store)])
    assert result.exit_code == 0, result.output
    assert "labels/bins" in result.output and "tables/spatia" in result.output
    assert json.loads((labels / "zarr.json").read_text())["attributes"]["ome"] == nuclei
    # spatialdata 0.7.0 reads OME-Zarr rasters only as its own "0.5-dev-spatialdata": it refuses
    # labels/nuclei ("0.5") unless told to skip it
    with pytest.raises(KeyError, match="0.5"):
        read(store)
    sdata = read(store, on_bad_files="warn")
    assert set(sdata.labels) == {"bins"} and len(sdata.tables) == 3
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    names = [n.zarr.basename() for n in Reader(parse_url(str(store)))()]
    assert "bins" not in names and "nuclei" in names
