"""Training the denoiser on patches of the synthetic brain or of a user's images (v- or
ε-prediction, MSE against the schedule's target), saving safetensors.

Training is keyed (``training/sampling.py``): sample ``i`` of step ``s`` (its patch, timestep
and noise) is a function of (seed, s, i), so any number of processes see the one-process batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_denoiser
from models.denoiser import ConditionalUNet3D, DenoiserConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box, Shape, bin_box
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.generation.schedule import Prediction, Schedule
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.inputs.panel import panel_difference
from tera_pipeline.training.loop import Losses, Recipe, Stage, TrainingLog, run_stage, save_trained
from tera_pipeline.training.patches import (
    MemoryPatches,
    PatchBatch,
    PatchSource,
    TrainingData,
    sample_offset_batch,
    synthetic_training_data,
)
from tera_pipeline.training.sampling import NOISE_DOMAIN, keyed_rng
from tera_pipeline.training.trainer import Trainer, TrainOptions
from tera_pipeline.training.user_data import UserData

__all__ = [
    "DENOISER_RECIPE", "TrainingData", "diffusion_loss", "sample_offset_batch",
    "synthetic_training_data", "train_denoiser", "user_training_data",
]  # fmt: skip

log = logging.getLogger("tera_pipeline.training")

DENOISER_RECIPE = Recipe(batch=16, lr=2e-3)
"""The default batch and learning rate."""
DENOISER_EMA = 0.999
"""The default EMA decay of the denoiser's weights (its checkpoint holds the average)."""


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
    return _mse(model, _noised(sched, x0.numpy(), noise.numpy(), t.numpy(), cond, offset))


def _noised(sched: Schedule, clean, eps, t, cond, offset) -> tuple[torch.Tensor, ...]:
    """(x_t, t, cond, offset, target) of clean patches noised by ``eps`` at timesteps ``t``."""
    xt = torch.from_numpy(sched.add_noise(clean, eps, t))
    target = torch.from_numpy(sched.training_target(clean, eps, t))
    offset = None if offset is None else torch.as_tensor(offset)
    return xt, torch.as_tensor(t), torch.as_tensor(cond), offset, target


def _mse(model: ConditionalUNet3D, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The model's MSE on a noised batch (on the model's device)."""
    device = next(model.parameters()).device
    xt, t, cond, offset, target = (None if v is None else v.to(device) for v in batch)
    out = model(xt, t, cond, offset if model.cfg.sub_bin_offsets else None)
    return F.mse_loss(out.float(), target)


def keyed_noise(
    sched: Schedule, patches: PatchBatch, seed: int, step: int, indices: Sequence[int]
) -> tuple[torch.Tensor, ...]:
    """The drawn patches noised: sample ``i``'s timestep and noise from its own stream."""
    x, c, offset = patches
    t, eps = np.empty(len(x), np.int64), np.empty_like(x)
    for j, i in enumerate(indices):
        rng = keyed_rng(seed, step, i, NOISE_DOMAIN)
        t[j] = rng.integers(sched.train_steps)
        eps[j] = rng.standard_normal(x.shape[1:], dtype=np.float32)
    return _noised(sched, x, eps, t, c, offset)


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
    options: TrainOptions | None = None,
    validate_every: int = 0,
    val_patches: int = 32,
    source: PatchSource | None = None,
) -> list[dict]:
    """Train a denoiser and save it to ``out``; returns the log of train and validation loss.

    ``data`` (train, validation) defaults to a synthetic brain (``recipe.seed``; validation on
    another seed); ``source`` (a keyed patch source such as ``store_patches.StorePatches``)
    replaces it. ``resume`` starts from a checkpoint's weights, config and prediction type.
    ``options`` (default: an EMA of decay ``DENOISER_EMA``, saved as the checkpoint) carry out
    the run: processes, accumulation, training states to continue exactly, figures, a stop.
    Validation on ``val_patches`` fixed patches at every log entry, or only every
    ``validate_every`` steps (and at the end).
    """
    options = options or TrainOptions(ema_decay=DENOISER_EMA)
    model, cfg, previous = None, model_config or DenoiserConfig(), {}
    if resume is not None:
        model, previous = load_denoiser(resume)
        cfg, prediction = model.cfg, previous.get("prediction", "epsilon")
    _check_cond_window(cfg, bin_shape)
    recipe.start()
    if source is None:
        train, val = data or _synthetic_data(recipe.seed, volume, spacing_um, bin_shape)
        window = (cfg.patch, cfg.cond_context, cfg.cond_extra)
        source = MemoryPatches(train, *window, recipe.seed, val)
    difference = previous and panel_difference(source.genes, previous.get("genes", []))
    if difference:
        raise CheckpointError(
            f"{resume} was trained on another gene panel than these data: {difference}"
        )
    if model is None:
        cfg = replace(cfg, genes=len(source.genes))
        model = ConditionalUNet3D(cfg)
    model.train()
    sched = Schedule(prediction=prediction)
    history = TrainingLog(log, on_log)
    run = {"kind": "denoiser", "config": cfg.to_dict(), "prediction": prediction, "steps": steps,
           **recipe.to_dict(), "volume": list(source.volume)}  # fmt: skip
    with Trainer(model, options, out, run, history.entries) as trainer:
        stage = _diffusion_stage(model, source, val_patches, sched, steps, recipe)
        stage = replace(stage, log_every=log_every, validate_every=validate_every)
        run_stage(stage, history, trainer=trainer)
        meta = {"config": cfg.to_dict(), "prediction": prediction, "genes": list(source.genes),
                "bin": list(bin_shape), "spacing_um": list(spacing_um)}  # fmt: skip
        training = {
            "steps": steps, **recipe.to_dict(), "volume": list(source.volume),
            "resumed_from": str(resume) if resume else None,
            "steps_total": steps + previous.get("training", {}).get("steps_total", 0),
        }  # fmt: skip
        save_trained(out, model, "denoiser", meta, training, history, trainer)
    return history.entries


