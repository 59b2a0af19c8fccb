"""Boxes, the patch lattice and its halo, the block grid and its layout checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tera_pipeline.core.config import JobConfig, lattice_preset
from tera_pipeline.core.geometry import (
    BlockGrid,
    Box,
    GeometryError,
    PatchLattice,
    torus_pieces,
)
from tera_pipeline.core.mappings import ConfigError


def test_box_algebra():
    a = Box((0, 10, 20), (4, 8, 8))
    assert a.end == (4, 18, 28)
    assert a.grow((1, 2, 3), (1, 2, 3)) == Box((-1, 8, 17), (6, 12, 14))
    assert a.intersect(Box((2, 0, 0), (10, 12, 22))) == Box((2, 10, 20), (2, 2, 2))
    assert a.intersect(Box((10, 0, 0), (1, 1, 1))).empty
    assert a.slices(Box((0, 8, 16), (10, 20, 20))) == (slice(0, 4), slice(2, 10), slice(4, 12))
    with pytest.raises(GeometryError):
        Box((0,), (-1,))


def test_halo_formula():
    lat = PatchLattice((4, 32, 32), (2, 16, 16))
    assert lat.halo_below == (2, 16, 16) and lat.halo_above == (2, 16, 16)
    lat = PatchLattice((5, 40, 32), (2, 16, 16))  # overlap not a multiple of the stride
    assert lat.halo_below == (4, 32, 16) and lat.halo_above == (3, 24, 16)


@pytest.mark.parametrize(
    "patch,stride,volume,block",
    [
        ((4, 32, 32), (2, 16, 16), (12, 96, 96), (4, 32, 32)),
        ((5, 40, 24), (2, 16, 8), (13, 100, 50), (4, 32, 16)),
    ],
)
def test_patches_touching_a_core_are_exactly_those_of_the_lattice(patch, stride, volume, block):
    lattice = PatchLattice(patch, stride)
    grid = BlockGrid(volume, block, lattice)
    everything = lattice.all_patches(volume)
    covered = set()
    for blk in grid.blocks():
        touching = lattice.patches_touching(blk.core, volume)
        brute = [p for p in everything if not p.intersect(blk.core).empty]
        assert touching == brute
        # the halo-grown, clipped read box holds every in-volume voxel those patches need
        for p in touching:
            assert blk.read.contains(p.intersect(grid.volume_box))
        covered.update(
            itertools.product(*(range(b, e) for b, e in zip(blk.core.begin, blk.core.end)))
        )
    assert len(covered) == volume[0] * volume[1] * volume[2]


def test_lattice_covers_volume_edges():
    lattice = PatchLattice((4, 32, 32), (2, 16, 16))
    assert lattice.counts((12, 96, 96)) == (5, 5, 5)
    assert lattice.counts((3, 20, 100)) == (1, 1, 6)
    last = lattice.all_patches((12, 96, 100))[-1]
    assert last.end[2] >= 100


def test_grid_clips_edge_blocks():
    grid = BlockGrid((10, 100, 70), (4, 32, 32), PatchLattice((4, 32, 32), (2, 16, 16)))
    assert grid.shape == (3, 4, 3)
    edge = grid.block((2, 3, 2))
    assert edge.core == Box((8, 96, 64), (2, 4, 6))
    assert edge.read == Box((6, 80, 48), (4, 20, 22))


def test_block_must_be_whole_strides_and_shards():
    lattice = PatchLattice((4, 32, 32), (2, 16, 16))
    with pytest.raises(GeometryError, match="whole number of strides"):
        BlockGrid((16, 64, 64), (3, 32, 32), lattice)
    grid = BlockGrid((16, 64, 64), (4, 32, 32), lattice)
    with pytest.raises(GeometryError, match="whole number of shards"):
        grid.check_shards((4, 64, 64))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"storage.block": (4, 40, 40)}, "whole number of strides"),
        ({"storage.shard": (4, 64, 64), "storage.block": (4, 32, 32)}, "whole number of shards"),
        ({"storage.chunk": (4, 48, 48)}, "whole number of chunks"),
        ({"lattice.stride": (2, 8, 8), "storage.block": (16, 128, 128)}, "whole gene bins"),
        ({"volume.shape": (0, 10, 10)}, "positive"),
    ],
)
def test_config_layout_errors_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        JobConfig().with_overrides(**override)


def test_patch_evaluations_per_voxel_of_the_lattices():
    half = PatchLattice((4, 32, 32), (2, 16, 16))
    assert round(half.evaluations_per_voxel((16, 256, 256)), 2) == 6.15  # the demo job
    assert 7.9 < half.evaluations_per_voxel((10_000, 10_000, 10_000)) < 8.0  # far from edges: 8
    assert PatchLattice((4, 32, 32), (4, 32, 32)).evaluations_per_voxel((16, 256, 256)) == 1.0


def test_a_shifted_lattice_predicts_each_voxel_once_and_blocks_see_exactly_its_patches():
    """Offsets in bins (y, x: 16 of 32) and slices (z): every voxel lies in one patch, and the
    patches touching each block's core are those of the whole lattice that meet it."""
    volume, patch = (12, 96, 96), (4, 32, 32)
    for offset in [(0, 0, 0), (1, 16, 0), (3, 16, 16), (2, 0, 16)]:
        lattice = PatchLattice(patch, patch, offset)
        every = lattice.all_patches(volume)
        cover = np.zeros(volume, np.int32)
        for p in every:
            cover[p.intersect(Box((0, 0, 0), volume)).slices()] += 1
        assert (cover == 1).all(), offset
        assert len(every) == np.prod(lattice.counts(volume))
        grid = BlockGrid(volume, (4, 32, 32), lattice)
        for block in grid.blocks():
            touching = lattice.patches_touching(block.core, volume)
            assert touching == [p for p in every if p.intersect(block.core).size > 0]
            for p in touching:
                assert block.read.contains(p.intersect(grid.volume_box))
    with pytest.raises(GeometryError, match="stride = patch"):
        PatchLattice(patch, (2, 16, 16), (1, 0, 0))


