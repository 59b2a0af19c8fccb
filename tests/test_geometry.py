"""Boxes, the patch lattice and its halo, the block grid and its layout checks."""

from __future__ import annotations

import itertools

import pytest

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import BlockGrid, Box, GeometryError, PatchLattice


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
