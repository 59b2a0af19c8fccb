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
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import save_checkpoint
from models.spatia import (
    CELL_LOSS_WEIGHTS,
    CellLossWeights,
    Spatia,
    SpatiaConfig,
    cell_losses,
    expression_values,
)
from tera_pipeline.analysis.cells import (
    cell_voxels,
    centred,
    crop_halo,
    extract_crops,
    to_unit,
)
from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.inputs.synthetic import CELL_TYPES, SyntheticBrain
from tera_pipeline.runtime.memory import keep_freed_memory
from tera_pipeline.training.denoiser import optimizer_step, warmup_cosine

log = logging.getLogger("tera_pipeline.spatia_training")

NICHE_UM = (32.0, 64.0, 64.0)
"""Default niche (z, y, x) in µm: about a hundred cells of the synthetic brain."""
TISSUE_NICHES = (2, 4, 4)
"""Default tissue tile in niches (z, y, x)."""


@dataclass(frozen=True)
class CellSet:
    """Cells with their crops (uint8, (N, C * crop_z, Y, X)), counts and centroid voxels."""

    crops: np.ndarray
    counts: np.ndarray
    voxels: np.ndarray
    genes: tuple[str, ...]
    spacing_um: tuple[float, float, float]
    volume: Shape
    types: np.ndarray | None = None
    type_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.counts)

    def subset(self, index: np.ndarray) -> CellSet:
        types = None if self.types is None else self.types[index]
        return replace(
            self,
            crops=self.crops[index],
            counts=self.counts[index],
            voxels=self.voxels[index],
            types=types,
        )


def crops_of_volume(image: np.ndarray, voxels: np.ndarray, crop: Shape) -> np.ndarray:
    """Crops of cells in a whole volume (C, Z, Y, X), with the fill 0 beyond its edges."""
    below, above = crop_halo(crop)
    padded = np.pad(image, [(0, 0)] + [(b, a) for b, a in zip(below, above, strict=True)])
    frame = Box(tuple(-b for b in below), padded.shape[1:])
    return extract_crops(padded, frame, voxels, crop)


def synthetic_cells(
    seed: int,
    shape: Shape,
    crop: Shape,
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0),
) -> CellSet:
    """Render a synthetic brain box and crop every cell whose centroid lies in it."""
    brain = SyntheticBrain(seed, spacing_um)
    box = Box((0, 0, 0), shape)
    cells = brain.cells(box)
    voxels = cell_voxels(cells.position_um, spacing_um)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
    cells, voxels = cells.select(inside), voxels[inside]
    crops = crops_of_volume(brain.render(box), voxels, crop)
    return CellSet(
        crops,
        cells.counts.astype(np.float32),
        voxels,
        brain.genes,
        tuple(spacing_um),
        tuple(shape),
        cells.cell_type,
        tuple(t.name for t in CELL_TYPES),
    )


def user_cells(
    images: Path,
    cells: Path,
    spacing_um: tuple[float, float, float],
    crop: Shape,
    genes: tuple[str, ...] | None = None,
    type_key: str | None = "cell_type",
) -> CellSet:
    """A user's image volume (zarr (c, z, y, x) uint8, or a store's ``image``) and its cell table
    (.h5ad / cell .csv); cell types from ``obs[type_key]`` or a ``type_key`` column if present."""
    from tera_pipeline.core.config import VolumeSpec
    from tera_pipeline.inputs.cells import load_cells
    from tera_pipeline.training.denoiser import _read_image

    image = _read_image(Path(images))
    shape = image.shape[1:]
    table = load_cells(cells, genes, volume=VolumeSpec(shape=shape, spacing_um=spacing_um))
    voxels = cell_voxels(table.position_um, spacing_um)
    labels = _user_labels(Path(cells), type_key, len(table))
    types, names = (None, ())
    if labels is not None:
        names_arr, types = np.unique(labels, return_inverse=True)
        names = tuple(str(n) for n in names_arr)
    return CellSet(
        crops_of_volume(image, voxels, crop),
        table.counts.astype(np.float32),
        voxels,
        table.genes,
        tuple(spacing_um),
        tuple(shape),
        types,
        names,
    )


def _user_labels(path: Path, key: str | None, n: int) -> np.ndarray | None:
    if not key:
        return None
    if path.suffix.lower() == ".h5ad":
        import anndata

        obs = anndata.read_h5ad(path, backed="r").obs
        values = obs[key].astype(str).to_numpy() if key in obs else None
    elif path.suffix.lower() == ".csv":
        import pandas as pd

        header = pd.read_csv(path, nrows=0).columns
        values = (
            pd.read_csv(path, usecols=[key])[key].astype(str).to_numpy() if key in header else None
        )
    else:
        values = None
    return values if values is not None and len(values) == n else None


