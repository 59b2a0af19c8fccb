"""``tera train denoiser|magnet|spatia``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    CheckpointOut,
    LearningRate,
    Spacing,
    Threads,
    UserImages,
    echo_log,
    refusing,
    train_app,
    triple,
    user_data_spacing,
)
from models.checkpoint import DEFAULT_DENOISER

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.


@train_app.command("denoiser")
def train_denoiser_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = DEFAULT_DENOISER,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 3000,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 16,
    lr: LearningRate = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brain.")] = 1,
    base_channels: Annotated[int, typer.Option(help="UNet base channels.")] = 16,
    prediction: Annotated[str, typer.Option(help="Model output: 'v' or 'epsilon'.")] = "v",
    threads: Threads = 2,
) -> None:
    """Train the denoiser on synthetic-brain patches; writes a safetensors checkpoint."""
    import torch

    from models.denoiser import DenoiserConfig
    from tera_pipeline.training.denoiser import train_denoiser

    torch.set_num_threads(threads)
    cfg = DenoiserConfig(base_channels=base_channels)
    train_denoiser(
        out, steps, batch, lr, seed, model_config=cfg, prediction=prediction, on_log=echo_log
    )
    typer.echo(f"wrote {out}")


@train_app.command("magnet")
def train_magnet_cmd(
    out: CheckpointOut = None,
    kind: Annotated[
        str, typer.Option(help="'magnet', or the baseline 'magnet_bin_cnn' (bin crop alone).")
    ] = "magnet",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch: Annotated[int, typer.Option(help="Windows (8 x 8 bins) per step.")] = 8,
    lr: LearningRate = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brains.")] = 1,
    images: UserImages = None,
    cells: Annotated[
        Path | None, typer.Option(help="Its cells or transcripts (.h5ad, .parquet, .csv).")
    ] = None,
    spacing: Spacing = "4,1,1",
    threads: Threads = 2,
) -> None:
    """Train MagNet on (image, expression per bin) pairs: synthetic renders, or yours."""
    import torch

    from models.checkpoint import DEFAULT_MAGNET
    from tera_pipeline.training.magnet import train_magnet

    torch.set_num_threads(threads)
    data, spacing_um = None, user_data_spacing(images, cells, spacing)
    if spacing_um is not None:
        from tera_pipeline.training.magnet import user_pairs

        with refusing():
            data = user_pairs(images, cells, spacing_um)
    target = out or DEFAULT_MAGNET.with_name(f"{kind}.safetensors")
    history = train_magnet(target, steps, batch, lr, seed, kind, data=data, on_log=echo_log)
    typer.echo(f"wrote {target}: {history[-1]}")


@train_app.command("spatia")
def train_spatia_cmd(
    out: CheckpointOut = None,
    cell_steps: Annotated[int, typer.Option(help="Steps of the cell encoder.")] = 3000,
    context_steps: Annotated[int, typer.Option(help="Steps of the niche transformer.")] = 300,
    generator_steps: Annotated[int, typer.Option(help="Steps of the generator.")] = 1500,
    batch: Annotated[int, typer.Option(help="Cells per step.")] = 64,
    lr: LearningRate = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brain.")] = 1,
    crop: Annotated[str, typer.Option(help="Crop Z,Y,X voxels (Z > 1: 3-D crops).")] = "1,32,32",
    images: UserImages = None,
    cells: Annotated[Path | None, typer.Option(help="Its cell table (.h5ad, cell .csv).")] = None,
    spacing: Spacing = "4,1,1",
    type_key: Annotated[
        str, typer.Option(help="obs / column with cell types in --cells, if any.")
    ] = "cell_type",
    threads: Threads = 2,
) -> None:
    """Train SPATIA on cells with crops: the synthetic brain, or your images and cells."""
    import torch

    from models.checkpoint import DEFAULT_SPATIA
    from models.spatia import SpatiaConfig
    from tera_pipeline.training.spatia import train_spatia
    from tera_pipeline.training.spatia_cells import split_cells, user_cells

    torch.set_num_threads(threads)
    cfg = SpatiaConfig(crop=triple(crop, "--crop"))
    data, spacing_um = None, user_data_spacing(images, cells, spacing)
    if spacing_um is not None:
        with refusing():
            every = user_cells(images, cells, spacing_um, cfg.crop, type_key=type_key)
        data = split_cells(every, seed)
    target = out or DEFAULT_SPATIA
    stage_steps = (cell_steps, context_steps, generator_steps)
    history = train_spatia(target, cfg, *stage_steps, batch, lr, seed, data=data, on_log=echo_log)
    typer.echo(f"wrote {target}: {history[-1]}")
