"""Voxel geometry: boxes, the block grid with its halo, and the global patch lattice.

Vocabulary after funlib.geometry / daisy: a *Box* is an axis-aligned region in voxels
(begin, shape); a *Block* has a *core* (the voxels it owns and writes) and a *read box*
(the core grown by the halo, clipped to the volume). All coordinates are spatial (z, y, x);
channel axes are handled by the callers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tera_pipeline.core.errors import TeraError

Shape = tuple[int, ...]


def _tuple(values: Sequence[int]) -> Shape:
    return tuple(int(v) for v in values)


class GeometryError(TeraError, ValueError):
    """A layout that cannot work (blocks that are not whole shards, strides, ...)."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of voxels: ``begin`` (inclusive) and ``shape``."""

    begin: Shape
    shape: Shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "begin", _tuple(self.begin))
        object.__setattr__(self, "shape", _tuple(self.shape))
        if len(self.begin) != len(self.shape):
            raise GeometryError(f"begin {self.begin} and shape {self.shape} differ in rank")
        if any(s < 0 for s in self.shape):
            raise GeometryError(f"negative box shape {self.shape}")
        # kept, not a field: the engine asks for it many times per block
        object.__setattr__(self, "_end", tuple(b + s for b, s in zip(self.begin, self.shape)))

    @classmethod
    def of_ints(cls, begin: Shape, shape: Shape) -> Box:
        """A box from tuples of Python ints already checked (a shape of one rank, not negative):
        no conversion or check, for the many patches of a block."""
        box = object.__new__(cls)
        object.__setattr__(box, "begin", begin)
        object.__setattr__(box, "shape", shape)
        object.__setattr__(box, "_end", tuple(b + s for b, s in zip(begin, shape)))
        return box

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Box:
        return cls(begin, tuple(e - b for b, e in zip(begin, end, strict=True)))

    @property
    def end(self) -> Shape:
        return self._end  # type: ignore[attr-defined]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, below: Sequence[int], above: Sequence[int]) -> Box:
        """The box grown by ``below`` voxels before and ``above`` voxels after, per axis."""
        begin = tuple(b - g for b, g in zip(self.begin, below, strict=True))
        end = tuple(e + g for e, g in zip(self.end, above, strict=True))
        return Box.from_bounds(begin, end)

    def moved(self, by: Sequence[int]) -> Box:
        """The box translated by ``by`` voxels per axis."""
        return Box(tuple(b + d for b, d in zip(self.begin, by, strict=True)), self.shape)

    def intersect(self, other: Box) -> Box:
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin, strict=True))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        end = tuple(max(b, e) for b, e in zip(begin, end, strict=True))
        return Box.from_bounds(begin, end)

    def contains(self, other: Box) -> bool:
        return all(
            sb <= ob and oe <= se
            for sb, se, ob, oe in zip(self.begin, self.end, other.begin, other.end, strict=True)
        )

    def slices(self, within: Box | None = None) -> tuple[slice, ...]:
        """Slices selecting this box inside an array that covers ``within`` (default: origin 0)."""
        origin = within.begin if within is not None else (0,) * self.ndim
        return tuple(
            slice(b - o, b - o + s) for b, o, s in zip(self.begin, origin, self.shape, strict=True)
        )

    def __str__(self) -> str:
        return "[" + ", ".join(f"{b}:{e}" for b, e in zip(self.begin, self.end, strict=True)) + ")"


