"""The engine's correctness: block-wise, out-of-core sampling equals whole-volume sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_denoiser
from tera_pipeline.core import errors, frames
from tera_pipeline.core.config import JobConfig, lattice_preset
from tera_pipeline.core.geometry import Box, patch_bins
from tera_pipeline.core.noise import position_noise
from tera_pipeline.generation import lifecycle
from tera_pipeline.generation.blending import patch_window
from tera_pipeline.generation.schedule import Schedule
from tera_pipeline.inputs.conditioning import open_source, rasterize
from tera_pipeline.storage import layout, store


def reference_sampling(job: JobConfig, steps_to_run: int) -> np.ndarray:
    """Whole-volume, in-memory sliding-window DDIM with the same denoiser and lattice.

    Written independently of the engine's block code: the whole state lives in one array, every
    lattice patch is evaluated once per step, predictions are blended over the whole volume.
    The model runs on fixed-size batches of ``job.batch_size`` patches in channels-last layout,
    as the engine does on CPUs (other kernels differ in the last bits: 4e-6 relative).
    Returns the float32 state after ``steps_to_run`` steps.
    """
    model, meta = load_denoiser(job.checkpoint)
    model.to(memory_format=torch.channels_last_3d)
    vol = job.volume.shape
    lattices = [job.lattice_at(step) for step in range(steps_to_run)]  # shifted: one per step
    vbox = Box((0, 0, 0), vol)
    b, context = job.conditioning.bin, model.cfg.cond_context
    cells = open_source(job).cells(vbox)
    d = job.diffusion  # the schedule made here, not by the engine's schedule_of
    sched = Schedule(steps=d.steps, eta=d.eta, prediction=meta["prediction"], sampler=d.sampler)
    window = patch_window(job.lattice.patch, job.lattice.window)
    state = position_noise(job.diffusion.seed, 0, vbox, 2)
    x0 = None
    sub_bin = model.cfg.sub_bin_offsets  # windows on the fixed grid, the offset given
    cond = rasterize(cells, patch_bins(vbox, b, (0, 0, 0)), job.volume.spacing_um, b)
    for step in range(steps_to_run):
        patches = lattices[step].all_patches(vol)
        wrap = lattices[step].wrap_axes(vol)  # a wrapped lattice: the volume is a torus there
        total = np.zeros((2, *vol), np.float32)
        weight = np.zeros(vol, np.float32)
        n = job.batch_size
        t = torch.full((n,), sched.timestep(step), dtype=torch.long)
        for start in range(0, len(patches), n):
            group = patches[start : start + n]
            x = torch.zeros(n, 2, *job.lattice.patch)
            c = torch.zeros(n, cond.shape[0], *model.cfg.cond_input)
            offset = torch.zeros(n, 3, dtype=torch.long)
            for i, p in enumerate(group):
                x[i] = torch.from_numpy(_torus_read(state, p, wrap))
                first = np.floor_divide(p.begin, b)  # the bin holding the patch's first voxel
                offset[i] = torch.from_numpy(np.asarray(p.begin) - first * b)
                genes = Box(tuple(first - np.asarray(context)), model.cfg.cond_input)
                c[i] = torch.from_numpy(_torus_read(cond, genes, wrap))
            with torch.inference_mode():
                x = x.contiguous(memory_format=torch.channels_last_3d)
                eps_batch = model(x, t, c, offset if sub_bin else None).numpy()
            for p, eps in zip(group, eps_batch):
                index, valid = _torus_index(p, vol, wrap)
                w = window[valid]
                total[(slice(None), *index)] += eps[(slice(None), *valid)] * w
                weight[index] += w
        state, x0 = sched.update(state, total / weight, step, previous_x0=x0)
    return state


def _torus_index(box: Box, shape, wrap) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Open-mesh indices of ``box``'s voxels in an array of ``shape`` (modulo the shape on the
    ``wrap`` axes, those inside it elsewhere), and of the same voxels within the box."""
    index, within = [], []
    for b, n, v, w in zip(box.begin, box.shape, shape, wrap, strict=True):
        at = np.arange(b, b + n)
        keep = np.ones(n, bool) if w else (at >= 0) & (at < v)
        index.append(at[keep] % v)
        within.append(np.flatnonzero(keep))
    return np.ix_(*index), np.ix_(*within)


def _torus_read(a: np.ndarray, box: Box, wrap) -> np.ndarray:
    """``a`` (C, *spatial) over ``box``: modulo its shape on the ``wrap`` axes, 0 beyond it
    elsewhere."""
    out = np.zeros((a.shape[0], *box.shape), a.dtype)
    index, within = _torus_index(box, a.shape[1:], wrap)
    out[(slice(None), *within)] = a[(slice(None), *index)]
    return out


