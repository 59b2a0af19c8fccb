"""Training the denoiser on patches of the synthetic brain or of a user's images (v- or
ε-prediction, MSE against the schedule's target), saving safetensors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_denoiser
from models.denoiser import ConditionalUNet3D, DenoiserConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box, Shape, bin_box, patch_bins
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.generation.schedule import Prediction, Schedule
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.inputs.panel import panel_difference
from tera_pipeline.inputs.synthetic import SyntheticBrain
from tera_pipeline.training.loop import Losses, Recipe, Stage, TrainingLog, run_stage, save_trained
from tera_pipeline.training.user_data import UserData

log = logging.getLogger("tera_pipeline.training")

DENOISER_RECIPE = Recipe(batch=16, lr=2e-3)
"""The default batch and learning rate."""


@dataclass(frozen=True)
class TrainingData:
    """A rendered volume in [-1, 1] (C, Z, Y, X) and its gene bins (G, Zb, Yb, Xb)."""

    image: np.ndarray
    cond: np.ndarray
    genes: tuple[str, ...]
    bin: Shape


def synthetic_training_data(
    seed: int, shape: Shape, spacing_um: tuple[float, float, float], bin_shape: Shape
) -> TrainingData:
    """Render a synthetic brain volume and rasterise its cells (training and validation data)."""
    brain = SyntheticBrain(seed, spacing_um)
    box = Box((0, 0, 0), shape)
    image = from_uint8(brain.render(box))
    bins = bin_box(box, bin_shape)
    cond = rasterize(brain.cells(box), bins, spacing_um, bin_shape)
    return TrainingData(image, cond, brain.genes, tuple(bin_shape))


def sample_offset_batch(
    data: TrainingData,
    patch: Shape,
    context: Shape,
    extra: Shape,
    batch: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random patches with their gene windows and offsets (B, 3): where ``extra`` is 1 a patch
    starts at any voxel of its first bin, and its window is one bin longer (a sub-bin-offsets
    model's input); where 0 it starts on a bin. The window's bins and their voxels are cut out
    whole, flipped and rotated in-plane together, and the patch is cut from the voxels after."""
    b = data.bin
    region = tuple(p + e * n for p, e, n in zip(patch, extra, b, strict=True))
    limits = [(s - r) // n for s, r, n in zip(data.image.shape[1:], region, b, strict=True)]
    if min(limits) < 0:
        raise InputError(
            f"training volume {data.image.shape[1:]} is smaller than a patch and its gene "
            f"window {region} voxels"
        )
    padded = np.pad(data.cond, [(0, 0)] + [(c, c) for c in context])
    frame = Box(tuple(-c for c in context), padded.shape[1:])
    xs, cs, offsets = [], [], []
    for _ in range(batch):
        origin = tuple(int(rng.integers(0, lim + 1)) * n for lim, n in zip(limits, b, strict=True))
        box = Box(origin, region)
        x = data.image[(slice(None), *box.slices())]
        c = padded[(slice(None), *patch_bins(box, b, context).slices(frame))]
        k = int(rng.integers(4))
        x, c = np.rot90(x, k, axes=(2, 3)), np.rot90(c, k, axes=(2, 3))
        if rng.random() < 0.5:
            x, c = x[:, :, :, ::-1], c[:, :, :, ::-1]
        if rng.random() < 0.5:
            x, c = x[:, ::-1], c[:, ::-1]
        offset = tuple(int(rng.integers(n)) if e else 0 for e, n in zip(extra, b, strict=True))
        xs.append(x[(slice(None), *(slice(o, o + p) for o, p in zip(offset, patch, strict=True)))])
        cs.append(c)
        offsets.append(offset)
    return (
        np.ascontiguousarray(np.stack(xs)),
        np.ascontiguousarray(np.stack(cs)),
        np.asarray(offsets, dtype=np.int64),
    )


def diffusion_loss(
    model: ConditionalUNet3D,
    x0: torch.Tensor,
    cond: torch.Tensor,
    sched: Schedule,
    gen: torch.Generator,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE of the model's output against the schedule's training target (ε or v) at uniformly
    drawn timesteps (``offset``: the patches' offsets in their first bins)."""
    t = torch.randint(0, sched.train_steps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    clean, eps, steps = x0.numpy(), noise.numpy(), t.numpy()
    xt = torch.from_numpy(sched.add_noise(clean, eps, steps))
    target = torch.from_numpy(sched.training_target(clean, eps, steps))
    return F.mse_loss(model(xt, t, cond, offset), target)


def user_training_data(
    data: UserData, bin_shape: Shape, val_fraction: float = 0.125, patch: Shape = (4, 32, 32)
) -> tuple[TrainingData, TrainingData]:
    """A user's image volume and its cells or transcripts in ``bin_shape`` bins; the last
    ``val_fraction`` of y (at least one patch) is held out."""
    image, table = data.load()
    shape = image.shape[1:]
    box = Box((0, 0, 0), shape)
    cond = rasterize(table, bin_box(box, bin_shape), data.spacing_um, bin_shape)
    split = min(int(shape[1] * (1 - val_fraction)), shape[1] - patch[1])
    split = split // bin_shape[1] * bin_shape[1]
    if split < patch[1] or shape[0] < patch[0] or shape[2] < patch[2]:
        raise InputError(f"{data.images}: volume {shape} too small to hold out a validation part")
    yb = split // bin_shape[1]
    x = from_uint8(image)
    return (
        TrainingData(x[:, :, :split], cond[:, :, :yb], table.genes, tuple(bin_shape)),
        TrainingData(x[:, :, split:], cond[:, :, yb:], table.genes, tuple(bin_shape)),
    )


def train_denoiser(
    out: Path,
    steps: int = 2000,
    recipe: Recipe = DENOISER_RECIPE,
    volume: Shape = (32, 512, 512),
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0),
    bin_shape: Shape = (1, 16, 16),
    model_config: DenoiserConfig | None = None,
    prediction: Prediction = "v",
    log_every: int = 50,
    on_log: Callable[[dict], None] | None = None,
    data: tuple[TrainingData, TrainingData] | None = None,
    resume: Path | None = None,
) -> list[dict]:
    """Train a denoiser and save it to ``out``; returns the log of train and validation loss.

    ``data`` (train, validation) defaults to a synthetic brain (``recipe.seed``; validation on
    another seed). ``resume`` continues from a checkpoint's weights, config and prediction type.
    """
    model, cfg, previous = None, model_config or DenoiserConfig(), {}
    if resume is not None:
        model, previous = load_denoiser(resume)
        cfg, prediction = model.cfg, previous.get("prediction", "epsilon")
    _check_cond_window(cfg, bin_shape)
    rng, gen = recipe.start()
    train, val = (
        data if data is not None else _synthetic_data(recipe.seed, volume, spacing_um, bin_shape)
    )
    difference = previous and panel_difference(train.genes, previous.get("genes", []))
    if difference:
        raise CheckpointError(
            f"{resume} was trained on another gene panel than these data: {difference}"
        )
    if model is None:
        cfg = replace(cfg, genes=len(train.genes))
        model = ConditionalUNet3D(cfg)
    model.train()
    sched = Schedule(prediction=prediction)
    history = TrainingLog(log, on_log)
    stage = _diffusion_stage(model, (train, val), sched, rng, gen, steps, recipe, log_every)
    run_stage(stage, history)
    meta = {
        "config": cfg.to_dict(),
        "prediction": prediction,
        "genes": list(train.genes),
        "bin": list(bin_shape),
        "spacing_um": list(spacing_um),
    }
    training = {
        "steps": steps,
        **recipe.to_dict(),
        "volume": list(train.image.shape[1:]),
        "resumed_from": str(resume) if resume else None,
        "steps_total": steps + previous.get("training", {}).get("steps_total", 0),
    }
    save_trained(out, model, "denoiser", meta, training, history)
    return history.entries


def _check_cond_window(cfg: DenoiserConfig, bin_shape: Shape) -> None:
    """The model's gene window must be its patch in bins."""
    if tuple(p // b for p, b in zip(cfg.patch, bin_shape, strict=True)) != tuple(cfg.cond_window):
        raise ValueError(
            f"model cond_window {cfg.cond_window} != patch {cfg.patch} / bin {bin_shape}"
        )


def _diffusion_stage(
    model: ConditionalUNet3D,
    data: tuple[TrainingData, TrainingData],
    sched: Schedule,
    rng: np.random.Generator,
    gen: torch.Generator,
    steps: int,
    recipe: Recipe,
    log_every: int,
) -> Stage:
    """The denoiser's training: ``recipe.batch`` random patches of the training data per step, the
    diffusion loss, validation on the validation data; the learning rate is logged."""
    (train, val), cfg = data, model.cfg

    def draw() -> tuple[torch.Tensor, ...]:
        arrays = sample_offset_batch(
            train, cfg.patch, cfg.cond_context, cfg.cond_extra, recipe.batch, rng
        )
        return tuple(torch.from_numpy(a) for a in arrays)

    return Stage(
        model,
        steps,
        recipe.lr,
        batch=draw,
        loss=lambda xco: Losses.single("loss", _loss(model, xco, sched, gen)),
        validate=lambda: {"val_loss": _validate(model, val, cfg, sched)},
        log_every=log_every,
        log_lr=True,
    )


def _loss(model, batch: tuple[torch.Tensor, ...], sched: Schedule, gen) -> torch.Tensor:
    """The diffusion loss of a drawn (patches, windows, offsets) batch."""
    x, c, offset = batch
    return diffusion_loss(model, x, c, sched, gen, offset if model.cfg.sub_bin_offsets else None)


def _synthetic_data(
    seed: int, volume: Shape, spacing_um: tuple[float, float, float], bin_shape: Shape
) -> tuple[TrainingData, TrainingData]:
    """Training data of a synthetic brain of ``seed``, validation data of another seed."""
    return (
        synthetic_training_data(seed, volume, spacing_um, bin_shape),
        synthetic_training_data(seed + 1000, (volume[0], 128, 128), spacing_um, bin_shape),
    )


@torch.no_grad()
def _validate(model, data: TrainingData, cfg: DenoiserConfig, sched: Schedule) -> float:
    """The loss on 32 fixed patches of the validation data (model in eval mode)."""
    model.eval()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    arrays = sample_offset_batch(data, cfg.patch, cfg.cond_context, cfg.cond_extra, 32, rng)
    loss = _loss(model, tuple(torch.from_numpy(a) for a in arrays), sched, gen).item()
    model.train()
    return loss
