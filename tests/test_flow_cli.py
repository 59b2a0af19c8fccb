"""The Prefect flow (ephemeral mode) and the ``tera`` command, end to end on a real cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _small_generate(out, block: str, checkpoint) -> list[str]:
    """``tera generate`` arguments for an 8 x 64 x 64 volume."""
    return ["generate", "--out", str(out), "--shape", "8,64,64", "--block", block,
            "--checkpoint", str(checkpoint)]  # fmt: skip


def _cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory, tiny_checkpoint):
    """One run of the real Prefect flow, through ``tera generate`` with overrides."""
    out = tmp_path_factory.mktemp("flow") / "gen.zarr"
    result = _cli(
        "generate",
        "--out",
        str(out),
        "--shape",
        "8,64,96",
        "--block",
        "4,32,32",
        "--workers",
        "2",
        "--seed",
        "5",
        "--steps",
        "2",
        "--checkpoint",
        str(tiny_checkpoint),
    )
    assert result.exit_code == 0, result.output
    return out


def test_output_opens_with_xarray(flow_store):
    ds = xr.open_zarr(flow_store)
    image = ds["image"]
    assert image.dims == ("c", "z", "y", "x")
    assert image.shape == (2, 8, 64, 96)
    assert list(ds["c"].values) == ["DAPI", "PolyT"]
    assert ds["x"].attrs["units"] == "micrometer"
    np.testing.assert_allclose(ds["z"].values, (np.arange(8) + 0.5) * 4.0)
    np.testing.assert_allclose(ds["x"].values[:3], [0.5, 1.5, 2.5])
    meta = ds.attrs["tera_pipeline"]
    assert meta["seed"] == 5 and meta["status"] == "complete"
    assert meta["config"]["volume"]["shape"] == [8, 64, 96]
    assert ds["conditioning"].dims == ("gene", "zbin", "ybin", "xbin")
    assert "Slc17a7" in list(ds["gene"].values)
    assert float(ds["conditioning"].sum()) > 0
    values = image.values
    assert values.std() > 0
    assert not (flow_store / "_scratch").exists()


def test_output_opens_with_zarr_python(flow_store):
    group = zarr.open_group(str(flow_store), mode="r")
    arr = group["image"]
    assert arr.shape == (2, 8, 64, 96)
    assert arr.metadata.dimension_names == ("c", "z", "y", "x")
    ds = xr.open_zarr(flow_store)
    np.testing.assert_array_equal(arr[:], ds["image"].values)


def test_shards_are_whole_blocks(flow_store):
    """Each block writes one shard file: 2 x 2 x 3 blocks -> 12 shard files, each a whole block."""
    shards = sorted(p for p in (flow_store / "image" / "c").rglob("*") if p.is_file())
    assert len(shards) == 12


def test_bad_block_gives_one_line_error(tmp_path, tiny_checkpoint):
    result = runner.invoke(
        app,
        _small_generate(tmp_path / "x.zarr", "3,32,32", tiny_checkpoint),
    )
    assert result.exit_code == 2
    assert "not a whole number of strides" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_existing_output_is_not_overwritten(flow_store, tiny_checkpoint):
    before = (flow_store / "zarr.json").read_bytes()
    result = runner.invoke(
        app,
        _small_generate(flow_store, "4,32,32", tiny_checkpoint),
    )
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (flow_store / "zarr.json").read_bytes() == before


def test_yaml_config_with_overrides(tmp_path, tiny_checkpoint):
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "volume": {"shape": [4, 32, 32]},
                "storage": {"block": [4, 32, 32]},
                "diffusion": {"steps": 1},
                "cluster": {"workers": 1, "dashboard_address": ":0"},
                "checkpoint": str(tiny_checkpoint),
            }
        )
    )
    out = tmp_path / "y.zarr"
    result = _cli("generate", str(config), "--out", str(out), "--seed", "9")
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(out)
    assert ds["image"].shape == (2, 4, 32, 32)
    assert ds.attrs["tera_pipeline"]["seed"] == 9
