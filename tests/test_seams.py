"""Seam patches shared between blocks: each lattice patch computed once per step, same bytes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tera_pipeline.core.config import lattice_preset
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import block_step, lifecycle, seams
from tera_pipeline.storage import layout, store


@pytest.fixture(params=["shifted", "wrapped"])
def job(request, small_job):
    """2 x 2 x 2 blocks of the tiny denoiser: seams on every axis, edges and a corner; on the
    wrapped lattice also the faces' seams, through the torus (the halo path, as the last step
    takes it: scratch not rolled)."""
    job = small_job.with_overrides(
        **{"volume.shape": (8, 64, 64), "storage.scratch_rolled": False},
        **lattice_preset(request.param, (4, 32, 32)),
    )
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


@pytest.mark.parametrize("volume", [(8, 64, 64), (4, 64, 96)])
def test_every_patch_has_one_owner_that_publishes_what_others_need(job, volume):
    """Every block's patches come from one place; an incoming patch's published part holds all
    of it that lies in the block's core (through the torus on a wrapped lattice: the far
    block's image of the first patch); one block across an axis computes two images once."""
    job = job.with_overrides(**{"volume.shape": volume})
    grid = job.grid(0)  # a step's lattice: moved (and wrapped) on every axis
    assert all(grid.lattice.offset)
    lattice = grid.lattice.all_patches(grid.volume)
    owners = [seams.owner(grid, p) for p in lattice]
    assert len(set(zip(owners, (p.begin for p in lattice)))) == len(lattice)
    wrapped = any(grid.lattice.wrap_axes(grid.volume))
    aliases = 0
    for block in grid.blocks():
        touching = grid.lattice.patches_touching(block.core, grid.volume)
        plan = seams.plan(grid, block.index, touching)
        placed = plan.outgoing + plan.interior + sum(plan.incoming.values(), [])
        assert sorted(placed + list(plan.aliases)) == list(range(len(touching)))
        aliases += len(plan.aliases)
        for who, positions in plan.incoming.items():
            rows, _ = seams.layout(grid, who)
            for i in positions:
                canonical = grid.lattice.canonical(touching[i], grid.volume)
                _, part = rows[canonical.begin]
                move = [t - c for t, c in zip(touching[i].begin, canonical.begin)]
                image = Box([b + m for b, m in zip(part.begin, move)], part.shape)
                assert image.contains(touching[i].intersect(block.core))
        for p in seams.outgoing(grid, block.index):
            assert not block.core.contains(p)
    assert aliases == (4 * 2 * 3 if wrapped and volume[0] == 4 else 0)  # z: one block


def test_blocks_in_order_compute_each_patch_once_with_the_same_bytes(job, tmp_path):
    """C order, one process: every lattice patch is evaluated once per step; the state equals a
    run that shares no seam (``share_seams`` off: every block computes all its patches)."""
    grid = job.grid(0)  # the lattice of step 0 (the default lattice moves at every step)
    lattice = len(grid.lattice.all_patches(grid.volume))
    assert lattice == (8 if grid.lattice.wrapped else 27)  # wrapped: E = 1
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


def test_a_block_takes_seams_its_owner_publishes_while_it_computes_them(job, monkeypatch):
    """Block (0, 0, 1) looks for its owner's file before (0, 0, 0) has run, so it starts on
    those patches itself; (0, 0, 0) then runs and publishes, and (0, 0, 1) takes the patches it
    had not computed yet from the file: fewer evaluations, the same bytes."""
    import threading

    job = job.with_overrides(batch_size=1)  # a batch a patch: the owner's share spans batches
    checkpoint = _setup(job)
    grid, block, owner = job.grid(0), (0, 0, 1), (0, 0, 0)
    real = block_step.get_predictor(checkpoint, job.batch_size)
    published, calls = threading.Event(), []

    class Predictor:  # the real one; the block's first call after its own patches waits
        meta, config, device = real.meta, real.config, real.device

        def predict(self, x, t, cond, offset=None):
            if threading.current_thread().name == "late":
                calls.append(len(x))  # patches the late block has sent to the model
                if sum(calls) > own:
                    assert published.wait(timeout=60)
            return real.predict(x, t, cond, offset)

    monkeypatch.setattr(block_step, "get_predictor", lambda *_: Predictor())
    touching = grid.lattice.patches_touching(grid.block(block).core, grid.volume)
    plan = seams.plan(grid, block, touching)
    own = len(plan.outgoing) + len(plan.interior)
    incoming = sum(len(g) for g in plan.incoming.values())
    assert incoming > 2
    result = {}
    late = threading.Thread(
        target=lambda: result.update(s=block_step.denoise_block(job, checkpoint, 0, block)),
        name="late",
    )
    late.start()
    while sum(calls) <= own and late.is_alive():  # until it computes its owner's patches
        time.sleep(0.01)
    stats_owner = block_step.denoise_block(job, checkpoint, 0, owner)
    published.set()
    late.join(timeout=120)
    stats = result["s"]
    assert 0 < stats.shared < incoming  # some computed here, the rest taken
    assert stats.items + stats.shared == own + incoming
    for index in np.ndindex(*grid.shape):
        if index not in (block, owner):
            block_step.denoise_block(job, checkpoint, 0, index)
    alone = job.with_overrides(out=str(job.out.parent / "alone.zarr"), share_seams=False)
    checkpoint_alone = _setup(alone)
    for index in np.ndindex(*grid.shape):
        block_step.denoise_block(alone, checkpoint_alone, 0, index)
    np.testing.assert_array_equal(_state(alone, 0), _state(job, 0))
    assert stats_owner.items > 0
