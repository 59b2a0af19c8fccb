"""``tera train denoiser|magnet|spatia``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    Batch,
    CheckpointOut,
    LearningRate,
    Seed,
    Spacing,
    Threads,
    TrainingSteps,
    UserImages,
    echo_log,
    fail,
    refusing,
    train_app,
    triple,
    user_data_spacing,
)
from models.checkpoint_files import DEFAULT_DENOISER

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.


@train_app.command("denoiser")
def train_denoiser_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = DEFAULT_DENOISER,
    steps: TrainingSteps = 3000,
    batch: Batch = 16,
    lr: LearningRate = 2e-3,
    seed: Seed = 1,
    size: Annotated[
        str, typer.Option(help="Model size: small (the committed one) or tiny (48 k parameters).")
    ] = "small",
    base_channels: Annotated[
        int | None, typer.Option(help="UNet base channels (default: the size's).")
    ] = None,
    prediction: Annotated[str, typer.Option(help="Model output: 'v' or 'epsilon'.")] = "v",
    sub_bin_offsets: Annotated[
        bool,
        typer.Option(
            help="Patches start at any voxel of a gene bin (what the default lattice, shifted by "
            "voxels, needs); --no-sub-bin-offsets: only on bins, as before."
        ),
    ] = True,
    images: UserImages = None,
    cells: Annotated[
        Path | None, typer.Option(help="Its cells or transcripts (.h5ad, .parquet, .csv).")
    ] = None,
    spacing: Spacing = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue from this checkpoint (its weights, config and panel)."),
    ] = None,
    threads: Threads = 2,
) -> None:
    """Train the denoiser on patches of a synthetic brain, or of your images and cells; writes
    a safetensors checkpoint."""
    import torch

    from models.denoiser import DENOISER_SIZES, DenoiserConfig
    from tera_pipeline.training.denoiser import train_denoiser, user_training_data
    from tera_pipeline.training.loop import Recipe
    from tera_pipeline.training.user_data import UserData

    torch.set_num_threads(threads)
    if size not in DENOISER_SIZES:
        fail(f"unknown --size {size!r}; choose one of {', '.join(DENOISER_SIZES)}")
    fields = DENOISER_SIZES[size] | (
        {} if base_channels is None else {"base_channels": base_channels}
    )
    cfg = DenoiserConfig(**fields, sub_bin_offsets=sub_bin_offsets)
    data, spacing_um = None, user_data_spacing(images, cells, spacing)
    with refusing():
        if spacing_um is not None:
            user = UserData(images, cells, spacing_um)  # held out: a patch and a bin, at least
            data = user_training_data(user, (1, 16, 16), patch=(4, 48, 48))
        recipe = Recipe(batch, lr, seed)
        train_denoiser(
            out, steps, recipe, model_config=cfg, prediction=prediction, on_log=echo_log,
            data=data, resume=resume,
        )  # fmt: skip
    typer.echo(f"wrote {out}")


@train_app.command("magnet")
def train_magnet_cmd(
    out: CheckpointOut = None,
    kind: Annotated[
        str, typer.Option(help="'magnet', or the baseline 'magnet_bin_cnn' (bin crop alone).")
    ] = "magnet",
    steps: TrainingSteps = 1500,
    batch: Batch = 8,
    lr: LearningRate = 1e-3,
    seed: Seed = 1,
    images: UserImages = None,
    cells: Annotated[
        Path | None, typer.Option(help="Its cells or transcripts (.h5ad, .parquet, .csv).")
    ] = None,
    spacing: Spacing = None,
    threads: Threads = 2,
) -> None:
    """Train MagNet on (image, expression per bin) pairs: synthetic renders, or yours."""
    import torch

    from models.checkpoint import DEFAULT_MAGNET
    from tera_pipeline.training.loop import Recipe
    from tera_pipeline.training.magnet import train_magnet
    from tera_pipeline.training.user_data import UserData

    torch.set_num_threads(threads)
    data, spacing_um = None, user_data_spacing(images, cells, spacing)
    if spacing_um is not None:
        from tera_pipeline.training.magnet import user_pairs

        with refusing():
            data = user_pairs(UserData(images, cells, spacing_um))
    target = out or DEFAULT_MAGNET.with_name(f"{kind}.safetensors")
    recipe = Recipe(batch, lr, seed)
    history = train_magnet(target, steps, recipe, kind, data=data, on_log=echo_log)
    typer.echo(f"wrote {target}: {history[-1]}")


@train_app.command("spatia")
def train_spatia_cmd(
    out: CheckpointOut = None,
    cell_steps: Annotated[int, typer.Option(help="Steps of the cell encoder.")] = 3000,
    context_steps: Annotated[int, typer.Option(help="Steps of the niche transformer.")] = 300,
    generator_steps: Annotated[int, typer.Option(help="Steps of the generator.")] = 1500,
    batch: Batch = 64,
    lr: LearningRate = 2e-3,
    seed: Seed = 1,
    crop: Annotated[str, typer.Option(help="Crop Z,Y,X voxels (Z > 1: 3-D crops).")] = "1,32,32",
    images: UserImages = None,
    cells: Annotated[Path | None, typer.Option(help="Its cell table (.h5ad, cell .csv).")] = None,
    spacing: Spacing = None,
    type_key: Annotated[
        str, typer.Option(help="obs / column with cell types in --cells, if any.")
    ] = "cell_type",
    threads: Threads = 2,
) -> None:
    """Train SPATIA on cells with crops: the synthetic brain, or your images and cells."""
    import torch

    from models.checkpoint import DEFAULT_SPATIA
    from models.spatia import SpatiaConfig
    from tera_pipeline.training.loop import Recipe
    from tera_pipeline.training.spatia import train_spatia
    from tera_pipeline.training.spatia_cells import split_cells, user_cells
    from tera_pipeline.training.user_data import UserData

    torch.set_num_threads(threads)
    cfg = SpatiaConfig(crop=triple(crop, "--crop"))
    data, spacing_um = None, user_data_spacing(images, cells, spacing)
    if spacing_um is not None:
        with refusing():
            every = user_cells(UserData(images, cells, spacing_um), cfg.crop, type_key)
        data = split_cells(every, seed)
    target = out or DEFAULT_SPATIA
    stage_steps = (cell_steps, context_steps, generator_steps)
    recipe = Recipe(batch, lr, seed)
    history = train_spatia(target, cfg, *stage_steps, recipe, data=data, on_log=echo_log)
    typer.echo(f"wrote {target}: {history[-1]}")
