"""MagNet over the chunk grid: gene expression predicted back from a store's image.

Each block task reads its core's bins plus the context MagNet's tiles and neighbours need, and
writes the predicted transcript counts per bin to ``magnet_expression`` (gene, zbin, ybin, xbin),
on exactly the conditioning's bin grid and coordinates. ``metrics`` then compares them with the
conditioning (cycle consistency of a generated volume) at 1 x 1, 2 x 2 and 4 x 4 bins. A run
ends by writing the bin grid's SpatialData elements (``spatial_elements.write_bins``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import DEFAULT_MAGNET, CheckpointError, load_magnet
from models.magnet import MagNet
from tera_pipeline.analysis import spatial_elements
from tera_pipeline.analysis.magnet_levels import Reader, array_reader, level_inputs
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import AnalysisError
from tera_pipeline.core.geometry import Box, Shape, bin_box
from tera_pipeline.generation import integrity
from tera_pipeline.inputs.panel import panel_difference
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.cluster import gpu_task
from tera_pipeline.runtime.model_cache import worker_model
from tera_pipeline.storage import layout, store

EXPRESSION = "magnet_expression"
SLABS_PER_BATCH = 4


def to_counts(log_expression: torch.Tensor) -> np.ndarray:
    """Model output (log1p counts) -> counts, never negative."""
    return np.expm1(log_expression.float().clamp_min(0).cpu().numpy())


@torch.inference_mode()
def predict_bins(
    model: MagNet, read: Reader, core: Box, volume: Box, bin_shape: Shape
) -> np.ndarray:
    """Predicted counts (G, z, y, x bins) of the core bins ``core``, a few z slabs at a time."""
    out = []
    for z0 in range(core.begin[0], core.end[0], SLABS_PER_BATCH):
        z1 = min(z0 + SLABS_PER_BATCH, core.end[0])
        part = Box.from_bounds((z0, *core.begin[1:]), (z1, *core.end[1:]))
        inputs = level_inputs(read, part, volume, bin_shape, model.config)
        device = next(model.parameters()).device
        out.append(to_counts(model(inputs.to(device))["bin"]))  # (S, Y, X, G)
    return np.concatenate(out).transpose(3, 0, 1, 2)


def predict_volume(model: MagNet, image: np.ndarray, bin_shape: Shape) -> np.ndarray:
    """The whole-volume, in-memory run: (C, z, y, x) uint8 -> counts (G, zbin, ybin, xbin)."""
    bins = bin_box(Box((0, 0, 0), image.shape[1:]), bin_shape)
    return predict_bins(model, array_reader(image), bins, bins, bin_shape)


def check_model(meta: dict, genes: tuple[str, ...], bin_shape: Shape, path: Path) -> None:
    """A checkpoint fits a store when it was trained on the same gene panel and bin shape."""
    difference = panel_difference(genes, meta.get("genes", ()))
    if difference:
        raise CheckpointError(
            f"{path} was trained for another gene panel than the store's: {difference}"
        )
    if tuple(meta.get("bin", bin_shape))[1:] != tuple(bin_shape)[1:]:
        raise CheckpointError(f"{path} reads {meta['bin']} bins; the store's are {list(bin_shape)}")


def check(
    root: Path, checkpoint: Path | None = None, metrics: bool = False
) -> tuple[JobConfig, Path]:
    """Everything MagNet needs of a store and a checkpoint, checked before anything is written."""
    from tera_pipeline.storage.layout import job_of

    root = Path(root)
    job = job_of(root)
    if not (root / layout.IMAGE / "zarr.json").is_file():
        raise AnalysisError(f"{root} has no image array: generate the volume first")
    if store.group_attrs(root)["tera_pipeline"].get("status") != "complete":
        raise AnalysisError(f"{root} is not a finished generation (its status is not complete)")
    if metrics and not (root / layout.CONDITIONING / "zarr.json").is_file():
        raise AnalysisError(
            f"{root} has no conditioning array: metrics need the expression to compare with "
            "(run without metrics to only predict)"
        )
    integrity.require_intact(job, conditioning=metrics)  # a lost shard would read as zeros
    path = Path(checkpoint or DEFAULT_MAGNET)
    _, meta = load_magnet(path)
    check_model(meta, layout.job_genes(root), job.conditioning.bin, path)
    return job, path


def prepare(root: Path, checkpoint: Path | None = None) -> tuple[JobConfig, str]:
    """Check the store and the checkpoint, and create ``magnet_expression``."""
    job, path = check(root, checkpoint)
    genes, b = layout.job_genes(Path(root)), job.conditioning.bin
    cond = layout.array_specs(job, genes)[1]  # the conditioning's layout: same grid, same chunks
    store.remove(root, EXPRESSION)
    store.create_array(
        root,
        store.ArraySpec(
            EXPRESSION,
            cond.shape,
            "float32",
            cond.dims,
            cond.shard,
            cond.chunk,
            attributes={
                "long_name": "transcript counts per bin predicted by MagNet from the image",
                "bin_voxels": list(b),
                "checkpoint": str(path),
            },
        ),
    )
    return job, str(path)


@gpu_task
def magnet_block(job: JobConfig, checkpoint: str, index: tuple[int, ...]) -> tasks.BlockStats:
    """Predict the expression of one block's bins from the image and write it."""
    import time

    t0 = time.perf_counter()
    model, _ = worker_model(load_magnet, checkpoint)  # loaded once per worker
    root, b = Path(job.out), job.conditioning.bin
    image = store.open_array(root, layout.IMAGE)
    core = bin_box(job.grid().block(index).core, b)
    volume = bin_box(Box((0, 0, 0), job.volume.shape), b)
    counts = predict_bins(model, lambda box: store.read_box(image, box), core, volume, b)
    tw = time.perf_counter()
    store.write_box(store.open_array(root, EXPRESSION), core, counts)
    end = time.perf_counter()
    return tasks.BlockStats(
        items=int(np.prod(core.shape)), model_s=tw - t0, write_s=end - tw, total_s=end - t0
    )


def run(root: Path, client, checkpoint: Path | None = None, progress=None) -> tasks.PhaseReport:
    """MagNet over every block of the store."""
    root = Path(root)
    job, path = prepare(root, checkpoint)
    grid = job.grid()
    phase = tasks.BlockTask(
        "magnet", magnet_block, (job, path), np.ndindex(*grid.shape), grid.num_blocks
    )
    report = tasks.run_task(client, job, phase, progress)
    spatial_elements.write_bins(root)  # labels/bins and a table per bin array; consolidates
    return report


def cycle_consistency(root: Path) -> dict[str, dict]:
    """MagNet's prediction against the conditioning the volume was generated from."""
    import xarray as xr

    from tera_pipeline.analysis.expression_metrics import expression_metrics

    root = Path(root)
    for name, what in ((EXPRESSION, "run `tera analyze magnet` first"), (layout.CONDITIONING, "")):
        if not (root / name / "zarr.json").is_file():
            hint = what or "metrics need the conditioning to compare with"
            raise AnalysisError(f"{root} has no {name} array: {hint}")
    ds = xr.open_zarr(root, consolidated=False)
    return expression_metrics(ds[EXPRESSION], ds[layout.CONDITIONING])
