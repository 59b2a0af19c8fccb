"""The block step of synchronised patch diffusion with an exact halo.

For each DDIM step (a barrier between steps), every block reads the state over the span of all
lattice patches touching its core, runs the denoiser on those patches (a patch straddling blocks is
computed by one of them and shared through a scratch file: ``seams``), blends the predictions with
a positive window normalised by the summed weights, applies the DDIM update to its core and writes
the core (one whole shard) to the other scratch array; the last step writes the uint8 image.
Where the step's lattice tiles the volume's torus and blocks are whole patches, a block instead
computes its core moved by the lattice's offset (whole patches: no halo, no seam file) and the
state is stored rolled by that offset (``tera_pipeline.core.frames``); a last step so computed
stores its image rolled, and the image phase (``generation.image_phase``) writes each block's
core of it in place.
The initial noise is a pure function of (seed, position) and is never stored. Because patches sit
on a global lattice, every voxel sees exactly the patches of whole-volume sampling: the result
does not depend on block size, worker count or order.

Block tasks are plain functions of (config, checkpoint, step, block index) that any executor can
call (``tera_pipeline.runtime.tasks.run_blocks`` feeds them to Dask).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tera_pipeline.core import frames
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box, bin_box, bounding_box, rolled_pieces, torus_pieces
from tera_pipeline.core.intensity import to_uint8
from tera_pipeline.core.noise import position_noise
from tera_pipeline.generation.blending import Accumulator, patch_window
from tera_pipeline.generation.image_phase import image_read
from tera_pipeline.generation.predictor import get_predictor, schedule_of
from tera_pipeline.generation.seams import SeamPlan
from tera_pipeline.generation.seams import fetch as fetch_seams
from tera_pipeline.generation.seams import path as seam_path
from tera_pipeline.generation.seams import plan as plan_seams
from tera_pipeline.generation.seams import publish as publish_seams
from tera_pipeline.generation.tiling import cut, join, tiles, windows
from tera_pipeline.inputs.conditioning import open_source
from tera_pipeline.runtime.cluster import gpu_task
from tera_pipeline.runtime.memory import return_freed_memory
from tera_pipeline.runtime.tasks import BlockStats
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import (
    CELL_COUNT,
    CONDITIONING,
    IMAGE,
    PREVIOUS_X0,
    ROLLED_IMAGE,
    STATES,
    job_genes,
    scratch_arrays,
)

COND_CACHE_BYTES = 64 << 20
"""Decoded conditioning kept per worker (``storage.cached_shards``, each shard checked against
its file at every read): a block's gene windows reach into its neighbours' shards, which the
blocks after it, in this step and the next ones, read again."""


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
    """What a block's step reads, on the device that computes it: the state over its span, the
    conditioning under it, each patch's gene window in it (origins, one shape), and the
    patches' offset within their first bin (for models that take one; the same for every patch
    of a lattice)."""

    patches: list[Box]
    span: Box
    x: torch.Tensor
    cond: torch.Tensor
    windows: np.ndarray
    window_shape: tuple[int, int, int]
    offset: tuple[int, int, int] | None
    seams: SeamPlan
    complete: bool
    """Whether ``x`` holds the whole span; else only the core and the patches the block owns
    (the others come from their owners' seam files, and the rest is read if one is missing)."""
    _cut: torch.Tensor | None = field(default=None, repr=False)
    _cond_cut: torch.Tensor | None = field(default=None, repr=False)

    def states_of(self, group: list[int], lattice) -> torch.Tensor:
        """The state of the patches at ``group`` (len(group), C, *patch): for a lattice that
        tiles, rows of the span cut once by a reshape; else each patch sliced out."""
        if not tiles(lattice):
            span = self.span
            return torch.stack(
                [self.x[(slice(None), *self.patches[i].slices(span))] for i in group]
            )
        if self._cut is None:
            self._cut = cut(self.x, lattice.patch)
        return self._cut[_rows(group)]

    def complete_with(self, x: torch.Tensor) -> None:
        """The whole span's state, read after all (a seam patch to compute here)."""
        self.x, self.complete, self._cut = x, True, None

    def cond_of(self, group: list[int], lattice) -> torch.Tensor:
        """The gene windows of the patches at ``group``, stacked: for a lattice that tiles,
        rows of every window cut at once (``tiling.windows``); else each one sliced out."""
        if tiles(lattice):
            if self._cond_cut is None:
                counts = tuple(s // p for s, p in zip(self.span.shape, lattice.patch, strict=True))
                self._cond_cut = windows(self.cond, self.windows, counts, self.window_shape)
            if self._cond_cut is not None:
                return self._cond_cut[_rows(group)]
        wz, wy, wx = self.window_shape
        return torch.stack(
            [self.cond[:, z : z + wz, y : y + wy, x : x + wx] for z, y, x in self.windows[group]]
        )


def _rows(group: list[int]) -> slice | list[int]:
    """``group`` as a slice where it is a run of consecutive rows (a view, not a copy)."""
    first = group[0] if group else 0
    return (
        slice(first, first + len(group))
        if group == list(range(first, first + len(group)))
        else group
    )


def _read_inputs(
    config: JobConfig, grid, step: int, index: tuple[int, ...], region: Box, model_cfg, device
) -> _StepInputs:
    """The state the block computes from (step 0: the noise of its span) and its conditioning,
    moved to ``device``: over the whole span, or, where neighbours share their seam patches,
    over the core and the patches the block owns (its low-side halo is theirs). A block that
    computes in its lattice's frame (``core.frames``) reads just ``region``, the box it
    computes."""
    patches, span = read_span(grid, region)
    if frames.rolls(config, step):  # whole patches: every one computed here
        seams = SeamPlan([], list(range(len(patches))), {})
    else:
        seams = plan_seams(grid, index, patches, share=config.share_seams)
    root, channels = Path(config.out), len(config.volume.stains)
    wrap = grid.lattice.wrap_axes(grid.volume)
    frame = frames.state_frame(config, step)
    complete = True
    if step == 0:
        x = position_noise_on(config.diffusion.seed, 0, span, channels, grid.volume, wrap)
    else:
        own = [patches[i] for i in seams.outgoing + seams.interior]
        needed = bounding_box([region, *own]) if seams.incoming else span
        x, complete = _read_state(root, step, span, needed, wrap, frame), needed == span
    # windows on the stored bins, wherever the patches start (a bin-aligned model's patches
    # start on bins: ``check_checkpoint``), with the patches' offset in their first bin
    b, context = np.asarray(config.conditioning.bin), np.asarray(model_cfg.cond_context)
    origins = np.asarray([p.begin for p in patches])
    first = origins // b  # the bin holding each patch's first voxel
    begins = first - context
    shape = tuple(int(n) for n in np.asarray(model_cfg.cond_footprint) + 2 * context)
    cond_span = Box.from_bounds(begins.min(axis=0), begins.max(axis=0) + shape)
    cond_array = store.open_array(root, CONDITIONING, cache_bytes=COND_CACHE_BYTES)
    cond = store.read_box(cond_array, cond_span, wrap=wrap)
    offset = tuple(int(o) for o in origins[0] - first[0] * b) if model_cfg.sub_bin_offsets else None
    return _StepInputs(
        patches,
        span,
        torch.from_numpy(x).to(device, torch.float32),
        torch.from_numpy(cond).to(device),
        begins - np.asarray(cond_span.begin),
        shape,
        offset,
        seams,
        complete,
    )


def position_noise_on(seed: int, stream: int, box: Box, channels: int, volume, wrap) -> np.ndarray:
    """The noise of ``stream`` over ``box``: that of each position (modulo the volume on the
    ``wrap`` axes); beyond the volume elsewhere the fixed fill, as scratch reads give."""
    x = np.zeros((channels, *box.shape), dtype=np.float32)
    for source, place in torus_pieces(box, volume, wrap):
        x[(slice(None), *place.slices())] = position_noise(seed, stream, source, channels)
    return x


def _read_state(root: Path, step: int, span: Box, box: Box, wrap, frame) -> np.ndarray:
    """Step ``step``'s state (stored rolled by ``frame``) over ``span``, read over ``box``
    alone (zeros elsewhere)."""
    array = store.open_array(root, STATES[step % 2])
    if box == span:
        return store.read_box(array, span, wrap=wrap, frame=frame)
    x = np.zeros((array.shape[0], *span.shape), dtype=array.dtype.numpy_dtype)
    x[(slice(None), *box.slices(span))] = store.read_box(array, box, wrap=wrap, frame=frame)
    return x


def state_reads(config: JobConfig, step: int, index: tuple[int, ...]) -> list[Box]:
    """Where in the stored state block ``index`` reads at ``step`` (storage boxes; at most its
    halo span, moved by the state's roll; at ``step = steps``, the image phase's reads of the
    last step's image)."""
    if step == config.diffusion.steps:
        box, wrap = image_read(config, index)
        frame = frames.state_frame(config, step)
        volume = config.volume.shape
        return [stored for stored, _ in rolled_pieces(box, volume, wrap, frame)]
    grid = config.grid(step)
    _, span = read_span(grid, frames.computed_box(config, step, grid.block(index).core))
    wrap, frame = grid.lattice.wrap_axes(grid.volume), frames.state_frame(config, step)
    return [stored for stored, _ in rolled_pieces(span, grid.volume, wrap, frame)]


def _predict(
    config: JobConfig,
    predictor,
    grid,
    step: int,
    key: tuple[int, ...],
    inputs: _StepInputs,
    t: int,
    stats: BlockStats,
) -> torch.Tensor:
    """The denoiser's prediction for every patch of the block, in lattice order, on the
    predictor's device: its outgoing seam patches first (published as soon as they are done),
    those its neighbours own fetched as late as possible (computed here when not yet published;
    an owner that publishes while they are computed saves the rest)."""
    root, channels = Path(config.out), len(config.volume.stains)
    patches, device, seams = inputs.patches, inputs.x.device, inputs.seams
    batch = max(config.batch_size, 1)
    preds = torch.empty((len(patches), channels, *grid.lattice.patch), device=device)

    def take(incoming: dict[tuple[int, ...], list[int]]) -> list[int]:
        """Fill ``preds`` from the owners' seam files; the positions still to compute."""
        tr = time.perf_counter()
        fetched = np.empty(tuple(preds.shape), dtype=np.float32)
        missing = fetch_seams(root, grid, step, patches, SeamPlan([], [], incoming), fetched)
        got = sorted(set(i for g in incoming.values() for i in g) - set(missing))
        preds[got] = torch.from_numpy(fetched[got]).to(device)
        stats.shared += len(got)
        stats.read_s += time.perf_counter() - tr
        return missing

    todo = deque(seams.outgoing + seams.interior)  # outgoing first: neighbours wait on them
    unpublished, resolved = len(seams.outgoing), not seams.incoming
    late: dict[tuple[int, ...], list[int]] = {}  # owners not published at the first look
    while todo or not resolved:
        if not resolved and len(todo) < batch:  # as late as possible; fills the last batch
            missing = take(seams.incoming)
            if missing and not inputs.complete:  # computed here after all: read the rest
                tr = time.perf_counter()
                wrap = grid.lattice.wrap_axes(grid.volume)
                frame = frames.state_frame(config, step)
                state = _read_state(root, step, inputs.span, inputs.span, wrap, frame)
                inputs.complete_with(torch.from_numpy(state).to(device, torch.float32))
                stats.read_s += time.perf_counter() - tr
            computed_here = set(missing)
            late = {w: [i for i in g if i in computed_here] for w, g in seams.incoming.items()}
            late = {w: g for w, g in late.items() if g}
            todo.extend(missing)
            resolved = True
            continue
        group = [todo.popleft() for _ in range(min(batch, len(todo)))]
        tm = time.perf_counter()
        states = inputs.states_of(group, grid.lattice)
        preds[group] = predictor.predict(
            states, t, inputs.cond_of(group, grid.lattice), inputs.offset
        )
        stats.model_s += time.perf_counter() - tm
        stats.items += len(group)
        if unpublished > 0:
            unpublished -= len(group)
            if unpublished <= 0:
                tw = time.perf_counter()
                outgoing = preds[seams.outgoing].cpu().numpy()
                publish_seams(root, grid, step, key, outgoing)
                stats.write_s += time.perf_counter() - tw
        if late:  # an owner published since: take the patches not computed yet
            left = set(todo)
            ready = {w: [i for i in g if i in left] for w, g in late.items()}
            ready = {w: g for w, g in ready.items() if g and seam_path(root, step, w).exists()}
            late = {w: g for w, g in late.items() if w not in ready and set(g) & left}
            if ready:
                taken = set(i for g in ready.values() for i in g) - set(take(ready))
                todo = deque(i for i in todo if i not in taken)
    if seams.aliases:  # second images of a patch (one block across a wrapped axis)
        preds[list(seams.aliases)] = preds[list(seams.aliases.values())]
    return preds


def _assemble(config: JobConfig, grid, inputs: _StepInputs, preds: torch.Tensor, core: Box):
    """The prediction over ``core`` (the voxels the block computes): its tiles put in place (a
    lattice that tiles), or the patches blended with their window, normalised by the summed
    weights (lattice order)."""
    lattice = grid.lattice
    if tiles(lattice):
        counts = tuple(s // p for s, p in zip(inputs.span.shape, lattice.patch, strict=True))
        return join(preds, counts)[(slice(None), *core.slices(inputs.span))]
    window = patch_window(tuple(lattice.patch), config.lattice.window)
    acc = Accumulator(core, preds.shape[1], preds.device)
    for p, e in zip(inputs.patches, preds, strict=True):  # whoever computed them
        acc.add(p, e, window)
    return acc.result()


def _write_update(
    config: JobConfig, step: int, core: Box, x_next: torch.Tensor, x0: torch.Tensor
) -> int:
    """Write the updated core to the next scratch state (the last step: the uint8 image, or
    the image stored rolled), and
    the core's x0 prediction when the next step's sampler needs it; returns the digest."""
    root = Path(config.out)
    if step == config.diffusion.steps - 1:  # the image, or the image stored rolled
        image = store.open_array(root, ROLLED_IMAGE if frames.rolls(config, step) else IMAGE)
        return store.write_box(image, core, to_uint8(x_next.cpu().numpy()))
    phase = step + 1
    state = store.open_array(root, STATES[phase % 2])
    digest = store.write_box(state, core, _host(x_next, state))
    if PREVIOUS_X0[phase % 2] in scratch_arrays(config, phase):
        x0_array = store.open_array(root, PREVIOUS_X0[phase % 2])
        digest = store.write_box(x0_array, core, _host(x0, x0_array), digest)
    return digest


def _host(x: torch.Tensor, array) -> np.ndarray:
    """``x`` on the host in ``array``'s dtype, cast on the device (torch's cast to float16 is
    numpy's rounding, bitwise, several times faster; on a GPU it also halves the copy)."""
    dtype = torch.from_numpy(np.empty(0, array.dtype.numpy_dtype)).dtype
    return x.to(dtype).cpu().numpy()


@gpu_task
def denoise_block(
    config: JobConfig, checkpoint: str, step: int, index: tuple[int, ...]
) -> BlockStats:
    """One sampling step of one block: read with halo, denoise patches, put them in place (or
    blend), update, write core (and, for DPM-Solver++, the core's x0 prediction). From the
    read to the write the block stays on the predictor's device (the GPU where there is one).

    The block's own seam patches are computed first and published; those its lower neighbours
    own are taken from their files when published (``tera_pipeline.seams``), else computed.
    """
    predictor = get_predictor(checkpoint, config.batch_size)  # loaded once per worker
    device = predictor.device
    t0 = time.perf_counter()
    stats = BlockStats()
    grid = config.grid(step)  # the step's lattice (shifted mode: offset per step)
    core = grid.block(index).core
    region = frames.computed_box(config, step, core)  # the voxels computed, written at core
    key = tuple(int(i) for i in index)
    inputs = _read_inputs(config, grid, step, key, region, predictor.config, device)
    sched = schedule_of(config, predictor.meta.get("prediction", "epsilon"))
    stats.read_s = time.perf_counter() - t0

    preds = _predict(config, predictor, grid, step, key, inputs, sched.timestep(step), stats)
    output = _assemble(config, grid, inputs, preds, region)

    channels, volume = len(config.volume.stains), grid.volume
    wrap = grid.lattice.wrap_axes(volume)
    noise = previous_x0 = None
    if sched.sigma(step) > 0:
        seed = config.diffusion.seed
        noise = _on(device, position_noise_on(seed, step + 1, region, channels, volume, wrap))
    if sched.needs_previous_x0 and 0 < step < sched.steps - 1:
        array = store.open_array(Path(config.out), PREVIOUS_X0[step % 2])
        frame = frames.state_frame(config, step)
        previous_x0 = _on(device, store.read_box(array, region, wrap=wrap, frame=frame))
    x_core = inputs.x[(slice(None), *region.slices(inputs.span))]
    x_next, x0 = sched.update(x_core, output, step, noise, previous_x0)
    tw = time.perf_counter()
    stats.digest = _write_update(config, step, core, x_next, x0)
    stats.write_s += time.perf_counter() - tw
    stats.total_s = time.perf_counter() - t0
    del inputs, preds, output, x_core, x_next, x0, noise, previous_x0
    return_freed_memory()  # now and then: the worker's memory stays that of one block
    return stats


def _on(device: torch.device, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).to(device, torch.float32)
