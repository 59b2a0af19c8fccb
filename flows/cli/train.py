"""``tera train denoiser|magnet|spatia``: one process, or one per GPU under ``torchrun``."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
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

# How a run is carried out, the same options for every model (training/trainer.TrainOptions).
Accumulate = Annotated[
    int, typer.Option(help="Micro-batches per step (gradient accumulation): the batch split.")
]
Ema = Annotated[float, typer.Option(help="EMA decay of the weights saved (0: the last weights).")]
CheckpointEvery = Annotated[
    int, typer.Option(help="Steps between training states <out stem>.resume.pt (0: none).")
]
FiguresEvery = Annotated[
    int,
    typer.Option(help="Steps between loss curves and samples in <out stem>_training/ (0: end)."),
]
StopAfter = Annotated[
    int | None, typer.Option(help="Stop after this many steps, the training state saved.")
]
Progress = Annotated[
    bool | None, typer.Option(help="A progress bar on stderr (default: on a terminal).")
]
LogEvery = Annotated[int, typer.Option(help="Steps between log entries (with validation).")]
ResumeState = Annotated[
    Path | None,
    typer.Option(help="Continue exactly from a training state (*.resume.pt; none yet: start)."),
]


def _options(accumulate, ema, checkpoint_every, figures_every, stop_after, progress, resume):
    from tera_pipeline.training.trainer import TrainOptions

    resume = _state_file(resume)
    with refusing():
        return TrainOptions(
            accumulate, ema or None, checkpoint_every, figures_every, stop_after,
            sys.stderr.isatty() if progress is None else progress, resume,
        )  # fmt: skip


def _state_file(path: Path | None) -> Path | None:
    """A training state to resume; a ``*.resume.pt`` not written yet starts the run (the same
    command line for a job's first start and its requeues)."""
    if path is None or path.exists() or not path.name.endswith(".resume.pt"):
        return path
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"no training state {path} yet: starting", err=True)
    return None


