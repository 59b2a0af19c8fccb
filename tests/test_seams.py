"""Seam patches shared between blocks: each lattice patch computed once per step, same bytes."""

from __future__ import annotations

import numpy as np
import pytest

from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import block_step, lifecycle, seams
from tera_pipeline.storage import layout, store


@pytest.fixture
def job(small_job):
    """2 x 2 x 2 blocks of the tiny denoiser: seams on every axis, edges and a corner."""
    job = small_job.with_overrides(**{"volume.shape": (8, 64, 64)})
    assert job.grid().shape == (2, 2, 2)
    return job


def _setup(job):
    checkpoint = str(lifecycle.prepare_store(job))
    for index in np.ndindex(*job.grid().shape):
        block_step.rasterize_block(job, index)
    return checkpoint


def _state(job, step: int) -> np.ndarray:
    arr = store.open_array(job.out, layout.STATES[(step + 1) % 2])
    return store.read_box(arr, Box((0, 0, 0), job.volume.shape))


def test_every_patch_has_one_owner_that_publishes_it(job):
    grid = job.grid()
    lattice = grid.lattice.all_patches(grid.volume)
    owners = [seams.owner(grid, p) for p in lattice]
    assert len(set(zip(owners, (p.begin for p in lattice)))) == len(lattice)
    for block in grid.blocks():
        touching = grid.lattice.patches_touching(block.core, grid.volume)
        plan = seams.plan(grid, block.index, touching)
        assert sorted(plan.outgoing + plan.interior + sum(plan.incoming.values(), [])) == list(
            range(len(touching))
        )
        for who, positions in plan.incoming.items():
            published = {p.begin for p in seams.outgoing(grid, who)}
            assert {touching[i].begin for i in positions} <= published
        for p in seams.outgoing(grid, block.index):
            assert not block.core.contains(p)


def test_blocks_in_order_compute_each_patch_once_with_the_same_bytes(job, tmp_path):
    """C order, one process: every lattice patch is evaluated once per step; the state equals a
    run that shares no seam (``share_seams`` off: every block computes all its patches)."""
    grid = job.grid(0)  # the lattice of step 0 (the default lattice moves at every step)
    lattice = len(grid.lattice.all_patches(grid.volume))
    touching = sum(len(grid.lattice.patches_touching(b.core, grid.volume)) for b in grid.blocks())
    assert touching > lattice  # the layout has seams to share
    checkpoint = _setup(job)
    stats = [block_step.denoise_block(job, checkpoint, 0, i) for i in np.ndindex(*grid.shape)]
    assert sum(s.items for s in stats) == lattice
    assert sum(s.shared for s in stats) == touching - lattice
    shared = _state(job, 0)

    alone = job.with_overrides(out=str(tmp_path / "alone.zarr"), share_seams=False)
    checkpoint = _setup(alone)
    computed = sum(
        block_step.denoise_block(alone, checkpoint, 0, i).items for i in np.ndindex(*grid.shape)
    )
    assert computed == touching
    assert not (alone.out / seams.SEAMS).exists()
    np.testing.assert_array_equal(_state(alone, 0), shared)


def test_unreadable_seam_file_is_recomputed(job):
    grid = job.grid()
    checkpoint = _setup(job)
    block_step.denoise_block(job, checkpoint, 0, (0, 0, 0))
    seam = seams.path(job.out, 0, (0, 0, 0))
    assert seam.is_file()
    good = block_step.denoise_block(job, checkpoint, 0, (0, 0, 1))
    seam.write_bytes(b"torn")  # a reader must never trust it
    bad = block_step.denoise_block(job, checkpoint, 0, (0, 0, 1))
    assert good.shared > 0 and bad.shared == 0
    assert bad.items == good.items + good.shared
    # a block removes its own file of the step before when it publishes the next
    block_step.denoise_block(job, checkpoint, 0, (0, 0, 0))
    for index in np.ndindex(*grid.shape):
        block_step.denoise_block(job, checkpoint, 0, index)
    block_step.denoise_block(job, checkpoint, 1, (0, 0, 0))
    assert seams.path(job.out, 1, (0, 0, 0)).is_file()
    assert not seams.path(job.out, 0, (0, 0, 0)).exists()