# -- augmentation ---------------------------------------------------------------------------------
def thin(counts: np.ndarray, rng: np.random.Generator, low: float = 0.02) -> np.ndarray:
    """Binomial thinning to a random capture rate per cell (log-uniform in [low, 1]; half of
    the cells keep their full depth): SPATIA sees shallow and deep cells alike, and learns to
    reconstruct the full counts from the thinned ones."""
    rate = np.exp(rng.uniform(np.log(low), 0.0, size=(len(counts), 1)))
    rate[rng.random(len(counts)) < 0.5] = 1.0
    return rng.binomial(counts.astype(np.int64), rate).astype(np.float32)


def flip_rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random in-plane rotation by 90° steps and flip of crops (N, C, Y, X)."""
    x = np.rot90(x, int(rng.integers(4)), axes=(2, 3))
    if rng.random() < 0.5:
        x = x[..., ::-1]
    return np.ascontiguousarray(x)


# -- stage 1: cells --------------------------------------------------------------------------------
def _masks(cfg: SpatiaConfig, n: int, gen: torch.Generator, genes: float, patches: float):
    gene_mask = torch.rand(n, cfg.genes, generator=gen) < genes
    patch_mask = torch.rand(n, cfg.tokens, generator=gen) < patches
    return gene_mask, patch_mask


def train_cells(
    model: Spatia,
    train: CellSet,
    val: CellSet,
    steps: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    report: Callable[[dict], None],
    log_every: int = 100,
    weights: CellLossWeights = CELL_LOSS_WEIGHTS,
) -> None:
    """Stage 1: the cell encoder (and its type probe where types are known)."""
    enc = model.cell
    cfg = model.cfg
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    running: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(train), batch)
        crops = torch.from_numpy(to_unit(flip_rotate(train.crops[idx], rng)))
        full = train.counts[idx]
        gene_mask, patch_mask = _masks(cfg, batch, gen, 0.25, 0.5)
        out = enc(crops, torch.from_numpy(thin(full, rng)), gene_mask, patch_mask)
        losses = cell_losses(enc, out, crops, torch.from_numpy(full), weights)
        loss = losses["expression"] + losses["image"]
        if out.type_logits is not None and train.types is not None:
            losses["probe"] = F.cross_entropy(out.type_logits, torch.from_numpy(train.types[idx]))
            loss = loss + losses["probe"]
        optimizer_step(loss, opt, sched)
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.item()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            n = i % log_every + 1
            entry = {"stage": "cells", "step": i + 1}
            entry.update({f"train_{k}": round(v / n, 5) for k, v in running.items()})
            entry.update(_validate_cells(model, val, weights))
            entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
            running = {}
            report(entry)


@torch.no_grad()
def _validate_cells(model: Spatia, val: CellSet, weights: CellLossWeights, n: int = 512) -> dict:
    model.eval()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    idx = rng.choice(len(val), min(n, len(val)), replace=False)
    crops = torch.from_numpy(to_unit(val.crops[idx]))
    counts = torch.from_numpy(val.counts[idx])
    gene_mask, patch_mask = _masks(model.cfg, len(idx), gen, 0.25, 0.5)
    out = model.cell(crops, counts, gene_mask, patch_mask)
    losses = cell_losses(model.cell, out, crops, counts, weights)
    entry = {f"val_{k}": round(v.item(), 5) for k, v in losses.items()}
    if out.type_logits is not None and val.types is not None:
        entry["val_probe_acc"] = round(
            float((out.type_logits.argmax(1).numpy() == val.types[idx]).mean()), 4
        )
    model.train()
    return entry


@torch.no_grad()
def embed_cells(model: Spatia, cells: CellSet, batch: int = 256) -> np.ndarray:
    """Cell embeddings (N, E) from full crops and counts (no masking)."""
    model.eval()
    out = [
        model.cell(
            torch.from_numpy(to_unit(cells.crops[s : s + batch])),
            torch.from_numpy(cells.counts[s : s + batch]),
        ).embedding.numpy()
        for s in range(0, len(cells), batch)
    ]
    model.train()
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


# -- stage 2: niches and tissue tiles -----------------------------------------------------------
def _windows(points: np.ndarray, extent: np.ndarray, size: np.ndarray, k: int, rng):
    """Members of ``k`` random windows of ``size`` inside ``extent``: (indices, positions)."""
    sets = []
    for _ in range(k):
        lo = rng.uniform(0, np.maximum(extent - size, 0))
        rel = (points - lo) / size
        inside = np.flatnonzero(np.all((rel >= 0) & (rel < 1), axis=1))
        sets.append((inside, (rel[inside] * 2 - 1).astype(np.float32)))
    return sets


def _pad_sets(sets, features: np.ndarray, max_members: int):
    """Stack variable-size sets into padded (B, N, E), (B, N, 3), valid (B, N)."""
    n = max(1, min(max_members, max(len(i) for i, _ in sets)))
    x = np.zeros((len(sets), n, features.shape[1]), np.float32)
    pos = np.zeros((len(sets), n, 3), np.float32)
    valid = np.zeros((len(sets), n), bool)
    members = []
    for b, (idx, p) in enumerate(sets):
        idx, p = idx[:n], p[:n]
        x[b, : len(idx)], pos[b, : len(idx)], valid[b, : len(idx)] = features[idx], p, True
        members.append(idx)
    return torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(valid), members


def _context_loss(encoder, x, pos, valid, members, targets: np.ndarray, gen) -> torch.Tensor:
    """Hidden-member expression (MSE on log-normalised values) + the set's mean expression."""
    hidden = (torch.rand(valid.shape, generator=gen) < 0.2) & valid
    out, pooled = encoder(x, pos, valid, hidden)
    tgt = np.zeros((*valid.shape, targets.shape[1]), np.float32)
    for b, idx in enumerate(members):
        tgt[b, : len(idx)] = targets[idx]
    tgt_t = torch.from_numpy(tgt)
    w = hidden.float()
    member = (
        ((encoder.member_expression(out) - tgt_t) ** 2).mean(-1) * w
    ).sum() / w.sum().clamp_min(1.0)
    mean_t = (tgt_t * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    pooled_loss = F.mse_loss(encoder.set_expression(pooled), mean_t)
    return member + pooled_loss


def train_context(
    model: Spatia,
    train: CellSet,
    steps: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    report: Callable[[dict], None],
    niche_um: tuple[float, float, float] = NICHE_UM,
    tissue_niches: Shape = TISSUE_NICHES,
    max_members: int = 512,
) -> None:
    """Stage 2: niche transformer over cells in random niche windows, then the tissue
    transformer over niche embeddings in random tissue windows (cell encoder frozen)."""
    emb = embed_cells(model, train)
    values = expression_values(torch.from_numpy(train.counts))[0].numpy()
    spacing = np.asarray(train.spacing_um)
    points = (train.voxels + 0.5) * spacing
    extent = np.asarray(train.volume) * spacing
    size = np.asarray(niche_um)
    opt = torch.optim.AdamW(model.niche.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    t0 = time.perf_counter()
    for i in range(steps):
        sets = [s for s in _windows(points, extent, size, batch, rng) if len(s[0])]
        x, pos, valid, members = _pad_sets(sets, emb, max_members)
        loss = _context_loss(model.niche, x, pos, valid, members, values, gen)
        optimizer_step(loss, opt, sched, clip=None)
        if (i + 1) % 100 == 0 or i + 1 == steps:
            report({"stage": "niche", "step": i + 1, "loss": round(loss.item(), 5),
                    "elapsed_s": round(time.perf_counter() - t0, 1)})  # fmt: skip

    # tissue: niches on a grid at a random offset each step, pooled by the trained niche model
    tile = size * np.asarray(tissue_niches)
    opt = torch.optim.AdamW(model.tissue.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps // 2)
    for i in range(steps // 2):
        niche_emb, niche_pts, niche_val = _grid_niches(
            model, emb, points, values, size, extent, rng
        )
        sets = [s for s in _windows(niche_pts, extent, tile, max(2, batch // 4), rng) if len(s[0])]
        x, pos, valid, members = _pad_sets(sets, niche_emb, max_members)
        loss = _context_loss(model.tissue, x, pos, valid, members, niche_val, gen)
        optimizer_step(loss, opt, sched, clip=None)
        if (i + 1) % 50 == 0 or i + 1 == steps // 2:
            report({"stage": "tissue", "step": i + 1, "loss": round(loss.item(), 5),
                    "elapsed_s": round(time.perf_counter() - t0, 1)})  # fmt: skip


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
        x, pos, valid, _ = _pad_sets(part, emb, 4096)
        out.append(model.niche(x, pos, valid)[1].numpy())
    model.niche.train()
    centres = (keys + 0.5) * size + offset
    mean_values = np.stack([values[i].mean(0) for i, _ in sets]).astype(np.float32)
    return np.concatenate(out), centres, mean_values


# -- stage 3: generator -------------------------------------------------------------------------
def train_generator(
    model: Spatia,
    train: CellSet,
    val: CellSet,
    steps: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    report: Callable[[dict], None],
    log_every: int = 100,
) -> None:
    """Stage 3: flow matching of crops given (full-depth) expression."""
    g = model.generator
    opt = torch.optim.AdamW(g.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    running, t0 = 0.0, time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(train), batch)
        x1 = torch.from_numpy(to_unit(flip_rotate(train.crops[idx], rng)))
        loss = g.loss(x1, torch.from_numpy(train.counts[idx]), gen)
        optimizer_step(loss, opt, sched)
        running += loss.item()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            with torch.no_grad():
                g.eval()
                vi = np.random.default_rng(0).choice(len(val), min(256, len(val)), replace=False)
                vgen = torch.Generator().manual_seed(0)
                vloss = g.loss(
                    torch.from_numpy(to_unit(val.crops[vi])),
                    torch.from_numpy(val.counts[vi]),
                    vgen,
                    drop_rate=0.0,
                ).item()
                g.train()
            report(
                {
                    "stage": "generator",
                    "step": i + 1,
                    "train_flow": round(running / (i % log_every + 1), 5),
                    "val_flow": round(vloss, 5),
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                }
            )
            running = 0.0


# -- the whole training ---------------------------------------------------------------------------
def train_spatia(
    out: Path,
    model_config: SpatiaConfig | None = None,
    cell_steps: int = 3000,
    context_steps: int = 300,
    generator_steps: int = 1500,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 1,
    volume: Shape = (16, 512, 512),
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0),
    niche_um: tuple[float, float, float] = NICHE_UM,
    tissue_niches: Shape = TISSUE_NICHES,
    data: tuple[CellSet, CellSet] | None = None,
    on_log: Callable[[dict], None] | None = None,
    loss_weights: CellLossWeights = CELL_LOSS_WEIGHTS,
) -> list[dict]:
    """Train SPATIA and save it to ``out``; returns the training log.

    ``data`` (train, validation) defaults to the synthetic brain of ``seed`` (validation on
    seed + 1000)."""
    cfg = model_config or SpatiaConfig()
    keep_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if data is None:
        data = (
            synthetic_cells(seed, volume, cfg.crop, spacing_um),
            synthetic_cells(seed + 1000, (volume[0], 128, 256), cfg.crop, spacing_um),
        )
    train, val = data
    if train.crops.shape[1:] != (cfg.in_channels, *cfg.crop[1:]):
        raise ValueError(f"crops {train.crops.shape[1:]} do not fit the model's crop {cfg.crop}")
    cfg = replace(cfg, genes=len(train.genes), cell_types=len(train.type_names))
    model = Spatia(cfg)
    model.train()
    history: list[dict] = []

    def report(entry: dict) -> None:
        history.append(entry)
        (on_log or (lambda e: log.info("%s", e)))(entry)

    t0 = time.perf_counter()
    train_cells(model, train, val, cell_steps, batch, lr, rng, gen, report, weights=loss_weights)
    train_context(model, train, context_steps, 16, lr, rng, gen, report, niche_um, tissue_niches)
    train_generator(model, train, val, generator_steps, batch, lr, rng, gen, report)
    meta = {
        "config": cfg.to_dict(),
        "genes": list(train.genes),
        "cell_types": list(train.type_names),
        "spacing_um": list(train.spacing_um),
        "niche_um": list(niche_um),
        "tissue_niches": list(tissue_niches),
        "training": {
            "cells": len(train),
            "cell_steps": cell_steps,
            "context_steps": context_steps,
            "generator_steps": generator_steps,
            "batch": batch,
            "lr": lr,
            "cell_loss_weights": loss_weights.to_dict(),
            "seed": seed,
            "volume": list(train.volume),
            "wall_s": round(time.perf_counter() - t0, 1),
            "final": history[-1] if history else None,
        },
        "command": " ".join(shlex.quote(a) for a in ["tera", *sys.argv[1:]]),
    }
    save_checkpoint(Path(out), model, "spatia", meta)
    return history
