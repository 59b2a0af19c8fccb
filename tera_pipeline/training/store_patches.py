"""Denoiser training patches read out of core from an image store, a patch at a time.

``StorePatches`` draws the batches ``sample_offset_batch`` draws from an in-memory volume, with
the same (patches, gene windows, offsets) layout, from a TensorStore zarr array (c, z, y, x)
uint8 (or a store's ``image``); the gene windows come from a gene-bin raster array (gene, zbin,
ybin, xbin) (a store's ``conditioning``) or are rasterised from the user's cells per window.

Sampling is keyed: sample ``i`` of step ``step``'s global batch is drawn from a generator of
(seed, step, i) alone, so ranks that take disjoint index slices see the one-process batch and a
resumed run needs nothing but the step. A held-out box (default: the last eighth of y) is never
read for a training patch; validation draws fixed patches inside it. ``training/prefetch.py``
prepares the next steps' batches in spawned worker processes, each opening the store itself; a
step's batch is the same with any number of workers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tensorstore as ts

from tera_pipeline.core.config import VolumeSpec
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box, Shape, bin_box, patch_bins
from tera_pipeline.core.intensity import from_uint8
from tera_pipeline.inputs.conditioning import TableSource, rasterize
from tera_pipeline.storage import layout

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Patches (B, C, *patch) float32 in [-1, 1], gene windows (B, G, *window) float32, offsets
(B, 3) int64: ``sample_offset_batch``'s layout."""
VALIDATION_DOMAIN = 1
"""The spawn key of validation draws (training draws use none)."""


@dataclass(frozen=True)
class Draw:
    """One sample: the bin-aligned origin of its region (patch + ``extra`` bins), the in-plane
    quarter turns, the x and z flips, and the patch's offset within the turned region."""

    origin: Shape
    k: int
    flip_x: bool
    flip_z: bool
    offset: Shape


def open_zarr(path: Path) -> ts.TensorStore:
    """A zarr v3 or v2 array, for reading (a one-line ``InputError`` if there is none)."""
    for driver in ("zarr3", "zarr"):
        spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
        try:
            return ts.open(spec, open=True, read=True).result()
        except (ValueError, RuntimeError):
            continue
    raise InputError(f"{path}: not a zarr array")