def _state_after(job: JobConfig, client, steps_to_run: int) -> np.ndarray:
    """Run the engine's own phases for ``steps_to_run`` steps and read the scratch state
    (unrolled where the last step stored it rolled)."""
    checkpoint = lifecycle.prepare_store(job)
    lifecycle.conditioning_pass(job, client)
    for step in range(steps_to_run):
        lifecycle.denoise_step(job, checkpoint, step, client)
    array = store.open_array(job.out, layout.STATES[steps_to_run % 2])
    frame = frames.state_frame(job, steps_to_run)
    return store.read_box(array, Box((0, 0, 0), job.volume.shape), frame=frame)


def test_receptive_field_exceeds_halo(small_job):
    """The test denoiser couples voxels further apart than the halo (GroupNorm spans the patch)."""
    model, _ = load_denoiser(small_job.checkpoint)
    lattice = small_job.lattice_obj()
    x = torch.randn(1, 2, *lattice.patch)
    cond = torch.rand(1, 32, *model.cfg.cond_input)
    t = torch.tensor([500])
    far = x.clone()
    far[0, :, -1, -1, -1] += 5.0  # one corner voxel
    with torch.inference_mode():
        delta = (model(far, t, cond) - model(x, t, cond))[0, :, 0, 0, 0].abs().max()
    distance = lattice.patch[-1] - 1
    assert distance > max(lattice.halo_above + lattice.halo_below)
    assert delta > 1e-6


MODES = [
    "wrapped (the default)",
    "shifted",
    "wrapped, dpmpp_2m",
    "bin-shifted",
    "bin-shifted, bin-aligned model",
    "z-shifted",
    "overlapped",
    "bin-shifted, last steps overlapped",
    "shifted, dpmpp_2m",
    "z-shifted, dpmpp_2m",
    "overlapped, dpmpp_2m",
]
"""Every lattice mode and sampler the engine has (``any_mode_job``)."""

EVERY_MECHANISM = (
    "wrapped (the default)",  # rolled frames, no halo
    "overlapped",  # halo, blending, seam files
    "bin-shifted, last steps overlapped",  # a rolled step, then halo steps; sub-bin offsets
    "z-shifted, dpmpp_2m",  # the previous x0 kept as scratch, read over a halo
)
"""The modes whose bitwise invariance runs by default: one per mechanism of the block step
(12-15 s each here); the other modes run with ``-m slow``."""


def mode_job(mode: str, small_job: JobConfig, bin_aligned_checkpoint: Path) -> JobConfig:
    """The small job in ``mode`` (a lattice of ``lattice_preset``'s names, and sampler).
    Shifted by voxels: every step reads the stored bins, each patch's offset in its first bin
    given to the model; a bin-aligned model (the kind committed before) on bins. DPM-Solver++:
    its second-order step, the second of three, reads the first step's x0 from scratch."""
    name = mode.split(",")[0].removesuffix(" (the default)")
    job = small_job.with_overrides(**lattice_preset(name, small_job.lattice.patch))
    if "default" in mode:
        assert job.lattice == small_job.lattice  # the preset is the config's default
    if "last" in mode:
        job = job.with_overrides(**{"lattice.overlapped_final_steps": 2})  # steps 2, 3 of 3
    if "bin-aligned" in mode:
        job = job.with_overrides(checkpoint=str(bin_aligned_checkpoint))
    if "dpmpp_2m" in mode:
        job = job.with_overrides(**{"diffusion.sampler": "dpmpp_2m"})
    return job


@pytest.fixture(params=MODES)
def any_mode_job(request, small_job, tiny_bin_aligned_checkpoint) -> JobConfig:
    """The small job in each mode."""
    return mode_job(request.param, small_job, tiny_bin_aligned_checkpoint)


@pytest.fixture(
    params=[
        pytest.param(m, id=m, marks=() if m in EVERY_MECHANISM else pytest.mark.slow) for m in MODES
    ]
)
def invariance_job(request, small_job, tiny_bin_aligned_checkpoint) -> JobConfig:
    """The small job in each mode; those not in ``EVERY_MECHANISM`` marked slow."""
    return mode_job(request.param, small_job, tiny_bin_aligned_checkpoint)


def test_blockwise_equals_whole_volume(any_mode_job, client):
    """3 x 3 x 3 blocks, several DDIM steps: the out-of-core state equals the in-memory one, in
    the overlapped mode and in the shifted one (there with the same per-step lattices)."""
    small_job = any_mode_job
    assert small_job.grid().shape == (3, 3, 3)
    steps = 2
    blockwise = _state_after(small_job, client, steps)
    reference = reference_sampling(small_job, steps)
    rel = np.abs(blockwise - reference).max() / np.abs(reference).max()
    print(f"relative error block-wise vs whole-volume after {steps} steps: {rel:.2e}")
    assert rel < 1e-5


