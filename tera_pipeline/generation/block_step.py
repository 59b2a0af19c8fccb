"""The block step of synchronised patch diffusion with an exact halo.

For each DDIM step (a barrier between steps), every block reads the state over the span of all
lattice patches touching its core, runs the denoiser on those patches (a patch straddling blocks is
computed by one of them and shared through a scratch file: ``seams``), blends the predictions with
a positive window normalised by the summed weights, applies the DDIM update to its core and writes
the core (one whole shard) to the other scratch array; the last step writes the uint8 image.
The initial noise is a pure function of (seed, position) and is never stored. Because patches sit
on a global lattice, every voxel sees exactly the patches of whole-volume sampling: the result
does not depend on block size, worker count or order.

Block tasks are plain functions of (config, checkpoint, step, block index) that any executor can
call (``tera_pipeline.runtime.tasks.run_blocks`` feeds them to Dask).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box, bin_box, bounding_box, gene_window
from tera_pipeline.core.intensity import to_uint8
from tera_pipeline.core.noise import position_noise
from tera_pipeline.generation.blending import Accumulator, patch_window
from tera_pipeline.generation.predictor import get_predictor, schedule_of
from tera_pipeline.generation.seams import fetch as fetch_seams
from tera_pipeline.generation.seams import plan as plan_seams
from tera_pipeline.generation.seams import publish as publish_seams
from tera_pipeline.inputs.conditioning import open_source
from tera_pipeline.runtime.cluster import gpu_task
from tera_pipeline.runtime.tasks import BlockStats
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import (
    CELL_COUNT,
    CONDITIONING,
    IMAGE,
    PREVIOUS_X0,
    STATES,
    job_genes,
    scratch_arrays,
)


def rasterize_block(config: JobConfig, index: tuple[int, ...]) -> BlockStats:
    """Conditioning of one block: the gene bins and cell counts of its core, from the source."""
    t0 = time.perf_counter()
    core = config.grid().block(index).core
    b, sp = config.conditioning.bin, config.volume.spacing_um
    root = Path(config.out)
    bins = bin_box(core, b)
    genes, counts = open_source(config, job_genes(root)).rasters(core, bins, sp, b)
    crc = store.write_box(store.open_array(root, CONDITIONING), bins, genes)
    crc = store.write_box(store.open_array(root, CELL_COUNT), bins, counts, crc)
    return BlockStats(total_s=time.perf_counter() - t0, digest=crc)


def read_span(grid, core: Box) -> tuple[list[Box], Box]:
    """The lattice patches touching a block's core, and the box they cover (what a step of the
    block reads: its core and the exact halo)."""
    patches = grid.lattice.patches_touching(core, grid.volume)
    return patches, bounding_box(patches)


@dataclass
class _StepInputs:
    """What a block's step reads: the state over its span, the conditioning under it, each
    patch's gene window in it, and the patches' offset within their first bin (for models that
    take one; the same for every patch of a lattice)."""

    patches: list[Box]
    span: Box
    x: np.ndarray
    cond: np.ndarray
    cond_span: Box
    windows: list[Box]
    offset: tuple[int, int, int] | None


def _read_inputs(config: JobConfig, grid, step: int, core: Box, model_cfg) -> _StepInputs:
    """The state over the block's span (step 0: the noise of the span) and its conditioning."""
    patches, span = read_span(grid, core)
    root, channels = Path(config.out), len(config.volume.stains)
    if step == 0:
        x = position_noise(config.diffusion.seed, 0, span, channels)
        outside = span.intersect(grid.volume_box)
        mask = np.zeros(span.shape, dtype=bool)
        mask[outside.slices(span)] = True
        x[:, ~mask] = 0.0  # beyond the volume the state reads as the fixed fill, as in scratch
    else:
        x = store.read_box(store.open_array(root, STATES[step % 2]), span).astype(np.float32)
    # windows on the stored bins, wherever the patches start (a bin-aligned model's patches
    # start on bins: ``check_checkpoint``), with the patches' offset in their first bin
    b, context = config.conditioning.bin, model_cfg.cond_context
    placed = [gene_window(p, b, model_cfg.cond_footprint, context) for p in patches]
    windows = [w for w, _ in placed]
    cond_span = bounding_box(windows)
    cond = store.read_box(store.open_array(root, CONDITIONING), cond_span)
    offset = placed[0][1] if model_cfg.sub_bin_offsets else None
    return _StepInputs(patches, span, x, cond, cond_span, windows, offset)


