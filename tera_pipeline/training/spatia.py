"""Training SPATIA on cells with crops: the synthetic brain (known types and expression ->
morphology rules) or a user's image volume with its cell table.

Three stages, each with its own loss, so that each fits in minutes on a CPU:

1. cell level: ZINB expression reconstruction (with random gene masking: imputation) and masked
   patch reconstruction, with sequencing depth augmented by binomial thinning; a linear type
   probe reads the (detached) embedding where types are known;
2. niche and tissue level (cell encoder frozen): hidden-member expression and set mean
   expression, on niches and tissue tiles at random offsets;
3. generator: conditional flow matching of crops given expression.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from models.spatia import (
    CELL_LOSS_WEIGHTS,
    CellLossWeights,
    Spatia,
    SpatiaConfig,
    cell_losses,
    expression_values,
)
from tera_pipeline.analysis.cells import centred
from tera_pipeline.analysis.spatia_model import device_of
from tera_pipeline.core.geometry import Shape
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.training.loop import Losses, Recipe, Stage, TrainingLog, run_stage, save_trained
from tera_pipeline.training.sampling import streamed
from tera_pipeline.training.spatia_cells import (
    CellSet,
    SetBatch,
    flip_rotate,
    pad_sets,
    random_windows,
    synthetic_cells,
    thin,
)
from tera_pipeline.training.trainer import Trainer, TrainOptions

log = logging.getLogger("tera_pipeline.spatia_training")

NICHE_UM = (32.0, 64.0, 64.0)
"""Default niche (z, y, x) in µm: about a hundred cells of the synthetic brain."""
TISSUE_NICHES = (2, 4, 4)
"""Default tissue tile in niches (z, y, x)."""
SPATIA_RECIPE = Recipe(batch=64, lr=2e-3)
"""The default batch and learning rate."""


# -- stage 1: cells --------------------------------------------------------------------------------
def _masks(cfg: SpatiaConfig, n: int, gen: torch.Generator, genes: float, patches: float):
    """Random masks of a ``genes`` share of the genes and a ``patches`` share of the patches."""
    gene_mask = torch.rand(n, cfg.genes, generator=gen) < genes
    patch_mask = torch.rand(n, cfg.tokens, generator=gen) < patches
    return gene_mask, patch_mask


class CellBatch(NamedTuple):
    """A stage-1 batch: cell indices, augmented crops, full and thinned counts, masks."""

    index: np.ndarray
    crops: torch.Tensor
    counts: np.ndarray
    thinned: torch.Tensor
    gene_mask: torch.Tensor
    patch_mask: torch.Tensor


@dataclass
class SpatiaRun:
    """What every SPATIA stage shares: the model, the data, the batch and learning rate, the
    random streams (each stage draws from them in turn, so a run is reproducible), the log and
    the run's trainer (processes, EMA, training states; default: one process)."""

    model: Spatia
    train: CellSet
    val: CellSet
    batch: int
    lr: float
    rng: np.random.Generator
    gen: torch.Generator
    report: Callable[[dict], None]
    trainer: Trainer | None = None