def test_same_output_whatever_blocks_workers_order(invariance_job, tmp_path, client, one_worker):
    """Same seed: same image for another block size (and compressed scratch), one worker vs
    two, reversed block order."""
    small_job = invariance_job
    shifted = small_job.lattice.mode == "shifted"
    other_block = (8, 64, 64) if shifted else (6, 48, 48)  # whole strides of the mode's lattice

    def image(job: JobConfig) -> np.ndarray:
        return store.read_box(
            store.open_array(job.out, layout.IMAGE), Box((0, 0, 0), job.volume.shape)
        )

    lifecycle.generate(small_job, client)
    first = image(small_job)

    bigger = small_job.with_overrides(
        out=str(tmp_path / "b.zarr"),
        **{"storage.block": other_block, "storage.scratch_codec": "zstd"},
    )
    assert bigger.grid().shape == (2, 2, 2)
    lifecycle.generate(bigger, one_worker)
    second = image(bigger)

    reversed_job = small_job.with_overrides(out=str(tmp_path / "r.zarr"))
    ckpt = lifecycle.prepare_store(reversed_job)
    order = list(reversed(list(np.ndindex(*reversed_job.grid().shape))))
    reports = [lifecycle.conditioning_pass(reversed_job, client)]
    for step in range(reversed_job.diffusion.steps):
        reports.append(lifecycle.denoise_step(reversed_job, ckpt, step, client, indices=order))
    if frames.unrolls(reversed_job):  # the last step rolled: the image phase, reversed too
        reports.append(lifecycle.image_pass(reversed_job, client, indices=order))
    lifecycle.finalize_store(reversed_job, reports)
    third = image(reversed_job)

    assert first.std() > 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


def test_seed_changes_output(small_job, client, tmp_path):
    a = small_job.with_overrides(out=str(tmp_path / "a.zarr"), **{"diffusion.steps": 1})
    b = a.with_overrides(out=str(tmp_path / "b.zarr"), **{"diffusion.seed": 8})
    for job in (a, b):
        lifecycle.generate(job, client)
    box = Box((0, 0, 0), a.volume.shape)
    ia = store.read_box(store.open_array(a.out, layout.IMAGE), box)
    ib = store.read_box(store.open_array(b.out, layout.IMAGE), box)
    assert (ia != ib).mean() > 0.5


def test_existing_store_is_refused(small_job, client):
    lifecycle.prepare_store(small_job)
    marker = small_job.out / "zarr.json"
    before = marker.read_bytes()
    with pytest.raises(store.StoreError, match="already exists"):
        lifecycle.prepare_store(small_job)
    assert marker.read_bytes() == before


def test_a_bin_aligned_checkpoint_is_refused_for_a_lattice_moved_by_voxels(
    small_job, tiny_bin_aligned_checkpoint
):
    job = small_job.with_overrides(checkpoint=str(tiny_bin_aligned_checkpoint))
    with pytest.raises(errors.GenerationError, match="pass --lattice bin-shifted"):
        lifecycle.prepare_store(job)
    assert not job.out.exists()
    lifecycle.prepare_store(job.with_overrides(**lattice_preset("bin-shifted", (4, 32, 32))))


def test_checkpoint_for_other_patch_is_refused_before_any_block(small_job, tmp_path):
    job = small_job.with_overrides(
        **{
            "lattice.patch": (4, 48, 48),
            "lattice.stride": (2, 16, 16),
            "storage.block": (4, 48, 48),
        }
    )
    with pytest.raises(errors.GenerationError, match="trained on patches"):
        lifecycle.prepare_store(job)
    assert not job.out.exists()


def _kept_by_workers(client) -> list[int]:
    from tera_pipeline.storage import cached_shards, raw_chunks

    return list(client.run(lambda: raw_chunks._MAPPED.nbytes + cached_shards._POOL.nbytes).values())


def test_workers_release_what_they_keep_of_a_finished_store(small_job, client, tmp_path):
    """Workers keep scratch files mapped and the conditioning decoded while a job runs; once
    its store is finished (scratch deleted) they release both."""
    job = small_job.with_overrides(out=str(tmp_path / "k.zarr"), **{"diffusion.steps": 2})
    checkpoint = lifecycle.prepare_store(job)
    reports = [lifecycle.conditioning_pass(job, client)]
    reports += [lifecycle.denoise_step(job, checkpoint, step, client) for step in range(2)]
    reports.append(lifecycle.image_pass(job, client))
    assert sum(_kept_by_workers(client)) > 0
    lifecycle.finalize_store(job, reports)
    lifecycle.release_workers(client)
    assert _kept_by_workers(client) == [0] * len(_kept_by_workers(client))