def _check_cond_window(cfg: DenoiserConfig, bin_shape: Shape) -> None:
    """The model's gene window must be its patch in bins."""
    if tuple(p // b for p, b in zip(cfg.patch, bin_shape, strict=True)) != tuple(cfg.cond_window):
        raise ValueError(
            f"model cond_window {cfg.cond_window} != patch {cfg.patch} / bin {bin_shape}"
        )


def _diffusion_stage(
    model: ConditionalUNet3D,
    patches: PatchSource,
    val_patches: int,
    sched: Schedule,
    steps: int,
    recipe: Recipe,
) -> Stage:
    """The denoiser's training: ``recipe.batch`` keyed patches of ``patches`` per step, the
    diffusion loss, validation on its ``val_patches`` fixed validation patches, sample images;
    the learning rate is logged."""
    fixed, clean = _validation_batch(patches.validation_batch(val_patches), sched)

    def draw(step: int, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return keyed_noise(sched, patches.draw(step, indices), recipe.seed, step, indices)

    return Stage(
        model,
        steps,
        recipe.lr,
        batch=draw,
        loss=lambda batch: Losses.single("loss", _mse(model, batch)),
        batch_size=recipe.batch,
        validate=lambda: {"val_loss": _validate(model, fixed)},
        log_lr=True,
        samples=lambda: denoised_rows(model, clean, fixed[2], fixed[3], sched),
    )


def _synthetic_data(
    seed: int, volume: Shape, spacing_um: tuple[float, float, float], bin_shape: Shape
) -> tuple[TrainingData, TrainingData]:
    """Training data of a synthetic brain of ``seed``, validation data of another seed."""
    return (
        synthetic_training_data(seed, volume, spacing_um, bin_shape),
        synthetic_training_data(seed + 1000, (volume[0], 128, 128), spacing_um, bin_shape),
    )


def _validation_batch(
    patches: PatchBatch, sched: Schedule
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Fixed validation patches noised (torch stream 0), and the clean patches."""
    gen = torch.Generator().manual_seed(0)
    x, c, offset = patches
    t = torch.randint(0, sched.train_steps, (len(x),), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    return _noised(sched, x, noise.numpy(), t.numpy(), c, offset), torch.from_numpy(x)


@torch.no_grad()
def _validate(model: ConditionalUNet3D, batch: Sequence[torch.Tensor]) -> float:
    """The loss on the fixed validation patches (model in eval mode)."""
    model.eval()
    loss = _mse(model, batch).item()
    model.train()
    return loss


@torch.no_grad()
def denoised_rows(
    model: ConditionalUNet3D,
    clean: torch.Tensor,
    cond: torch.Tensor,
    offset: torch.Tensor | None,
    sched: Schedule,
    n: int = 4,
) -> dict[str, np.ndarray]:
    """Images of ``n`` clean patches and their gene windows (first stain, middle z): the patch,
    it noised at t = 600, the model's one-step estimate of the patch from there, and a 10-step
    DDIM sample from pure noise on the same genes."""
    model.eval()
    device = next(model.parameters()).device
    clean, cond = clean[:n].to(device), cond[:n].to(device)
    off = offset[:n].to(device) if offset is not None and model.cfg.sub_bin_offsets else None
    t = torch.full((len(clean),), 600, device=device, dtype=torch.long)
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)).to(device)
    a = sched.alpha(600)
    noisy = a**0.5 * clean + (1 - a) ** 0.5 * eps
    estimate, _ = sched.split_output(noisy, model(noisy, t, cond, off).float(), 600)
    ddim = Schedule(prediction=sched.prediction, steps=10)
    x = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for step in range(ddim.steps):
        tt = torch.full((len(x),), ddim.timestep(step), device=device, dtype=torch.long)
        x = ddim.ddim_update(x, model(x, tt, cond, off).float(), step)
    model.train()
    mid = clean.shape[2] // 2
    rows = {"patch": clean, "noised t=600": noisy, "estimate": estimate, "DDIM 10 steps": x}
    return {k: v[:, 0, mid].clamp(-1, 1).cpu().numpy() for k, v in rows.items()}