def train_cells(
    run: SpatiaRun,
    steps: int,
    log_every: int = 100,
    weights: CellLossWeights = CELL_LOSS_WEIGHTS,
) -> None:
    """Stage 1: the cell encoder (and its type probe where types are known)."""
    model, train, val, batch, lr = run.model, run.train, run.val, run.batch, run.lr
    rng, gen, report = run.rng, run.gen, run.report
    enc = model.cell

    def draw(n: int) -> CellBatch:
        idx = rng.integers(0, len(train), n)
        crops = torch.from_numpy(from_uint8(flip_rotate(train.crops[idx], rng)))
        full = train.counts[idx]
        gene_mask, patch_mask = _masks(model.cfg, n, gen, 0.25, 0.5)
        return CellBatch(idx, crops, full, torch.from_numpy(thin(full, rng)), gene_mask, patch_mask)

    def loss(b: CellBatch) -> Losses:
        out = enc(b.crops, b.thinned, b.gene_mask, b.patch_mask)
        device = b.crops.device
        terms = cell_losses(enc, out, b.crops, torch.from_numpy(b.counts).to(device), weights)
        objective = terms["expression"] + terms["image"]
        if out.type_logits is not None and train.types is not None:
            terms["probe"] = F.cross_entropy(
                out.type_logits, torch.from_numpy(train.types[b.index]).to(device)
            )
            objective = objective + terms["probe"]
        return Losses(objective, terms)

    stage = Stage(
        enc,
        steps,
        lr,
        batch=streamed(draw),
        loss=loss,
        batch_size=batch,
        validate=lambda: _validate_cells(model, val, weights),
        name="cells",
        log_every=log_every,
        digits=5,
        streams=(rng, gen),
        find_unused=True,
    )
    run_stage(stage, report, trainer=run.trainer)


@torch.no_grad()
def _validate_cells(model: Spatia, val: CellSet, weights: CellLossWeights, n: int = 512) -> dict:
    model.eval()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    idx = rng.choice(len(val), min(n, len(val)), replace=False)
    dev = device_of(model)
    crops = torch.from_numpy(from_uint8(val.crops[idx])).to(dev)
    counts = torch.from_numpy(val.counts[idx]).to(dev)
    gene_mask, patch_mask = (m.to(dev) for m in _masks(model.cfg, len(idx), gen, 0.25, 0.5))
    out = model.cell(crops, counts, gene_mask, patch_mask)
    losses = cell_losses(model.cell, out, crops, counts, weights)
    entry = {f"val_{k}": round(v.item(), 5) for k, v in losses.items()}
    if out.type_logits is not None and val.types is not None:
        entry["val_probe_acc"] = round(
            float((out.type_logits.argmax(1).cpu().numpy() == val.types[idx]).mean()), 4
        )
    model.train()
    return entry


@torch.no_grad()
def embed_cells(model: Spatia, cells: CellSet, batch: int = 256) -> np.ndarray:
    """Cell embeddings (N, E) from full crops and counts (no masking)."""
    model.eval()
    dev = device_of(model)
    out = [
        model.cell(
            torch.from_numpy(from_uint8(cells.crops[s : s + batch])).to(dev),
            torch.from_numpy(cells.counts[s : s + batch]).to(dev),
        )
        .embedding.cpu()
        .numpy()
        for s in range(0, len(cells), batch)
    ]
    model.train()
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