def test_a_wrapped_lattice_covers_the_torus_once_and_blocks_see_images_of_its_patches():
    """On a volume of whole patches, the wrapped lattice has volume / patch patches, each voxel
    in exactly one of them (modulo the volume), and every block's patches are the lattice's
    patches that meet its core through the torus, as themselves or as images."""
    volume, patch = (12, 96, 64), (4, 32, 32)
    for offset in [(0, 0, 0), (1, 16, 0), (3, 5, 31)]:
        lattice = PatchLattice(patch, patch, offset, wrapped=True)
        every = lattice.all_patches(volume)
        assert len(every) == 3 * 3 * 2 == np.prod(lattice.counts(volume))
        assert lattice.evaluations_per_voxel(volume) == 1.0
        cover = np.zeros(volume, np.int32)
        for p in every:
            for source, _ in torus_pieces(p, volume, (True, True, True)):
                cover[source.slices()] += 1
        assert (cover == 1).all(), offset
        for block in BlockGrid(volume, (4, 32, 32), lattice).blocks():
            seen = lattice.patches_touching(block.core, volume)
            assert all(p.intersect(block.core).size for p in seen)
            assert {lattice.canonical(p, volume) for p in seen} == {
                p
                for p in every
                if any(s.intersect(block.core).size for s, _ in torus_pieces(p, volume, (1, 1, 1)))
            }
    odd = PatchLattice(patch, patch, (1, 5, 7), wrapped=True)
    assert odd.wrap_axes((12, 100, 64)) == (True, False, True)  # 100 is not whole patches
    assert odd.counts((12, 100, 64)) == (3, 4, 2)