@dataclass(frozen=True)
class PatchLattice:
    """The global lattice of patches: origins at ``offset`` + multiples of ``stride``, size
    ``patch``.

    Without an offset, along each axis of length ``V`` there are ``max(1, ceil((V - P) / S) + 1)``
    patches from 0, so the lattice covers the volume; a patch may reach beyond the volume's far
    edge, where the state reads as a fixed fill. Choosing ``V - P`` a multiple of ``S`` avoids
    that. An ``offset`` (a shifted lattice, on the axes where stride = patch) moves every origin;
    the patches are those meeting the volume, the first one starting at or below 0.

    ``wrapped``: the volume is a torus on its *wrapped axes* (stride = patch and the volume whole
    patches): the patch across the low face takes the voxels below 0 from the far face, so every
    voxel lies in exactly one of ``volume / patch`` patches (E = 1), as SpotDiffusion rolls its
    latent. A block at the far face sees that patch as an *image* moved by the volume's length
    (``canonical`` names the patch an image is of); reads wrap (``torus_pieces``).
    """

    patch: Shape
    stride: Shape
    offset: Shape = (0, 0, 0)
    wrapped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", _tuple(self.patch))
        object.__setattr__(self, "stride", _tuple(self.stride))
        object.__setattr__(self, "offset", _tuple(self.offset))
        for p, s in zip(self.patch, self.stride, strict=True):
            if s <= 0 or p < s:
                raise GeometryError(
                    f"patch {self.patch} and stride {self.stride}: need 0 < stride <= patch"
                )
        for p, s, o in zip(self.patch, self.stride, self.offset, strict=True):
            if o and (s != p or not 0 <= o < p):
                raise GeometryError(
                    f"an offset axis needs stride = patch and 0 <= offset < patch: patch "
                    f"{self.patch}, stride {self.stride}, offset {self.offset}"
                )

    @property
    def shifted(self) -> bool:
        return any(self.offset)

    @property
    def overlap(self) -> Shape:
        return tuple(p - s for p, s in zip(self.patch, self.stride, strict=True))

    @property
    def halo_below(self) -> Shape:
        """Voxels below a stride-aligned core that patches touching it can start at."""
        return tuple(
            (p - o) % p if o else s * math.ceil((p - s) / s)
            for p, s, o in zip(self.patch, self.stride, self.offset, strict=True)
        )

    @property
    def halo_above(self) -> Shape:
        return tuple(
            o or p - s for p, s, o in zip(self.patch, self.stride, self.offset, strict=True)
        )

    def wrap_axes(self, volume: Shape) -> tuple[bool, ...]:
        """The axes on which a ``wrapped`` lattice makes the volume a torus: stride = patch, and
        the volume a whole number of patches."""
        return _wrap_axes(self, tuple(volume))

    def canonical(self, patch: Box, volume: Shape) -> Box:
        """The lattice patch that ``patch`` is an image of: on the wrapped axes, a patch reaching
        beyond the far face moved back by the volume's length (its origin below 0)."""
        if not self.wrapped:
            return patch
        wrap = self.wrap_axes(volume)
        begin = tuple(
            b - v if w and b + p > v else b
            for b, p, v, w in zip(patch.begin, self.patch, volume, wrap, strict=True)
        )
        return patch if begin == patch.begin else Box(begin, patch.shape)

    def _first(self, axis: int) -> int:
        """Lattice index of the first patch along ``axis`` (its origin at or below 0)."""
        return -(-self.offset[axis] // self.stride[axis])

    def counts(self, volume: Shape) -> Shape:
        """Number of lattice patches per axis for a volume of this shape: along an offset axis
        from the patch holding voxel 0 to the one holding voxel V - 1; ``V / P`` on a wrapped
        axis (the patch at the far face is the first one's image)."""
        return tuple(
            v // p if w else n
            for v, p, w, n in zip(
                volume, self.patch, self.wrap_axes(volume), self._reach(volume), strict=True
            )
        )

    def _reach(self, volume: Shape) -> Shape:
        """Patches per axis from the one holding voxel 0 to the one holding voxel V - 1, images
        of wrapped patches included."""
        return tuple(
            (v - 1 - o) // s + self._first(a) + 1 if o else max(1, math.ceil((v - p) / s) + 1)
            for a, (v, p, s, o) in enumerate(
                zip(volume, self.patch, self.stride, self.offset, strict=True)
            )
        )

    def evaluations_per_voxel(self, volume: Shape) -> float:
        """E: patch evaluations per output voxel and step when every lattice patch is evaluated
        once (seams shared): lattice patches x patch voxels / volume voxels. 8 away from the
        edges for a stride of half the patch on every axis; 1 for a stride of one patch."""
        patches = math.prod(self.counts(volume))
        return patches * math.prod(self.patch) / math.prod(volume)

    def patches_touching(self, core: Box, volume: Shape) -> list[Box]:
        """Every lattice patch that intersects ``core``, in lattice (C) order; on wrapped axes
        the patch across the far face as an image of the first (see ``canonical``)."""
        origins = []  # per axis, the origins of the patches touching the core
        for a, (b, e, p, s, n) in enumerate(
            zip(core.begin, core.end, self.patch, self.stride, self._reach(volume), strict=True)
        ):
            o, k0 = self.offset[a], self._first(a)  # patch j of the axis starts at o + (j - k0) s
            first = max(0, -(-(b - o - p + 1) // s) + k0)  # smallest j with its end > b
            last = min(n - 1, (e - 1 - o) // s + k0)  # largest j with its start < e
            origins.append([int(o + (j - k0) * s) for j in range(first, last + 1)])
        patch = _tuple(self.patch)
        return [Box.of_ints(begin, patch) for begin in itertools.product(*origins)]

    def all_patches(self, volume: Shape) -> list[Box]:
        """Every lattice patch once (no images), in lattice order."""
        every = self.patches_touching(Box((0,) * len(volume), volume), volume)
        return [p for p in every if self.canonical(p, volume) == p]


@lru_cache(maxsize=256)
def _wrap_axes(lattice: PatchLattice, volume: Shape) -> tuple[bool, ...]:
    return tuple(
        lattice.wrapped and s == p and v % p == 0
        for v, p, s in zip(volume, lattice.patch, lattice.stride, strict=True)
    )


@dataclass(frozen=True)
class Block:
    """One unit of scheduling and I/O: a core it owns and the read box it needs."""

    index: Shape
    core: Box
    read: Box


@dataclass(frozen=True)
class BlockGrid:
    """The block grid over a volume, tied to the patch lattice and the storage shards.

    Cores start on multiples of ``block`` (clipped at the volume edge); the read box is the core
    grown by the lattice halo and clipped to the volume (beyond it, reads give a fixed fill).
    """

    volume: Shape
    block_shape: Shape
    lattice: PatchLattice

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume", _tuple(self.volume))
        object.__setattr__(self, "block_shape", _tuple(self.block_shape))
        if any(v <= 0 for v in self.volume):
            raise GeometryError(f"volume shape {self.volume} must be positive")
        for axis, (b, s) in enumerate(zip(self.block_shape, self.lattice.stride, strict=True)):
            if b <= 0 or b % s:
                raise GeometryError(
                    f"block {self.block_shape} is not a whole number of strides "
                    f"{self.lattice.stride} (axis {axis}: {b} % {s} != 0)"
                )

    @property
    def volume_box(self) -> Box:
        return Box((0,) * len(self.volume), self.volume)

    @property
    def shape(self) -> Shape:
        """Number of blocks per axis."""
        return tuple(-(-v // b) for v, b in zip(self.volume, self.block_shape, strict=True))

    @property
    def num_blocks(self) -> int:
        return math.prod(self.shape)

    def block(self, index: Sequence[int]) -> Block:
        index = _tuple(index)
        begin = tuple(i * b for i, b in zip(index, self.block_shape, strict=True))
        core = Box(begin, self.block_shape).intersect(self.volume_box)
        read = core.grow(self.lattice.halo_below, self.lattice.halo_above).intersect(
            self.volume_box
        )
        return Block(index, core, read)

    def blocks(self) -> Iterator[Block]:
        """All blocks in C order, generated lazily (the grid can hold millions)."""
        for index in itertools.product(*(range(n) for n in self.shape)):
            yield self.block(index)

    def check_shards(self, shard: Sequence[int]) -> None:
        """Raise unless every block core is a whole number of storage shards."""
        for axis, (b, s) in enumerate(zip(self.block_shape, shard, strict=True)):
            if b % s:
                raise GeometryError(
                    f"block {self.block_shape} is not a whole number of shards {tuple(shard)} "
                    f"(axis {axis}: {b} % {s} != 0); one writer per shard needs whole shards"
                )


def torus_pieces(box: Box, volume: Shape, wrap: Sequence[bool]) -> list[tuple[Box, Box]]:
    """The parts of ``box`` inside the volume, which is a torus on the ``wrap`` axes, each as
    (where it lies in the volume, where it lies in ``box``, relative to its begin): cut where
    the box crosses a face of a wrapped axis, clipped to the volume on the others."""
    per_axis = []
    for b, n, v, w in zip(box.begin, box.shape, volume, wrap, strict=True):
        segments, at = [], b if w else max(b, 0)
        end_of_box = b + n if w else min(b + n, v)
        while at < end_of_box:
            end = min(end_of_box, (at // v + 1) * v)
            segments.append((at % v, at - b, end - at))
            at = end
        per_axis.append(segments)
    return [
        (
            Box([s for s, _, _ in pieces], [n for _, _, n in pieces]),
            Box([d for _, d, _ in pieces], [n for _, _, n in pieces]),
        )
        for pieces in itertools.product(*per_axis)
    ]


def rolled_pieces(
    box: Box, volume: Shape, wrap: Sequence[bool], frame: Sequence[int]
) -> list[tuple[Box, Box]]:
    """``torus_pieces`` of ``box`` in an array stored rolled by ``frame`` (position ``v`` at
    ``(v - frame) mod volume``): each piece as (where it is stored, where it lies in ``box``)."""
    pieces = torus_pieces(box, volume, wrap)
    if not any(frame):
        return pieces
    back, every = tuple(-f for f in frame), (True,) * box.ndim
    return [
        (stored, at.moved(place.begin))
        for source, place in pieces
        for stored, at in torus_pieces(source.moved(back), volume, every)
    ]


def cells_touching(cell: Sequence[int], begin: Sequence[int], end: Sequence[int]):
    """Each cell of the regular grid of ``cell``-sized cells (blocks, chunks) that overlaps
    [begin, end), on all axes given: its index and its first voxel."""
    ranges = [range(b // c, -(-e // c)) for b, e, c in zip(begin, end, cell, strict=True)]
    for index in itertools.product(*ranges):
        yield index, tuple(i * c for i, c in zip(index, cell, strict=True))


def bin_box(box: Box, bin_shape: Shape) -> Box:
    """The box in bin units that covers ``box`` (voxels)."""
    begin = tuple(b // n for b, n in zip(box.begin, bin_shape, strict=True))
    end = tuple(-(-e // n) for e, n in zip(box.end, bin_shape, strict=True))
    return Box.from_bounds(begin, end)


def bounding_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every one of ``boxes``."""
    return Box.from_bounds(
        [min(b.begin[a] for b in boxes) for a in range(3)],
        [max(b.end[a] for b in boxes) for a in range(3)],
    )


def gene_window(
    patch: Box, bin_shape: Shape, footprint: Shape, context: Shape
) -> tuple[Box, tuple[int, int, int]]:
    """The gene window of a patch on the volume's fixed bin grid, for a model whose patches may
    start within a bin: ``footprint`` bins from the bin holding the patch's first voxel, grown by
    ``context`` bins; and the patch's offset (voxels) within that first bin."""
    first = tuple(b // n for b, n in zip(patch.begin, bin_shape, strict=True))
    offset = tuple(b - f * n for b, f, n in zip(patch.begin, first, bin_shape, strict=True))
    return Box(first, footprint).grow(context, context), offset  # type: ignore[return-value]


def patch_bins(patch: Box, bin_shape: Shape, context: Shape) -> Box:
    """The gene window of a bin-aligned patch: the bins of its footprint grown by ``context``."""
    return bin_box(patch, bin_shape).grow(context, context)
