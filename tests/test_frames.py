"""Steps computed in their lattice's frame: one box read, every patch computed once, no seam
file, the state (at the last step, the image) stored rolled, and the image bitwise that of the
halo path."""

from __future__ import annotations

import numpy as np
import pytest

from tera_pipeline.core import frames
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import block_step, image_phase, lifecycle, seams
from tera_pipeline.storage import layout, ledger, store


@pytest.fixture(params=["ddim", "dpmpp_2m"])
def job(request, small_job):
    """2 x 2 x 2 blocks of 4 x 32 x 32 on the default (wrapped) lattice, 3 steps."""
    job = small_job.with_overrides(
        **{"volume.shape": (8, 64, 64), "diffusion.sampler": request.param}
    )
    assert job.grid().shape == (2, 2, 2) and job.lattice.wrap
    return job


def _run(job) -> list[list]:
    """Every step of every block in C order, one process; each step's block statistics."""
    checkpoint = str(lifecycle.prepare_store(job))
    blocks = list(np.ndindex(*job.grid().shape))
    for index in blocks:
        block_step.rasterize_block(job, index)
    steps = range(job.diffusion.steps)
    stats = [[block_step.denoise_block(job, checkpoint, k, i) for i in blocks] for k in steps]
    if frames.unrolls(job):  # the image phase
        stats.append([image_phase.unroll_block(job, i) for i in blocks])
    return stats


def _stored(job, name: str) -> np.ndarray:
    return store.read_box(store.open_array(job.out, name), Box((0, 0, 0), job.volume.shape))


def test_rolled_steps_compute_whole_patches_and_give_the_halo_paths_image(job, tmp_path):
    steps = job.diffusion.steps
    assert [frames.rolls(job, k) for k in range(steps)] == [True, True, True]
    assert frames.image_phase(job) == steps + 1
    offset = job.lattice_at(1).offset
    assert all(offset) and frames.state_frame(job, 2) == offset

    rolled = _run(job)
    assert len(rolled) == steps + 1  # and the image phase
    patches = job.grid(0).lattice.counts(job.volume.shape)
    for k in (0, 1, 2):  # each lattice patch once, none shared, no seam file, no halo read
        assert sum(s.items for s in rolled[k]) == np.prod(patches)
        assert sum(s.shared for s in rolled[k]) == 0
        assert not any(seams.path(job.out, k, i).exists() for i in np.ndindex(2, 2, 2))
        for index in np.ndindex(2, 2, 2):
            reads = block_step.state_reads(job, k, index)
            assert sum(b.size for b in reads) == np.prod(job.storage.block)
    after_step_1 = layout.STATES[0]  # phase 2
    state_rolled = _stored(job, after_step_1)  # rolled by step 1's offset

    halo = job.with_overrides(out=str(tmp_path / "halo.zarr"), **{"storage.scratch_rolled": False})
    assert not frames.rolls_any(halo)
    _run(halo)
    state = _stored(halo, after_step_1)
    unrolled = store.read_box(
        store.open_array(job.out, after_step_1),
        Box((0, 0, 0), job.volume.shape),
        frame=offset,
    )
    np.testing.assert_array_equal(unrolled, state)  # the same state, stored rolled
    assert not np.array_equal(state_rolled, state)
    image = _stored(halo, layout.IMAGE)
    np.testing.assert_array_equal(_stored(job, layout.IMAGE), image)
    assert not np.array_equal(_stored(job, layout.ROLLED_IMAGE), image)  # stored rolled

    halo_last = job.with_overrides(
        out=str(tmp_path / "halo_last.zarr"), **{"storage.final_step_rolled": False}
    )
    assert frames.rolls(halo_last, 1) and not frames.unrolls(halo_last)
    assert len(_run(halo_last)) == steps  # no image phase
    assert not (halo_last.out / layout.ROLLED_IMAGE).exists()
    np.testing.assert_array_equal(_stored(halo_last, layout.IMAGE), image)


def test_a_store_with_unrolled_scratch_is_not_resumed_as_rolled(small_job, tmp_path):
    """A store written before scratch was rolled resumes only as it was written (its identity
    lacks the field); where nothing would roll (an overlapped lattice) nothing changes."""
    out = tmp_path / "old.zarr"
    out.mkdir()
    before = small_job.with_overrides(out=str(out), **{"storage.scratch_rolled": False})
    ledger.create(out, before, ledger.output_identity(before, "sha"))
    now = before.with_overrides(**{"storage.scratch_rolled": True})
    with pytest.raises(ledger.ResumeError, match="scratch_rolled: false"):
        ledger.check_identity(out, ledger.output_identity(now, "sha"))
    ledger.check_identity(out, ledger.output_identity(before, "sha"))
    overlapped = {"lattice.mode": "overlapped", "lattice.stride": (2, 16, 16)}
    assert not frames.rolls_any(now.with_overrides(**overlapped))
    assert ledger.output_identity(now.with_overrides(**overlapped), "sha") == (
        ledger.output_identity(before.with_overrides(**overlapped), "sha")
    )


def test_a_store_without_the_image_phase_finishes_its_last_step_as_written(small_job, tmp_path):
    """The ledger of a store begun before the image phase existed has no row for it: such a
    store finishes its last step in the volume's frame, whatever the config says; the job's
    identity is the same either way (the image is)."""
    job = small_job.with_overrides(out=str(tmp_path / "j.zarr"))
    assert frames.unrolls(job)
    old = job.with_overrides(**{"storage.final_step_rolled": False})
    for made, rows in ((old, job.diffusion.steps + 1), (job, job.diffusion.steps + 2)):
        out = tmp_path / f"{rows}.zarr"
        out.mkdir()
        ledger.create(out, made, ledger.output_identity(made, "sha"))
        assert len(ledger.progress(out)) == rows
        laid_out = ledger.as_laid_out(job.with_overrides(out=str(out)), out)
        assert frames.unrolls(laid_out) == (made is job)
        assert ledger.as_laid_out(old.with_overrides(out=str(out)), out).storage == (
            laid_out.storage
        )
    assert ledger.output_identity(old, "sha") == ledger.output_identity(job, "sha")