def _predict(
    config: JobConfig,
    predictor,
    grid,
    step: int,
    key: tuple[int, ...],
    inputs: _StepInputs,
    t: int,
    stats: BlockStats,
) -> np.ndarray:
    """The denoiser's prediction for every patch of the block, in lattice order: its outgoing
    seam patches first (published as soon as they are done), those its neighbours own fetched
    as late as possible (computed here when not yet published)."""
    root, channels = Path(config.out), len(config.volume.stains)
    patches, span = inputs.patches, inputs.span
    batch = max(config.batch_size, 1)
    seams = plan_seams(grid, key, patches, share=config.share_seams)
    preds = np.empty((len(patches), channels, *config.lattice.patch), dtype=np.float32)
    todo = deque(seams.outgoing + seams.interior)  # outgoing first: neighbours wait on them
    unpublished, resolved = len(seams.outgoing), not seams.incoming
    while todo or not resolved:
        if not resolved and len(todo) < batch:  # as late as possible; fills the last batch
            tr = time.perf_counter()
            missing = fetch_seams(root, grid, step, patches, seams, preds)
            stats.read_s += time.perf_counter() - tr
            stats.shared = sum(map(len, seams.incoming.values())) - len(missing)
            todo.extend(missing)
            resolved = True
            continue
        group = [todo.popleft() for _ in range(min(batch, len(todo)))]
        xs = np.stack([inputs.x[(slice(None), *patches[i].slices(span))] for i in group])
        cs = np.stack(
            [inputs.cond[(slice(None), *inputs.windows[i].slices(inputs.cond_span))] for i in group]
        )
        tm = time.perf_counter()
        preds[group] = predictor(xs, t, cs, inputs.offset)
        stats.model_s += time.perf_counter() - tm
        stats.items += len(group)
        if unpublished > 0:
            unpublished -= len(group)
            if unpublished <= 0:
                tw = time.perf_counter()
                publish_seams(root, grid, step, key, preds[seams.outgoing])
                stats.write_s += time.perf_counter() - tw
    return preds


def _write_update(
    config: JobConfig, step: int, core: Box, x_next: np.ndarray, x0: np.ndarray | None
) -> int:
    """Write the updated core to the next scratch state (the last step: the uint8 image), and
    the core's x0 prediction when the next step's sampler needs it; returns the digest."""
    root = Path(config.out)
    if step == config.diffusion.steps - 1:
        return store.write_box(store.open_array(root, IMAGE), core, to_uint8(x_next))
    phase = step + 1
    digest = store.write_box(store.open_array(root, STATES[phase % 2]), core, x_next)
    if PREVIOUS_X0[phase % 2] in scratch_arrays(config, phase):
        x0_array = store.open_array(root, PREVIOUS_X0[phase % 2])
        digest = store.write_box(x0_array, core, x0, digest)
    return digest


@gpu_task
def denoise_block(
    config: JobConfig, checkpoint: str, step: int, index: tuple[int, ...]
) -> BlockStats:
    """One sampling step of one block: read with halo, denoise patches, blend, update, write
    core (and, for DPM-Solver++, the core's x0 prediction).

    The block's own seam patches are computed first and published; those its lower neighbours
    own are taken from their files when published (``tera_pipeline.seams``), else computed.
    """
    predictor = get_predictor(checkpoint, config.batch_size)  # loaded once per worker
    t0 = time.perf_counter()
    stats = BlockStats()
    grid = config.grid(step)  # the step's lattice (shifted mode: offset per step)
    core = grid.block(index).core
    inputs = _read_inputs(config, grid, step, core, predictor.config)
    sched = schedule_of(config, predictor.meta.get("prediction", "epsilon"))
    stats.read_s = time.perf_counter() - t0

    key = tuple(int(i) for i in index)
    preds = _predict(config, predictor, grid, step, key, inputs, sched.timestep(step), stats)
    window = patch_window(tuple(config.lattice.patch), config.lattice.window)
    acc = Accumulator(core, len(config.volume.stains))
    for p, e in zip(inputs.patches, preds, strict=True):  # lattice order, whoever computed them
        acc.add(p, e, window)

    channels = len(config.volume.stains)
    noise = None
    if sched.sigma(step) > 0:
        noise = position_noise(config.diffusion.seed, step + 1, core, channels)
    previous_x0 = None
    if sched.needs_previous_x0 and 0 < step < sched.steps - 1:
        previous_x0 = store.read_box(
            store.open_array(Path(config.out), PREVIOUS_X0[step % 2]), core
        )
    x_core = inputs.x[(slice(None), *core.slices(inputs.span))]
    x_next, x0 = sched.update(x_core, acc.result(), step, noise, previous_x0)
    tw = time.perf_counter()
    stats.digest = _write_update(config, step, core, x_next, x0)
    stats.write_s += time.perf_counter() - tw
    stats.total_s = time.perf_counter() - t0
    return stats
