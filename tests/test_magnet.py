"""MagNet over the chunk grid: exact block-wise inference, the bin grid, metrics, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from flows.cli import app
from models.checkpoint import CheckpointError, save_checkpoint
from models.magnet import MagNet, MagNetConfig, magnet_loss
from tera_pipeline.analysis import magnet
from tera_pipeline.analysis.expression_metrics import expression_metrics
from tera_pipeline.analysis.magnet_levels import array_reader, level_inputs
from tera_pipeline.core.errors import AnalysisError
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs.synthetic import GENE_PANEL
from tera_pipeline.storage import layout, store
from tera_pipeline.training.loop import Recipe
from tera_pipeline.training.magnet import WindowSampler, synthetic_pairs, train_magnet

from .conftest import tiny_job

SMALL = MagNetConfig(dim=32, heads=2, level_layers=1)


def write_magnet(path, genes=GENE_PANEL, seed: int = 0):
    torch.manual_seed(seed)
    model = MagNet(MagNetConfig.from_dict(SMALL.to_dict() | {"genes": len(genes)}))
    meta = {"config": model.config.to_dict(), "genes": list(genes), "bin": [1, 16, 16]}
    save_checkpoint(path, model, "magnet", meta)
    return path


@pytest.fixture(scope="module")
def magnet_checkpoint(tmp_path_factory):
    return write_magnet(tmp_path_factory.mktemp("magnet") / "magnet.safetensors")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_checkpoint, client):
    """The same generated volume (4 x 176 x 208) written with two block sizes."""
    root = tmp_path_factory.mktemp("magnet-stores")
    out = {}
    for block in ((4, 32, 64), (4, 96, 48)):  # 48: whole strides of the overlapped lattice
        job = tiny_job(root / f"b{block[1]}.zarr", (4, 176, 208), block, 1, 3, tiny_checkpoint,
                       lattice={"stride": (2, 16, 16)})  # fmt: skip
        lifecycle.generate(job, client)
        out[block] = job.out
    return out


def test_blockwise_equals_whole_volume_on_the_conditioning_grid(stores, magnet_checkpoint, client):
    model, _ = magnet.load_magnet(magnet_checkpoint)
    first = next(iter(stores.values()))
    image = store.open_array(first, layout.IMAGE).read().result()
    whole = magnet.predict_volume(model, image, (1, 16, 16))
    assert whole.std() > 0  # the prediction depends on the image
    for block, root in stores.items():
        magnet.run(root, client, magnet_checkpoint)
        ds = xr.open_zarr(root, consolidated=False)
        pred, cond = ds[magnet.EXPRESSION], ds[layout.CONDITIONING]
        assert pred.dims == cond.dims == ("gene", "zbin", "ybin", "xbin")
        for dim in pred.dims:
            np.testing.assert_array_equal(pred[dim].values, cond[dim].values)
        assert list(pred["gene"].values) == list(GENE_PANEL)
        err = np.abs(pred.values - whole).max() / np.abs(whole).max()
        print(f"block {block}: relative error {err:.2e}")
        assert err < 1e-5


def test_context_reaches_the_region_neighbours_and_no_further(magnet_checkpoint):
    """Bin (1, 1) sees its region tile's 3 x 3 neighbourhood (up to 256 px here), not beyond:
    the halo a block reads is enough, and the tile levels do change the prediction."""
    model, _ = magnet.load_magnet(magnet_checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (2, 1, 512, 512), dtype=np.uint8)
    base = magnet.predict_volume(model, image, (1, 16, 16))[:, 0, 1, 1]
    far = image.copy()
    far[:, :, 300:, 300:] = 0
    np.testing.assert_array_equal(magnet.predict_volume(model, far, (1, 16, 16))[:, 0, 1, 1], base)
    near = image.copy()
    near[:, :, 160:250, 160:250] = 0  # neighbour region tile (1, 1), beyond the bin's spots
    assert not np.allclose(magnet.predict_volume(model, near, (1, 16, 16))[:, 0, 1, 1], base)


def test_level_inputs_are_aligned_to_the_global_grid():
    image = np.arange(2 * 1 * 256 * 256, dtype=np.uint32).reshape(2, 1, 256, 256) % 251
    image = image.astype(np.uint8)
    read = array_reader(image)
    volume = Box((0, 0, 0), (1, 16, 16))
    whole = level_inputs(read, volume, volume, (1, 16, 16), SMALL)
    part = level_inputs(read, Box((0, 5, 9), (1, 3, 2)), volume, (1, 16, 16), SMALL)
    # crop of bin (0, 6, 10): in the whole-volume grid at ring offset +1
    np.testing.assert_array_equal(part.crops[0, 2, 2], whole.crops[0, 7, 11])
    # its spot tile is (1, 2), region tile (0, 1), whatever the block
    k = part.spot_of_bin[2, 2]
    gw = part.spots.shape[2]
    np.testing.assert_array_equal(part.spots[0, k // gw, k % gw], whole.spots[0, 2, 3])
    assert not whole.bin_valid[0, 0, 0] and whole.bin_valid[0, 1, 1]


def test_loss_has_the_papers_terms_and_trains(tmp_path):
    data = synthetic_pairs((3,), (2, 128, 128))
    sampler = WindowSampler(data, SMALL)
    inputs, targets = sampler.batch(2, np.random.default_rng(0))
    out = MagNet(SMALL)(inputs)
    terms = magnet_loss(out, targets, SMALL.spot_bins)
    assert set(terms) >= {"mse", "pcc", "pcc_spot", "pcc_region", "consistency", "loss"}
    assert terms["loss"].requires_grad
    history = train_magnet(
        tmp_path / "m.safetensors", 6, Recipe(2, 1e-3), config=SMALL, data=(data, data), log_every=3
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 1.5
    model, meta = magnet.load_magnet(tmp_path / "m.safetensors")
    assert meta["genes"] == list(GENE_PANEL) and meta["training"]["steps"] == 6


def test_metrics_at_three_resolutions():
    rng = np.random.default_rng(1)
    truth = rng.poisson(3.0, (8, 2, 8, 8)).astype(np.float32)
    perfect = expression_metrics(truth, truth)
    assert set(perfect) == {"1x1", "2x2", "4x4"}
    assert perfect["1x1"]["pcc_gene"] == pytest.approx(1.0) and perfect["4x4"]["mse"] == 0
    assert perfect["2x2"]["bins"] == 2 * 4 * 4
    assert set(expression_metrics(truth[:, :, :2, :4], truth[:, :, :2, :4])) == {"1x1", "2x2"}
    noisy = expression_metrics(rng.poisson(3.0, truth.shape), truth)
    assert noisy["1x1"]["pcc_gene"] < 0.5 and noisy["1x1"]["mae"] > 0


def _cli(*args):
    return CliRunner().invoke(app, ["analyze", "magnet", *map(str, args)])


def test_clear_errors(stores, magnet_checkpoint, tmp_path, client):
    src = next(iter(stores.values()))
    other = write_magnet(tmp_path / "other.safetensors", genes=tuple(reversed(GENE_PANEL))[:20])
    result = _cli(src, "--checkpoint", other)
    assert result.exit_code == 2 and "another gene panel" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="another gene panel"):
        magnet.check(src, other)

    no_cond = tmp_path / "no_cond.zarr"
    shutil.copytree(src, no_cond)
    shutil.rmtree(no_cond / layout.CONDITIONING)
    result = _cli(no_cond, "--checkpoint", magnet_checkpoint)
    assert result.exit_code == 2 and "no conditioning array" in result.output
    magnet.check(no_cond, magnet_checkpoint, metrics=False)  # predicting alone is fine
    stamp = [(p, p.stat().st_mtime_ns) for p in Path(src).rglob("*") if p.is_file()]
    magnet.run(no_cond, client, magnet_checkpoint)  # a copied store is written where it is
    assert (no_cond / magnet.EXPRESSION / "zarr.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamp)  # the original is untouched

    no_image = tmp_path / "no_image.zarr"
    shutil.copytree(src, no_image)
    shutil.rmtree(no_image / layout.IMAGE)
    before = sorted(p.name for p in no_image.iterdir())
    result = _cli(no_image, "--checkpoint", magnet_checkpoint)
    assert result.exit_code == 2 and "no image array" in result.output
    with pytest.raises(AnalysisError, match="no image array"):
        magnet.run(no_image, None, magnet_checkpoint)
    assert sorted(p.name for p in no_image.iterdir()) == before  # nothing written


def test_cli_runs_the_prefect_flow_and_reports_each_resolution(stores, magnet_checkpoint):
    import json

    root = next(iter(stores.values()))
    result = _cli(root, "--checkpoint", magnet_checkpoint, "--workers", "1")
    assert result.exit_code == 0, result.output
    for resolution in ("1x1", "2x2", "4x4"):
        assert f"{resolution} bins vs conditioning: PCC per bin" in result.output
    report = json.loads(Path(root).with_suffix(".magnet.json").read_text())
    assert report["run"]["blocks"] == 6 * 4  # 176 x 208 in blocks of 32 x 64
    assert set(report["cycle_consistency"]) == {"1x1", "2x2", "4x4"}
    assert -1 <= report["cycle_consistency"]["1x1"]["pcc_gene"] <= 1


def test_train_magnet_on_a_users_image_and_cells(tmp_path):
    """`tera train magnet --images ZARR --cells CSV`: a user's zarr array and its cell table."""
    import pandas as pd
    import zarr

    from tera_pipeline.inputs.synthetic import SyntheticBrain

    box = Box((0, 0, 0), (1, 288, 160))
    brain = SyntheticBrain(5)
    zarr.create_array(tmp_path / "img.zarr", data=brain.render(box))
    cells = brain.cells(box)
    frame = pd.DataFrame({a: cells.position_um[:, i] for i, a in enumerate("zyx")})
    for g, name in enumerate(GENE_PANEL):
        frame[name] = cells.counts[:, g]
    frame.to_csv(tmp_path / "cells.csv", index=False)
    out = tmp_path / "user_magnet.safetensors"
    args = ["train", "magnet", "--images", tmp_path / "img.zarr", "--cells", tmp_path / "cells.csv"]
    result = CliRunner().invoke(app, [*map(str, args), "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _, meta = magnet.load_magnet(out)
    assert meta["genes"] == list(GENE_PANEL) and meta["training"]["steps"] == 2
    bad = CliRunner().invoke(app, ["train", "magnet", "--images", str(tmp_path / "img.zarr")])
    assert bad.exit_code == 2 and "--images and --cells go together" in bad.output