def held_out_slab(volume: Shape, region: Shape, bin_shape: Shape, fraction: float = 0.125) -> Box:
    """The last ``fraction`` of y, on the bin grid and at least one region long."""
    split = min(int(volume[1] * (1 - fraction)), volume[1] - region[1])
    split = max(split // bin_shape[1] * bin_shape[1], 0)
    return Box((0, split, 0), (volume[0], volume[1] - split, volume[2]))


def parse_box(text: str) -> Box:
    """A box from ``z0:z1,y0:y1,x0:x1`` (voxels), as ``--validation-box`` takes it."""
    try:
        bounds = [[int(v) for v in part.split(":")] for part in text.split(",")]
        if len(bounds) != 3:
            raise ValueError(f"{len(bounds)} axes")
        return Box.from_bounds([b for b, _ in bounds], [e for _, e in bounds])
    except ValueError as err:
        raise InputError(f"--validation-box {text!r}: need z0:z1,y0:y1,x0:x1 ({err})") from None


def _attributes(path: Path) -> dict:
    """A zarr array's attributes (v3 ``zarr.json`` or v2 ``.zattrs``; none if unreadable)."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            meta = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        found = meta.get(key, {}) if key else meta
        return found if isinstance(found, dict) else {}
    return {}


class _CellWindows:
    """Gene windows rasterised from a cell file read by the project's readers, loaded once per
    process (a worker reads the file itself; the table is not pickled)."""

    def __init__(self, path: Path, genes, spacing_um, volume: Shape, bin_shape: Shape) -> None:
        self.key = (str(path), None if genes is None else tuple(genes), tuple(spacing_um), volume)
        self.bin = bin_shape
        self.genes = _cell_source(*self.key).genes

    def window(self, bins: Box) -> np.ndarray:
        source = _cell_source(*self.key)
        begin = [b * n for b, n in zip(bins.begin, self.bin)]
        voxels = Box(begin, [s * n for s, n in zip(bins.shape, self.bin)])
        return rasterize(source.cells(voxels), bins, self.key[2], self.bin)


@lru_cache(maxsize=2)
def _cell_source(path: str, genes, spacing_um, volume: Shape) -> TableSource:
    from tera_pipeline.inputs.cells import load_cells

    table = load_cells(path, genes, volume=VolumeSpec(shape=volume, spacing_um=spacing_um))
    return TableSource(table, spacing_um)


class StorePatches:
    """Training and validation batches read from an image store; see the module's docstring.

    ``patch``, ``context`` and ``extra`` are the model's patch (voxels), gene-window context and
    sub-bin extra (bins): ``cfg.patch``, ``cfg.cond_context``, ``cfg.cond_extra``. Conditioning
    is ``conditioning`` (a raster array), else ``cells`` (with ``spacing_um``), else the store's
    own ``conditioning``. ``genes`` names the raster's genes (default: the store's panel or the
    array's ``genes`` attribute) or picks the cells' genes (default: all).
    """

    def __init__(
        self,
        images: Path,
        patch: Shape,
        context: Shape,
        extra: Shape,
        bin_shape: Shape = (1, 16, 16),
        *,
        seed: int = 1,
        conditioning: Path | None = None,
        cells: Path | None = None,
        spacing_um: tuple[float, float, float] | None = None,
        genes: Sequence[str] | None = None,
        validation: Box | None = None,
        channels: int | None = None,
    ) -> None:
        images = Path(images)
        is_store = (images / layout.IMAGE / "zarr.json").is_file()
        self.image_path = images / layout.IMAGE if is_store else images
        self.patch, self.context, self.extra = tuple(patch), tuple(context), tuple(extra)
        self.bin, self.seed = tuple(bin_shape), seed
        self.region = tuple(p + e * n for p, e, n in zip(self.patch, self.extra, self.bin))
        image = open_zarr(self.image_path)
        if image.rank != 4 or image.dtype != ts.uint8:
            raise InputError(
                f"{images}: need uint8 (c, z, y, x) images, got {image.dtype.name} {image.shape}"
            )
        if channels is not None and image.shape[0] != channels:
            raise InputError(f"{images}: {image.shape[0]} stains, the model takes {channels}")
        self.volume: Shape = tuple(image.shape[1:])
        if any(r > s for r, s in zip(self.region, self.volume)):
            raise InputError(
                f"{images}: volume {self.volume} is smaller than a patch and its gene window "
                f"{self.region} voxels"
            )
        self.cells: _CellWindows | None = None
        self.raster_path: Path | None = None
        if conditioning is None and cells is None and is_store:
            conditioning = images / layout.CONDITIONING
        if conditioning is not None:
            self.raster_path = Path(conditioning)
            self.genes = self._check_raster(open_zarr(self.raster_path), images, is_store, genes)
        elif cells is not None and spacing_um is not None:
            self.cells = _CellWindows(Path(cells), genes, spacing_um, self.volume, self.bin)
            self.genes = self.cells.genes
        else:
            raise InputError(f"{images}: give a gene-bin raster array, or cells and their spacing")
        self.validation = validation or held_out_slab(self.volume, self.region, self.bin)
        self._train_boxes, self._val_ranges = self._origin_sets()
        self._handles: tuple[ts.TensorStore, ts.TensorStore | None] | None = None
        self._val_cache: dict[int, Batch] = {}

    def _check_raster(self, raster, images: Path, is_store: bool, genes) -> tuple[str, ...]:
        bins = bin_box(Box((0, 0, 0), self.volume), self.bin).shape
        if raster.rank != 4 or tuple(raster.shape[1:]) != bins:
            raise InputError(
                f"{self.raster_path}: need gene bins (gene, {', '.join(map(str, bins))}) for "
                f"images {self.volume} in {self.bin} bins, got {raster.shape}"
            )
        attrs = _attributes(self.raster_path)
        if attrs.get("bin_voxels", list(self.bin)) != list(self.bin):
            raise InputError(f"{self.raster_path}: bins of {attrs['bin_voxels']}, not {self.bin}")
        if genes is None and is_store and self.raster_path == images / layout.CONDITIONING:
            genes = layout.job_genes(images)
        genes = tuple(genes if genes is not None else attrs.get("genes", ()))
        if len(genes) != raster.shape[0]:
            raise InputError(f"{self.raster_path}: {raster.shape[0]} genes, named {len(genes)}")
        return genes

    def _origin_sets(self) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
        """Training origins (bin indices) as disjoint boxes of inclusive ranges whose regions
        miss the validation box; validation origins as one box of ranges inside it."""
        v, r, b = self.validation, self.region, self.bin
        top = [(s - q) // n for s, q, n in zip(self.volume, r, b)]
        val = [(-(-lo // n), (hi - q) // n) for lo, hi, q, n in zip(v.begin, v.end, r, b)]
        if any(lo > hi for lo, hi in val) or not Box((0, 0, 0), self.volume).contains(v):
            raise InputError(
                f"validation box {v} must lie in the volume {self.volume} and hold a patch "
                f"region {r} on the {b} bin grid"
            )
        hit = [(max(0, (lo - q) // n + 1), min(t, -(-hi // n) - 1))
               for lo, hi, q, n, t in zip(v.begin, v.end, r, b, top)]  # fmt: skip
        boxes, rest = [], [(0, t) for t in top]
        if all(lo <= hi for lo, hi in hit):
            for axis, (lo, hi) in enumerate(hit):
                if lo > rest[axis][0]:
                    boxes.append([*rest[:axis], (rest[axis][0], lo - 1), *rest[axis + 1 :]])
                if hi < rest[axis][1]:
                    boxes.append([*rest[:axis], (hi + 1, rest[axis][1]), *rest[axis + 1 :]])
                rest[axis] = (lo, hi)
        else:
            boxes.append(rest)
        if not boxes:
            raise InputError(f"validation box {v} leaves no training patch in {self.volume}")
        return boxes, val

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": None, "_val_cache": {}}

    def _arrays(self) -> tuple[ts.TensorStore, ts.TensorStore | None]:
        if self._handles is None:
            raster = None if self.raster_path is None else open_zarr(self.raster_path)
            self._handles = (open_zarr(self.image_path), raster)
        return self._handles

    def plan(self, step: int, i: int) -> Draw:
        """Sample ``i`` of training step ``step``: a function of (seed, step, i) alone."""
        rng = np.random.default_rng(np.random.SeedSequence((self.seed, step, i)))
        sizes = [math.prod(hi - lo + 1 for lo, hi in box) for box in self._train_boxes]
        u = int(rng.integers(sum(sizes)))
        for box, size in zip(self._train_boxes, sizes):
            if u < size:
                index = np.unravel_index(u, [hi - lo + 1 for lo, hi in box])
                return self._finish(rng, [lo + int(j) for (lo, _), j in zip(box, index)])
            u -= size
        raise AssertionError("unreachable")

    def validation_plan(self, i: int) -> Draw:
        """Validation sample ``i``: fixed, inside the validation box."""
        seq = np.random.SeedSequence((self.seed, i), spawn_key=(VALIDATION_DOMAIN,))
        rng = np.random.default_rng(seq)
        return self._finish(rng, [int(rng.integers(lo, hi + 1)) for lo, hi in self._val_ranges])

    def _finish(self, rng: np.random.Generator, index: list[int]) -> Draw:
        """The rest of a draw, in ``sample_offset_batch``'s order."""
        k, flip_x, flip_z = int(rng.integers(4)), rng.random() < 0.5, rng.random() < 0.5
        offset = tuple(int(rng.integers(n)) if e else 0 for e, n in zip(self.extra, self.bin))
        origin = tuple(j * n for j, n in zip(index, self.bin))
        return Draw(origin, k, bool(flip_x), bool(flip_z), offset)

    def region_box(self, draw: Draw) -> Box:
        """The voxels a draw reads: its patch lies inside them."""
        return Box(draw.origin, self.region)

    def draw(self, step: int, indices: Sequence[int]) -> Batch:
        """Samples ``indices`` of step ``step``'s global batch."""
        return self.read([self.plan(step, i) for i in indices])

    def validation_batch(self, n: int = 32) -> Batch:
        """``n`` fixed validation samples (read once per process)."""
        if n not in self._val_cache:
            self._val_cache[n] = self.read([self.validation_plan(i) for i in range(n)])
        return self._val_cache[n]

    def read(self, draws: Sequence[Draw]) -> Batch:
        """Read the regions and windows of ``draws`` (concurrently), turned and cut."""
        image, raster = self._arrays()
        boxes = [self.region_box(d) for d in draws]
        reads = [image[(slice(None), *box.slices())].read() for box in boxes]
        windows = [self._window(raster, patch_bins(box, self.bin, self.context)) for box in boxes]
        xs, cs = [], []
        for d, pending, window in zip(draws, reads, windows):
            x, c = from_uint8(pending.result()), window()
            x, c = np.rot90(x, d.k, axes=(2, 3)), np.rot90(c, d.k, axes=(2, 3))
            if d.flip_x:
                x, c = x[:, :, :, ::-1], c[:, :, :, ::-1]
            if d.flip_z:
                x, c = x[:, ::-1], c[:, ::-1]
            xs.append(x[(slice(None), *(slice(o, o + p) for o, p in zip(d.offset, self.patch)))])
            cs.append(c)
        offsets = np.asarray([d.offset for d in draws], dtype=np.int64).reshape(-1, 3)
        return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(cs)), offsets

    def _window(self, raster: ts.TensorStore | None, bins: Box):
        """A callable giving the gene window over ``bins`` (zeros beyond the volume)."""
        if raster is None:
            assert self.cells is not None
            window = self.cells.window(bins)
            return lambda: window
        out = np.zeros((raster.shape[0], *bins.shape), dtype=np.float32)
        part = bins.intersect(Box((0, 0, 0), tuple(raster.shape[1:])))
        if part.empty:
            return lambda: out
        pending = raster[(slice(None), *part.slices())].read()

        def finish() -> np.ndarray:
            out[(slice(None), *part.slices(bins))] = pending.result()
            return out

        return finish
