"""Training the denoiser on synthetic-brain patches (ε-prediction, MSE), saving safetensors."""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_denoiser, save_checkpoint
from models.denoiser import ConditionalUNet3D, DenoiserConfig
from tera_pipeline.core.geometry import Box, Shape, bin_box, patch_bins
from tera_pipeline.generation.schedule import DDIMSchedule, Prediction
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.inputs.synthetic import SyntheticBrain
from tera_pipeline.runtime.memory import keep_freed_memory

log = logging.getLogger("tera_pipeline.training")


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
    image = brain.render(box).astype(np.float32) / 127.5 - 1.0
    bins = bin_box(box, bin_shape)
    cond = rasterize(brain.cells(box), bins, spacing_um, bin_shape)
    return TrainingData(image, cond, brain.genes, tuple(bin_shape))


def sample_batch(
    data: TrainingData, patch: Shape, context: Shape, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random bin-aligned patches with their gene windows (footprint + ``context`` bins, zero
    beyond the data, as the engine reads beyond the volume), flipped and rotated in-plane."""
    b = data.bin
    limits = [(s - p) // n for s, p, n in zip(data.image.shape[1:], patch, b, strict=True)]
    padded = np.pad(data.cond, [(0, 0)] + [(c, c) for c in context])
    frame = Box(tuple(-c for c in context), padded.shape[1:])
    xs, cs = [], []
    for _ in range(batch):
        origin = tuple(int(rng.integers(0, lim + 1)) * n for lim, n in zip(limits, b, strict=True))
        box = Box(origin, patch)
        x = data.image[(slice(None), *box.slices())]
        c = padded[(slice(None), *patch_bins(box, b, context).slices(frame))]
        k = int(rng.integers(4))
        x, c = np.rot90(x, k, axes=(2, 3)), np.rot90(c, k, axes=(2, 3))
        if rng.random() < 0.5:
            x, c = x[:, :, :, ::-1], c[:, :, :, ::-1]
        if rng.random() < 0.5:
            x, c = x[:, ::-1], c[:, ::-1]
        xs.append(x)
        cs.append(c)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(cs))


def diffusion_loss(
    model: ConditionalUNet3D,
    x0: torch.Tensor,
    cond: torch.Tensor,
    sched: DDIMSchedule,
    gen: torch.Generator,
) -> torch.Tensor:
    """MSE of the model's output against its target (ε or v) at uniformly drawn timesteps."""
    t = torch.randint(0, sched.train_steps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = torch.from_numpy(sched.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if sched.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return F.mse_loss(model(xt, t, cond), target)


def user_training_data(
    images: Path,
    cells: Path,
    spacing_um: tuple[float, float, float],
    bin_shape: Shape,
    genes: tuple[str, ...] | None = None,
    val_fraction: float = 0.125,
    patch: Shape = (4, 32, 32),
) -> tuple[TrainingData, TrainingData]:
    """A user's image volume (zarr array (c, z, y, x) uint8, or a store with ``image``) and its
    cells or transcripts; the last ``val_fraction`` of y (at least one patch) is held out."""
    from tera_pipeline.core.config import VolumeSpec
    from tera_pipeline.core.errors import InputError
    from tera_pipeline.inputs.cells import load_cells

    image = _read_image(Path(images))
    shape = image.shape[1:]
    table = load_cells(cells, genes, volume=VolumeSpec(shape=shape, spacing_um=spacing_um))
    box = Box((0, 0, 0), shape)
    cond = rasterize(table, bin_box(box, bin_shape), spacing_um, bin_shape)
    split = min(int(shape[1] * (1 - val_fraction)), shape[1] - patch[1])
    split = split // bin_shape[1] * bin_shape[1]
    if split < patch[1] or shape[0] < patch[0] or shape[2] < patch[2]:
        raise InputError(f"{images}: volume {shape} too small to hold out a validation part")
    yb = split // bin_shape[1]
    x = image.astype(np.float32) / 127.5 - 1.0
    return (
        TrainingData(x[:, :, :split], cond[:, :, :yb], table.genes, tuple(bin_shape)),
        TrainingData(x[:, :, split:], cond[:, :, yb:], table.genes, tuple(bin_shape)),
    )


def _read_image(path: Path) -> np.ndarray:
    """A (c, z, y, x) uint8 array from a zarr array, or from a store's ``image`` array."""
    import tensorstore as ts

    from tera_pipeline.core.errors import InputError

    array_path = path / "image" if (path / "image" / "zarr.json").is_file() else path
    for driver in ("zarr3", "zarr"):
        try:
            spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(array_path)}}
            array = ts.open(spec, open=True).result()
            break
        except (ValueError, RuntimeError):
            continue
    else:
        raise InputError(f"{path}: not a zarr array of images (c, z, y, x)")
    if array.rank != 4 or array.dtype != ts.uint8:
        raise InputError(f"{path}: need uint8 (c, z, y, x) images, got {array.dtype} {array.shape}")
    return array.read().result()


def warmup_cosine(
    opt: torch.optim.Optimizer, steps: int, warmup_cap: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over min(``warmup_cap``, steps / 10 + 1) steps, then a cosine decay to 0
    (the schedule every model of the project trains with)."""
    warmup = min(warmup_cap, steps // 10 + 1)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    clip: float | None = 1.0,
) -> None:
    """Backpropagate ``loss``, clip the optimizer's gradients to norm ``clip`` (None: no
    clipping), step the optimizer and its learning-rate schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    schedule.step()


def train_denoiser(
    out: Path,
    steps: int = 2000,
    batch: int = 16,
    lr: float = 2e-3,
    seed: int = 1,
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

    ``data`` (train, validation) defaults to a synthetic brain (``seed``; validation on another
    seed). ``resume`` continues from a checkpoint's weights, config and prediction type.
    """
    cfg = model_config or DenoiserConfig()
    previous: dict = {}
    if resume is not None:
        model, previous = load_denoiser(resume)
        cfg, prediction = model.cfg, previous.get("prediction", "epsilon")
    if tuple(p // b for p, b in zip(cfg.patch, bin_shape, strict=True)) != tuple(cfg.cond_window):
        raise ValueError(
            f"model cond_window {cfg.cond_window} != patch {cfg.patch} / bin {bin_shape}"
        )
    keep_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if data is None:
        data = (
            synthetic_training_data(seed, volume, spacing_um, bin_shape),
            synthetic_training_data(seed + 1000, (volume[0], 128, 128), spacing_um, bin_shape),
        )
    train, val = data
    if previous and list(previous.get("genes", [])) != list(train.genes):
        raise CheckpointError(f"{resume} was trained on another gene panel than these data")
    if resume is None:
        cfg = replace(cfg, genes=len(train.genes))
        model = ConditionalUNet3D(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched_lr = warmup_cosine(opt, steps)
    sched = DDIMSchedule(prediction=prediction)
    history: list[dict] = []
    t0 = time.perf_counter()
    running = 0.0
    for i in range(steps):
        x, c = sample_batch(train, cfg.patch, cfg.cond_context, batch, rng)
        loss = diffusion_loss(model, torch.from_numpy(x), torch.from_numpy(c), sched, gen)
        optimizer_step(loss, opt, sched_lr)
        running += loss.item()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            n = (i % log_every) + 1
            entry = {
                "step": i + 1,
                "train_loss": running / n,
                "val_loss": _validate(model, val, cfg, sched),
                "lr": sched_lr.get_last_lr()[0],
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
            running = 0.0
            history.append(entry)
            (on_log or (lambda e: log.info("%s", e)))(entry)
    meta = {
        "config": cfg.to_dict(),
        "prediction": prediction,
        "genes": list(train.genes),
        "bin": list(bin_shape),
        "spacing_um": list(spacing_um),
        "training": {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "volume": list(train.image.shape[1:]),
            "resumed_from": str(resume) if resume else None,
            "steps_total": steps + previous.get("training", {}).get("steps_total", 0),
            "final": history[-1] if history else None,
        },
        "command": " ".join(shlex.quote(a) for a in ["tera", *sys.argv[1:]]),
    }
    save_checkpoint(out, model, "denoiser", meta)
    return history


@torch.no_grad()
def _validate(model, data: TrainingData, cfg: DenoiserConfig, sched: DDIMSchedule) -> float:
    model.eval()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    x, c = sample_batch(data, cfg.patch, cfg.cond_context, 32, rng)
    loss = diffusion_loss(model, torch.from_numpy(x), torch.from_numpy(c), sched, gen).item()
    model.train()
    return loss
