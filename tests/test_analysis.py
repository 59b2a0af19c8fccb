"""``tera evaluate`` and ``tera analyze attention`` on real stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.analysis import attention
from tera_pipeline.core.geometry import Box
from tera_pipeline.evaluation.metrics import detect_nuclei, seam_score, ssim
from tera_pipeline.evaluation.report import evaluate, naive_tiling_job
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs.synthetic import SyntheticBrain

runner = CliRunner()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_checkpoint, client):
    """Two small stores of the same tissue with two noise seeds."""
    from tera_pipeline.core.config import JobConfig

    tmp = tmp_path_factory.mktemp("analysis")
    jobs = []
    for seed in (1, 2):
        job = JobConfig.model_validate(
            {
                "out": str(tmp / f"seed{seed}.zarr"),
                "volume": {"shape": (8, 64, 64)},
                "storage": {"block": (4, 32, 32)},
                "diffusion": {"steps": 2, "seed": seed},
                "checkpoint": str(tiny_checkpoint),
            }
        )
        lifecycle.generate(job, client)
        jobs.append(job)
    return jobs


@pytest.mark.slow  # ~50 s: two analyses, each on its own one-worker cluster
def test_attention_maps_open_on_the_grid_and_reproduce_across_seeds(generated):
    results = []
    for job in generated:
        result = runner.invoke(
            app,
            [
                "analyze",
                "attention",
                str(job.out),
                "--workers",
                "1",
                "--pairs",
                "Slc17a6/Slc17a7,Nr4a2/Th",
            ],
        )
        assert result.exit_code == 0, result.output
        ds = xr.open_zarr(job.out)
        pairs = ds[attention.PAIRS_ARRAY]
        assert pairs.dims == ("pair", "zpatch", "ypatch", "xpatch")
        tiles = tuple(n // s for n, s in zip(job.volume.shape, job.lattice.stride, strict=True))
        assert pairs.shape == (2, *tiles)  # one value per stride tile
        assert list(ds["pair"].values) == ["Slc17a6/Slc17a7", "Nr4a2/Th"]
        half, stride = job.lattice.patch[1] / 2, job.lattice.stride[1]
        centres = [half, half + stride]  # patch centres, µm (1 µm pixels)
        np.testing.assert_allclose(ds["ypatch"].values[:2], centres)
        matrix = ds[attention.MATRIX_ARRAY]
        assert matrix.dims == ("zblock", "yblock", "xblock", "gene", "gene_to")
        m = matrix.values
        np.testing.assert_allclose(m.sum(axis=-1), 1.0, rtol=1e-5)  # softmax rows
        results.append(m.reshape(-1, m.shape[-1] ** 2))
        assert (job.out.parent / f"{job.out.stem}.attention.png").is_file()
    r = np.corrcoef(results[0].mean(axis=0), results[1].mean(axis=0))[0, 1]
    print(f"gene x gene attention, two generation seeds: Pearson r = {r:.4f}")
    assert r >= 0.9


def test_unknown_gene_pair_is_a_clear_error(generated):
    result = runner.invoke(
        app, ["analyze", "attention", str(generated[0].out), "--pairs", "Foo/Th"]
    )
    assert result.exit_code == 2
    assert "not in the panel" in result.output


def test_evaluate_writes_json_and_png(generated, client, tmp_path):
    report = evaluate(generated[0].out, client, tmp_path)
    saved = json.loads((tmp_path / "seed1.evaluation.json").read_text())
    assert (tmp_path / "seed1.evaluation.png").stat().st_size > 10_000
    for key in ("fidelity", "seams", "truth", "nuclei"):
        assert key in saved
    seams = report["seams"]
    assert seams["engine"]["face_period"] == list(generated[0].lattice.stride[1:])  # [32, 32]
    assert seams["naive_tiling"]["face_period"] == [32, 32]
    assert len(saved["truth"]["ssim_per_slice"]) == 8


def test_naive_tiling_is_one_fixed_lattice_of_whole_patches(generated, tmp_path):
    """The baseline of ``tera evaluate``: stride = patch, the same unmoved, unwrapped lattice at
    every step, whatever the engine's lattice (the default moves and wraps)."""
    job = generated[0]
    assert job.lattice_at(0).offset != (0, 0, 0)  # the engine's lattice moves
    naive = naive_tiling_job(job, tmp_path / "naive.zarr")
    for step in range(naive.diffusion.steps):
        lattice = naive.lattice_at(step)
        assert lattice.stride == lattice.patch and lattice.offset == (0, 0, 0)
        assert not any(lattice.wrap_axes(naive.volume.shape))


def test_seam_score_sees_tile_edges(tmp_path):
    """A synthetic image with steps at tile faces scores > 1; a smooth one scores about 1."""
    from tera_pipeline.storage import store

    rng = np.random.default_rng(0)
    smooth = rng.integers(100, 110, (2, 2, 64, 64)).astype(np.uint8)
    tiled = smooth.copy()
    tiled[:, :, :, 32:] += 40
    tiled[:, :, 32:, :] += 20
    spec = store.ArraySpec(
        "image", (2, 2, 64, 64), "uint8", ("c", "z", "y", "x"), (2, 2, 64, 64), (2, 2, 32, 32)
    )
    for name, data in (("smooth", smooth), ("tiled", tiled)):
        arr = store.create_array(tmp_path / name, spec)
        store.write_box(arr, Box((0, 0, 0), (2, 64, 64)), data)
    assert seam_score(tmp_path / "smooth", (32, 32))["seam_score"] == pytest.approx(1.0, abs=0.1)
    assert seam_score(tmp_path / "tiled", (32, 32))["seam_score"] > 2.0


def test_metrics_on_ground_truth():
    brain = SyntheticBrain(0)
    box = Box((0, 0, 0), (8, 96, 96))
    truth = brain.render(box)
    assert ssim(truth[0, 3], truth[0, 3]) == pytest.approx(1.0)
    assert ssim(truth[0, 3], truth[0, 3][::-1]) < 0.5
    nuclei = detect_nuclei(truth[0], brain.spacing)
    cells = len(brain.cells(box))
    assert 0.5 * cells < nuclei["count"] < 1.5 * cells
    assert 2.0 < np.median(nuclei["radius_um"]) < 8.0