def test_shifted_mode_draws_one_lattice_per_step_from_the_seed():
    job = JobConfig.model_validate(
        {
            "lattice": {"stride": (4, 32, 32), "mode": "shifted", "shift_unit": "bin"},
            "diffusion": {"seed": 3},
        }
    )
    shifts = [job.lattice_at(k).offset for k in range(job.diffusion.steps)]
    assert all(s[1] % 16 == 0 and s[2] % 16 == 0 for s in shifts)  # whole gene bins
    by_voxels = job.with_overrides(**{"lattice.shift_unit": "voxel"})
    voxel_shifts = [by_voxels.lattice_at(k).offset for k in range(job.diffusion.steps)]
    assert any(s[1] % 16 or s[2] % 16 for s in voxel_shifts)  # whole voxels
    z_only = job.with_overrides(**{"lattice.stride": (4, 16, 16)})
    assert all(z_only.lattice_at(k).offset[1:] == (0, 0) for k in range(job.diffusion.steps))
    assert any(z_only.lattice_at(k).offset[0] for k in range(job.diffusion.steps))
    # every seam of a step moves at the next: consecutive offsets differ on every axis
    assert all(a != b for s, n in zip(shifts, shifts[1:]) for a, b in zip(s, n))
    again = JobConfig.model_validate(job.model_dump())
    assert [again.lattice_at(k).offset for k in range(job.diffusion.steps)] == shifts
    assert 1.0 <= job.evaluations_per_voxel() < 1.6  # the demo's edges: (9/8)^2 x 5/4 at most
    big = job.with_overrides(**{"volume.shape": (10_000,) * 3})
    assert big.evaluations_per_voxel() < 1.01
    with pytest.raises(ValueError, match="stride = patch .* set lattice.mode to overlapped"):
        JobConfig.model_validate({"lattice": {"mode": "shifted", "stride": (2, 16, 16)}})
    hybrid = job.with_overrides(**{"lattice.overlapped_final_steps": 2})
    last = [hybrid.lattice_at(k) for k in (job.diffusion.steps - 2, job.diffusion.steps - 1)]
    assert all(lat.stride == (2, 16, 16) and not lat.shifted for lat in last)
    assert hybrid.lattice_at(0) == job.lattice_at(0)


def test_the_default_lattice_is_wrapped_and_shifted_by_voxels_and_a_stride_picks_its_mode():
    """The default is non-overlapping, moved by voxels on every axis and wrapped; a stride that
    overlaps on every axis, given without a mode (older configs), means the overlapped lattice;
    a job recorded before wrapping existed keeps its unwrapped lattice; the named lattices."""
    job = JobConfig()
    assert job.lattice.mode == "shifted" and job.lattice.shifted_axes == (True, True, True)
    assert job.lattice.shift_unit == "voxel" and job.lattice.wrap
    assert (
        job.lattice == JobConfig().with_overrides(**lattice_preset("wrapped", (4, 32, 32))).lattice
    )
    assert job.evaluations_per_voxel() == 1.0  # the demo: 16 x 256 x 256, whole patches
    recorded = job.model_dump(mode="json")
    del recorded["lattice"]["wrap"]  # a store written before
    assert not JobConfig.from_record(recorded).lattice.wrap
    assert round(JobConfig.from_record(recorded).evaluations_per_voxel(), 3) == 1.503
    assert JobConfig.model_validate({"lattice": {"stride": (2, 16, 16)}}).lattice.mode == (
        "overlapped"
    )
    assert job.with_overrides(**{"lattice.stride": (2, 16, 16)}).lattice.mode == "overlapped"
    assert job.with_overrides(**{"lattice.stride": (4, 32, 32)}).lattice.mode == "shifted"
    big = job.with_overrides(**{"volume.shape": (10_000,) * 3})
    old = big.with_overrides(**lattice_preset("overlapped", job.lattice.patch))
    assert old.lattice.stride == (2, 16, 16) and round(old.evaluations_per_voxel(), 2) == 7.97
    assert round(big.evaluations_per_voxel(), 3) == 1.006  # wrapped in z; in y, x 10,000 / 32
    shifted = big.with_overrides(**lattice_preset("shifted", job.lattice.patch))
    assert round(shifted.evaluations_per_voxel(), 3) == 1.007  # one more patch per axis
    z_shifted = big.with_overrides(**lattice_preset("z-shifted", job.lattice.patch))
    assert round(z_shifted.evaluations_per_voxel(), 2) == 3.99  # the default of 2026-12-02
    with pytest.raises(ConfigError, match="unknown lattice 'diagonal'; choose one of wrapped"):
        lattice_preset("diagonal", job.lattice.patch)


def test_the_last_steps_may_run_on_a_cheaper_overlapped_lattice():
    job = JobConfig.model_validate(
        {"lattice": {"stride": (4, 32, 32), "mode": "shifted", "overlapped_final_steps": 1,
                     "final_stride": (4, 16, 32)}, "volume": {"shape": (10_000,) * 3},
         "diffusion": {"steps": 15}}
    )  # fmt: skip
    last = job.lattice_at(job.diffusion.steps - 1)
    assert last.stride == (4, 16, 32) and not last.shifted
    assert 1.06 < job.evaluations_per_voxel() < 1.08  # (14 x 1 + 2) / 15 far from the edges
    with pytest.raises(ValueError, match="final_stride .* whole gene bins"):
        job.with_overrides(**{"lattice.final_stride": (4, 8, 32)})