# -- stage 2: niches and tissue tiles -----------------------------------------------------------
def _context_loss(encoder, sets: SetBatch, gen: torch.Generator) -> Losses:
    """Hidden-member expression (MSE on log-normalised values) + the set's mean expression."""
    x, pos, valid, members, targets = sets
    hidden = (torch.rand(valid.shape, generator=gen).to(valid.device) < 0.2) & valid
    out, pooled = encoder(x, pos, valid, hidden)
    tgt = np.zeros((*valid.shape, targets.shape[1]), np.float32)
    for b, idx in enumerate(members):
        tgt[b, : len(idx)] = targets[idx]
    tgt_t = torch.from_numpy(tgt).to(valid.device)
    w = hidden.float()
    member = (
        ((encoder.member_expression(out) - tgt_t) ** 2).mean(-1) * w
    ).sum() / w.sum().clamp_min(1.0)
    mean_t = (tgt_t * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    pooled_loss = F.mse_loss(encoder.set_expression(pooled), mean_t)
    return Losses.single("loss", member + pooled_loss)


def train_context(
    run: SpatiaRun,
    steps: int,
    niche_um: tuple[float, float, float] = NICHE_UM,
    tissue_niches: Shape = TISSUE_NICHES,
    batch: int = 16,
    max_members: int = 512,
) -> None:
    """Stage 2: niche transformer over cells in random niche windows (``steps`` steps, ``batch``
    windows each), then the tissue transformer over niche embeddings in random tissue windows
    (``steps // 2``); the cell encoder is frozen."""
    model, train, lr, rng, gen, report = run.model, run.train, run.lr, run.rng, run.gen, run.report
    emb = embed_cells(model, train)
    values = expression_values(torch.from_numpy(train.counts))[0].numpy()
    spacing = np.asarray(train.spacing_um)
    points = (train.voxels + 0.5) * spacing
    extent = np.asarray(train.volume) * spacing
    size = np.asarray(niche_um)
    tile = size * np.asarray(tissue_niches)

    def niches(n: int) -> SetBatch:
        windows = random_windows(points, extent, size, n, rng)
        return SetBatch(*pad_sets([w for w in windows if len(w[0])], emb, max_members), values)

    def tissue_tiles(n: int) -> SetBatch:
        """Niches on a grid at a random offset, pooled by the trained niche model, in tiles."""
        niche_emb, centres, niche_values = _grid_niches(
            model, emb, points, values, size, extent, rng
        )
        windows = random_windows(centres, extent, tile, n, rng)
        sets = [w for w in windows if len(w[0])]
        return SetBatch(*pad_sets(sets, niche_emb, max_members), niche_values)

    started = time.perf_counter()
    for encoder, name, n, draw, size_, log_every in (
        (model.niche, "niche", steps, niches, batch, 100),
        (model.tissue, "tissue", steps // 2, tissue_tiles, max(2, batch // 4), 50),
    ):
        stage = Stage(
            encoder,
            n,
            lr,
            batch=streamed(draw),
            loss=partial(_context_loss, encoder, gen=gen),
            batch_size=size_,
            name=name,
            log_every=log_every,
            clip=None,
            summary="last",
            digits=5,
            streams=(rng, gen),
        )
        run_stage(stage, report, started, trainer=run.trainer)


@torch.no_grad()
def _grid_niches(model, emb, points, values, size, extent, rng):
    """Niche embeddings of a niche grid shifted by a random offset: (emb, centres, mean values)."""
    offset = rng.uniform(0, size)
    index = np.floor((points - offset) / size).astype(np.int64)
    keys, inverse = np.unique(index, axis=0, return_inverse=True)
    sets = []
    for k in range(len(keys)):
        idx = np.flatnonzero(inverse == k)
        sets.append((idx, centred(points[idx] - offset, keys[k], size)))
    out = []
    model.niche.eval()
    for s in range(0, len(sets), 32):
        part = sets[s : s + 32]
        x, pos, valid, _ = pad_sets(part, emb, 4096)
        out.append(model.niche(x, pos, valid)[1].numpy())
    model.niche.train()
    centres = (keys + 0.5) * size + offset
    mean_values = np.stack([values[i].mean(0) for i, _ in sets]).astype(np.float32)
    return np.concatenate(out), centres, mean_values


# -- stage 3: generator -------------------------------------------------------------------------
def train_generator(run: SpatiaRun, steps: int, log_every: int = 100) -> None:
    """Stage 3: flow matching of crops given (full-depth) expression."""
    model, train, val, batch, lr = run.model, run.train, run.val, run.batch, run.lr
    rng, gen, report = run.rng, run.gen, run.report
    g = model.generator

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rng.integers(0, len(train), n)
        x1 = torch.from_numpy(from_uint8(flip_rotate(train.crops[idx], rng)))
        return x1, torch.from_numpy(train.counts[idx])

    stage = Stage(
        g,
        steps,
        lr,
        batch=streamed(draw),
        loss=lambda b: Losses.single("flow", g.loss(*b, gen)),
        batch_size=batch,
        validate=lambda: _validate_generator(model, val),
        name="generator",
        log_every=log_every,
        digits=5,
        streams=(rng, gen),
    )
    run_stage(stage, report, trainer=run.trainer)


@torch.no_grad()
def _validate_generator(model: Spatia, val: CellSet, n: int = 256) -> dict:
    """The flow-matching loss on ``n`` fixed validation cells, without condition dropout."""
    g = model.generator
    g.eval()
    vi = np.random.default_rng(0).choice(len(val), min(n, len(val)), replace=False)
    vgen = torch.Generator().manual_seed(0)
    dev = device_of(model)
    vloss = g.loss(
        torch.from_numpy(from_uint8(val.crops[vi])).to(dev),
        torch.from_numpy(val.counts[vi]).to(dev),
        vgen,
        drop_rate=0.0,
    ).item()
    g.train()
    return {"val_flow": round(vloss, 5)}


# -- the whole training ---------------------------------------------------------------------------
def train_spatia(
    out: Path,
    model_config: SpatiaConfig | None = None,
    cell_steps: int = 3000,
    context_steps: int = 300,
    generator_steps: int = 1500,
    recipe: Recipe = SPATIA_RECIPE,
    volume: Shape = (16, 512, 512),
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0),
    niche_um: tuple[float, float, float] = NICHE_UM,
    tissue_niches: Shape = TISSUE_NICHES,
    data: tuple[CellSet, CellSet] | None = None,
    on_log: Callable[[dict], None] | None = None,
    loss_weights: CellLossWeights = CELL_LOSS_WEIGHTS,
    options: TrainOptions | None = None,
) -> list[dict]:
    """Train SPATIA and save it to ``out``; returns the training log.

    ``data`` (train, validation) defaults to the synthetic brain of ``recipe.seed`` (validation
    on ``recipe.seed + 1000``). ``options``: processes, accumulation, EMA, training states (a
    resumed run skips the stages it finished), figures (default: one process as before)."""
    cfg = model_config or SpatiaConfig()
    seed = recipe.seed
    rng, gen = recipe.start()
    train, val = data if data is not None else _synthetic_data(seed, volume, cfg.crop, spacing_um)
    if train.crops.shape[1:] != (cfg.in_channels, *cfg.crop[1:]):
        raise ValueError(f"crops {train.crops.shape[1:]} do not fit the model's crop {cfg.crop}")
    cfg = replace(cfg, genes=len(train.genes), cell_types=len(train.type_names))
    model = Spatia(cfg)
    model.train()
    history = TrainingLog(log, on_log)
    t0 = time.perf_counter()
    stage_steps = {"cell_steps": cell_steps, "context_steps": context_steps,
                   "generator_steps": generator_steps}  # fmt: skip
    identity = {"kind": "spatia", "config": cfg.to_dict(), **stage_steps, **recipe.to_dict()}
    with Trainer(model, options, out, identity, history.entries) as trainer:
        run = SpatiaRun(model, train, val, recipe.batch, recipe.lr, rng, gen, history, trainer)
        train_cells(run, cell_steps, weights=loss_weights)
        train_context(run, context_steps, niche_um, tissue_niches)
        train_generator(run, generator_steps)
        meta = {
            "config": cfg.to_dict(), "genes": list(train.genes),
            "cell_types": list(train.type_names), "spacing_um": list(train.spacing_um),
            "niche_um": list(niche_um), "tissue_niches": list(tissue_niches),
        }  # fmt: skip
        training = {
            "cells": len(train), **stage_steps, "batch": recipe.batch, "lr": recipe.lr,
            "cell_loss_weights": loss_weights.to_dict(), "seed": seed,
            "volume": list(train.volume), "wall_s": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        save_trained(out, model, "spatia", meta, training, history, trainer)
    return history.entries


def _synthetic_data(
    seed: int, volume: Shape, crop: Shape, spacing_um: tuple[float, float, float]
) -> tuple[CellSet, CellSet]:
    """The cells of a synthetic brain of ``seed``; validation cells of another seed."""
    return (
        synthetic_cells(seed, volume, crop, spacing_um),
        synthetic_cells(seed + 1000, (volume[0], 128, 256), crop, spacing_um),
    )
