"""The denoiser, its checkpoints (safetensors + config), and training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from models.checkpoint import DEFAULT_DENOISER, CheckpointError, load_denoiser, read_metadata
from models.denoiser import ConditionalUNet3D
from tera_pipeline.core import errors
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle, predictor
from tera_pipeline.inputs.synthetic import GENE_PANEL
from tera_pipeline.training.denoiser import TrainingData, sample_offset_batch, train_denoiser
from tera_pipeline.training.loop import Recipe
from tera_pipeline.training.user_data import UserData

from .conftest import TINY, write_random_checkpoint


def test_denoiser_shapes_and_gene_attention():
    model = ConditionalUNet3D(TINY).eval()
    x = torch.randn(3, 2, *TINY.patch)
    cond = torch.rand(3, TINY.genes, *TINY.cond_input) * 10
    eps = model(x, torch.tensor([0, 500, 999]), cond)
    assert eps.shape == x.shape
    attn = model.gene_attention(cond)
    assert attn.shape == (3, TINY.genes, TINY.genes)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, TINY.genes))


def test_conditioning_changes_the_prediction():
    model = ConditionalUNet3D(TINY).eval()
    x = torch.randn(1, 2, *TINY.patch)
    t = torch.tensor([300])
    a = model(x, t, torch.zeros(1, TINY.genes, *TINY.cond_input))
    b = model(x, t, torch.full((1, TINY.genes, *TINY.cond_input), 20.0))
    assert (a - b).abs().max() > 1e-4


def test_a_sub_bin_model_takes_a_wider_window_and_heeds_the_offset():
    """A patch that starts within a bin: one bin more in y and x, the offset moves the bins'
    features over the patch (zero offset, given or not, is the same)."""
    cfg = TINY
    assert cfg.cond_input == (6, 5, 5)
    assert dataclasses.replace(TINY, sub_bin_offsets=False).cond_input == (6, 4, 4)
    model = ConditionalUNet3D(cfg).eval()
    x = torch.randn(2, 2, *cfg.patch)
    t = torch.tensor([300, 300])
    cond = torch.rand(2, cfg.genes, *cfg.cond_input) * 10
    zero = torch.zeros(2, 3, dtype=torch.long)
    moved = torch.tensor([[0, 0, 0], [0, 5, 11]])
    with torch.inference_mode():
        a, b, c = model(x, t, cond), model(x, t, cond, zero), model(x, t, cond, moved)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], c[0], rtol=0, atol=0)
    assert (a[1] - c[1]).abs().max() > 1e-4


def test_offset_batches_cut_each_patch_where_its_window_says():
    """Image voxels carry their bin's value: after rotation and flips, each patch equals its
    window's footprint bins repeated over their voxels and cut at the drawn offset."""
    b, patch, context = (1, 16, 16), (4, 32, 32), (1, 1, 1)
    rng = np.random.default_rng(3)
    cond = rng.random((1, 8, 8, 8)).astype(np.float32)
    image = np.repeat(np.repeat(cond, 16, axis=2), 16, axis=3)
    data = TrainingData(np.concatenate([image, image]), cond, ("g",), b)
    x, c, offsets = sample_offset_batch(data, patch, context, (0, 1, 1), 24, rng)
    assert c.shape == (24, 1, 6, 5, 5) and x.shape == (24, 2, *patch)
    assert len({tuple(o) for o in offsets}) > 10 and offsets[:, 0].max() == 0
    for xi, ci, (_, oy, ox) in zip(x, c, offsets):
        footprint = ci[0, 1:-1, 1:-1, 1:-1]
        voxels = np.repeat(np.repeat(footprint, 16, axis=1), 16, axis=2)
        np.testing.assert_array_equal(xi[0], voxels[:, oy : oy + 32, ox : ox + 32])


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "d.safetensors"
    history = train_denoiser(
        out, 40, Recipe(batch=8, lr=3e-3), volume=(4, 128, 128), model_config=TINY, log_every=20
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model, meta = load_denoiser(out)
    assert meta["genes"] == list(GENE_PANEL)
    assert tuple(meta["config"]["patch"]) == TINY.patch
    assert "val_loss" in history[-1]


def test_missing_truncated_and_mismatched_checkpoints(tmp_path, small_job):
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "nope.safetensors")
    good = write_random_checkpoint(tmp_path / "good.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated|does not match"):
        load_denoiser(truncated)
    job = small_job.with_overrides(checkpoint=str(truncated))
    with pytest.raises(CheckpointError):
        lifecycle.prepare_store(job)
    assert not job.out.exists()


def test_checkpoint_for_another_gene_panel_is_refused(small_job):
    with pytest.raises(errors.GenerationError, match="gene panel"):
        predictor.check_checkpoint(small_job, GENE_PANEL[:-1])


def test_committed_default_checkpoint_fits_the_default_job():
    assert DEFAULT_DENOISER.is_file(), "run the training command in README.md"
    meta = predictor.check_checkpoint(JobConfig(), GENE_PANEL)
    assert meta["command"].startswith("tera train denoiser")
    load_denoiser(DEFAULT_DENOISER)


def test_training_on_user_images_and_cells_resumes(tmp_path, client):
    """A user's image zarr (here: a generated store) plus its cells CSV; then a resume."""
    import pandas as pd

    from tera_pipeline.core.geometry import Box
    from tera_pipeline.inputs.synthetic import SyntheticBrain
    from tera_pipeline.training.denoiser import user_training_data

    job = JobConfig.model_validate(
        {
            "out": str(tmp_path / "img.zarr"),
            "volume": {"shape": (4, 128, 128)},
            "storage": {"block": (4, 64, 64)},
            "diffusion": {"steps": 1},
            "checkpoint": str(write_random_checkpoint(tmp_path / "r.safetensors")),
        }
    )
    lifecycle.generate(job, client)
    cells = SyntheticBrain(0).cells(Box((0, 0, 0), (4, 128, 128)))
    frame = pd.DataFrame(
        {"x": cells.position_um[:, 2], "y": cells.position_um[:, 1], "z": cells.position_um[:, 0]}
    )
    for g, name in enumerate(GENE_PANEL):
        frame[name] = cells.counts[:, g]
    frame.to_csv(tmp_path / "cells.csv", index=False)
    user = UserData(job.out, tmp_path / "cells.csv", (4.0, 1.0, 1.0))
    data = user_training_data(user, (1, 16, 16), patch=(4, 48, 48))  # a patch and a bin held out
    assert data[0].image.shape == (2, 4, 80, 128) and data[1].image.shape == (2, 4, 48, 128)
    first = tmp_path / "first.safetensors"
    train_denoiser(first, 4, Recipe(batch=4, lr=2e-3), model_config=TINY, data=data, log_every=2)
    second = tmp_path / "second.safetensors"  # the README's command
    args = ["train", "denoiser", "--images", str(job.out), "--cells", str(tmp_path / "cells.csv"),
            "--resume", str(first), "--out", str(second), "--steps", "4",
            "--batch", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert {"train_loss", "val_loss"} <= set(history[-1])
    _, meta = load_denoiser(second)
    assert meta["training"]["steps_total"] == 8
    assert meta["training"]["resumed_from"] == str(first)