def _wrote(out: Path, history: list[dict] | None = None) -> None:
    """Rank 0 (the one process that saved) says what it wrote."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"wrote {out}" + (f": {history[-1]}" if history else ""))


@contextmanager
def _stoppable():
    """A run stopped by --stop-after says how to continue, and exits 0."""
    from tera_pipeline.training.trainer import TrainingStopped

    try:
        yield
    except TrainingStopped as stop:
        typer.echo(str(stop))
        raise typer.Exit(0) from None


@train_app.command("denoiser")
def train_denoiser_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = DEFAULT_DENOISER,
    steps: TrainingSteps = 3000,
    batch: Batch = 16,
    lr: LearningRate = 2e-3,
    seed: Seed = 1,
    size: Annotated[
        str,
        typer.Option(
            help="Model size: small (the committed one), tiny (48 k parameters) or base "
            "(Tera-MIND's capacity, 110 M parameters, for GPUs)."
        ),
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
    volume: Annotated[
        str, typer.Option(help="Synthetic training volume Z,Y,X voxels (without --images).")
    ] = "32,512,512",
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from a checkpoint (its weights, config and panel), or exactly from "
            "a training state (<out stem>.resume.pt; none yet: start)."
        ),
    ] = None,
    accumulate: Accumulate = 1,
    ema: Ema = 0.999,
    checkpoint_every: CheckpointEvery = 500,
    figures_every: FiguresEvery = 500,
    stop_after: StopAfter = None,
    progress: Progress = None,
    log_every: LogEvery = 50,
    validate_every: Annotated[
        int, typer.Option(help="Steps between validations (0: at every log entry).")
    ] = 0,
    validation_box: Annotated[
        str | None,
        typer.Option(
            help="Held-out box of --images, Z0:Z1,Y0:Y1,X0:X1 voxels (default: the last eighth "
            "of y); never read for training."
        ),
    ] = None,
    data_workers: Annotated[
        int, typer.Option(help="Processes reading --images patches ahead (0: in process).")
    ] = 2,
    threads: Threads = 2,
) -> None:
    """Train the denoiser on patches of a synthetic brain, or of your images and cells (read out
    of core, a patch at a time, by --data-workers processes ahead of the step); writes
    a safetensors checkpoint (the EMA weights). Under ``torchrun`` one process per GPU (or CPU
    process) shares each step's batch."""
    import torch

    from models.denoiser import DENOISER_SIZES, DenoiserConfig
    from tera_pipeline.training.denoiser import train_denoiser
    from tera_pipeline.training.loop import Recipe
    from tera_pipeline.training.prefetch import Prefetched
    from tera_pipeline.training.resume import is_training_state
    from tera_pipeline.training.store_patches import StorePatches, parse_box

    torch.set_num_threads(threads)
    if size not in DENOISER_SIZES:
        fail(f"unknown --size {size!r}; choose one of {', '.join(DENOISER_SIZES)}")
    fields = DENOISER_SIZES[size] | (
        {} if base_channels is None else {"base_channels": base_channels}
    )
    cfg = DenoiserConfig(**fields, sub_bin_offsets=sub_bin_offsets)
    resume = _state_file(resume)
    state = resume if resume is not None and is_training_state(resume) else None
    options = _options(accumulate, ema, checkpoint_every, figures_every, stop_after, progress,
                       state)  # fmt: skip
    spacing_um = user_data_spacing(images, cells, spacing)
    with refusing(), _stoppable(), ExitStack() as held:
        source = None
        if spacing_um is not None:  # read out of core, a patch at a time, prefetched
            model_cfg = cfg if resume is None or state else _checkpoint_config(resume)
            patches = StorePatches(
                images, model_cfg.patch, model_cfg.cond_context, model_cfg.cond_extra,
                seed=seed, cells=cells, spacing_um=spacing_um, channels=model_cfg.channels,
                validation=parse_box(validation_box) if validation_box else None,
            )  # fmt: skip
            source = held.enter_context(Prefetched(patches, steps, workers=data_workers))
        recipe = Recipe(batch, lr, seed)
        train_denoiser(
            out, steps, recipe, triple(volume, "--volume"), model_config=cfg,
            prediction=prediction, log_every=log_every, on_log=echo_log, source=source,
            resume=None if state else resume, options=options, validate_every=validate_every,
            spacing_um=spacing_um or (4.0, 1.0, 1.0),
        )  # fmt: skip
    _wrote(out)


def _checkpoint_config(path: Path):
    """The denoiser config a checkpoint to continue from was trained with."""
    from models.checkpoint_files import read_metadata
    from models.denoiser import DenoiserConfig

    return DenoiserConfig.from_dict(read_metadata(path)["config"])


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
    resume: ResumeState = None,
    accumulate: Accumulate = 1,
    ema: Ema = 0.0,
    checkpoint_every: CheckpointEvery = 500,
    figures_every: FiguresEvery = 0,
    stop_after: StopAfter = None,
    progress: Progress = None,
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
    options = _options(accumulate, ema, checkpoint_every, figures_every, stop_after, progress,
                       resume)  # fmt: skip
    with refusing(), _stoppable():
        history = train_magnet(
            target, steps, recipe, kind, data=data, on_log=echo_log, options=options
        )
    _wrote(target, history)


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
    resume: ResumeState = None,
    accumulate: Accumulate = 1,
    ema: Ema = 0.0,
    checkpoint_every: CheckpointEvery = 500,
    figures_every: FiguresEvery = 0,
    stop_after: StopAfter = None,
    progress: Progress = None,
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
    options = _options(accumulate, ema, checkpoint_every, figures_every, stop_after, progress,
                       resume)  # fmt: skip
    with refusing(), _stoppable():
        history = train_spatia(
            target, cfg, *stage_steps, recipe, data=data, on_log=echo_log, options=options
        )
    _wrote(target, history)
