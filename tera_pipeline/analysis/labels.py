"""Nuclei instance labels of the generated DAPI stain, block-wise: ``labels/nuclei``.

One algorithm, in block tasks over a labels grid (the job's blocks, or any ``block``):

1. **Threshold.** Each block returns the 256-bin histogram of its DAPI core; their sum is the
   volume's histogram whatever the blocks, and its Otsu threshold ``t`` is the cut.
2. **Foreground.** The DAPI smoothed by a [1, 2, 1] binomial along each fine axis (spacing under
   twice the finest: y and x at 4 x 1 x 1 µm), in integers; foreground is a mean above ``t``.
   Beyond the volume is background.
3. **Seeds.** ``D``, the distance (µm) from a foreground voxel to the background, capped at
   ``RADIUS_UM`` and kept in 1/16 µm. A seed is a foreground voxel with ``D`` at least
   ``MIN_SEED_UM`` that is the largest within ``SEED_UM`` per axis (ties: the first voxel in
   C order), so one per nucleus, touching ones included.
4. **Nuclei.** Each foreground voxel goes to the seed ``s`` minimising ``|v - s| - D(s)`` (µm;
   ties: the seed first in C order) among the seeds within ``D(s) + MARGIN_UM`` of it: a
   nucleus is the ball its seed's distance measures, grown by the margin, split from its
   neighbours where their balls meet. Foreground farther than that from every seed (tissue, a
   bright bridge) is left unlabelled and counted as ``unassigned_voxels``. A nucleus is
   numbered 1 + the volume's C-order index of its seed, as uint64 (a teravoxel volume has more
   voxels than uint32 holds). The block writes its core only.
5. **Levels** 1, 2, ...: the mode of windows of the level above (``label_image``).

Why any blocks give the same bits: every step looks a bounded distance away. A core voxel's label
depends on the seeds within ``RADIUS_UM + MARGIN_UM`` of it, a seed on ``D`` within ``SEED_UM``,
``D`` (capped) on the foreground within ``RADIUS_UM``, the foreground on the smoothing's one
voxel; the halo (``Plan.halo``) is the sum, per axis in voxels, so a block computes each of
them as a whole-volume run does. Distances are products of whole voxel offsets and the spacing,
summed in one order, so equal inputs give equal bits; ties are broken by the global index.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from tera_pipeline.analysis import label_image
from tera_pipeline.analysis.cells import histogram_otsu
from tera_pipeline.core.errors import AnalysisError
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import integrity
from tera_pipeline.runtime import tasks
from tera_pipeline.storage import layout, store

STAIN = "DAPI"
RADIUS_UM = 10.0
"""The largest nucleus radius measured (the distance transform's cap)."""
MARGIN_UM = 5.0
"""How far beyond its measured radius a nucleus reaches."""
SEED_UM = 2.0
"""One seed per this neighbourhood (per axis, at least one voxel)."""
MIN_SEED_UM = 2.0
"""Foreground thinner than this (specks, threads) seeds nothing."""
QUANTUM = 16
"""Distances are kept in 1/16 µm, whole numbers: ties are exact."""
INDEX_BITS = 42
"""A seed's key is its distance, then its global index: volumes up to 2^42 voxels."""
Triple = tuple[int, int, int]


@dataclass
class LabelStats(tasks.BlockStats):
    """A block's statistics, plus what the labelling sums over blocks."""

    histogram: np.ndarray | None = None
    nuclei: int = 0
    """Nuclei whose seed (their id) lies in this core: summed, each is counted once."""
    unassigned_voxels: int = 0
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What every block task of one labelling needs: store, volume, labels grid, threshold."""

    root: str
    shape: Triple
    spacing: tuple[float, float, float]
    block: Triple
    channel: int
    threshold: int = -1

    def voxels(self, um: float) -> np.ndarray:
        """Whole voxels per axis covering ``um`` µm."""
        return np.ceil(um / np.asarray(self.spacing)).astype(int)

    @property
    def footprint(self) -> Triple:
        return tuple(2 * max(1, round(SEED_UM / s)) + 1 for s in self.spacing)  # type: ignore[return-value]

    @property
    def smoothed(self) -> tuple[bool, ...]:
        finest = min(self.spacing)
        return tuple(s < 2 * finest and n > 1 for s, n in zip(self.spacing, self.shape))

    @property
    def halo(self) -> Triple:
        """Seeds' reach + the seed footprint + the distance cap + the smoothing, per axis."""
        seed = np.asarray(self.footprint) // 2
        grow = self.voxels(RADIUS_UM + MARGIN_UM) + seed + self.voxels(RADIUS_UM)
        return tuple(int(g) + s for g, s in zip(grow, self.smoothed))  # type: ignore[return-value]

    def grid(self) -> Triple:
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def core(self, index: Triple) -> Box:
        begin = [i * b for i, b in zip(index, self.block)]
        end = [min(b + s, n) for b, s, n in zip(begin, self.block, self.shape)]
        return Box.from_bounds(begin, end)


def check(root: Path, block: Triple | None = None) -> Plan:
    """Everything the labelling needs of a store, checked before anything is written."""
    root = Path(root)
    job = layout.job_of(root)
    if not (root / layout.IMAGE / "zarr.json").is_file():
        raise AnalysisError(f"{root} has no image array: generate the volume first")
    if store.group_attrs(root)["tera_pipeline"].get("status") != "complete":
        raise AnalysisError(f"{root} is not a finished generation (its status is not complete)")
    if STAIN not in job.volume.stains:
        raise AnalysisError(f"{root} has no {STAIN} stain to find nuclei in")
    if math.prod(job.volume.shape) >= 1 << INDEX_BITS:
        raise AnalysisError(f"{root}: nuclei labels number at most 2^{INDEX_BITS} voxels")
    block = tuple(block or job.storage.block)  # type: ignore[assignment]
    if len(block) != 3 or any(int(b) < 1 for b in block):
        raise AnalysisError(f"the labels block must be three positive integers, got {block}")
    label_image.check_ours(root)
    integrity.require_intact(job, conditioning=False)  # a lost shard would read as zeros
    shape = tuple(job.volume.shape)
    return Plan(
        str(root),
        shape,  # type: ignore[arg-type]
        tuple(job.volume.spacing_um),
        tuple(min(int(b), n) for b, n in zip(block, shape)),  # type: ignore[arg-type]
        job.volume.stains.index(STAIN),
    )


# -- the algorithm -------------------------------------------------------------------------------
def foreground(dapi: np.ndarray, read: Box, plan: Plan) -> tuple[np.ndarray, Box]:
    """Voxels whose smoothed DAPI mean is above the threshold (none beyond the volume), on the
    box where the smoothing is exact: ``read`` shrunk by one voxel on smoothed axes."""
    total, weight = dapi.astype(np.int32), 1
    for axis, on in enumerate(plan.smoothed):
        if on:
            cut = [[slice(None)] * 3 for _ in range(3)]
            for k, part in enumerate((slice(0, -2), slice(1, -1), slice(2, None))):
                cut[k][axis] = part
            total = total[tuple(cut[0])] + 2 * total[tuple(cut[1])] + total[tuple(cut[2])]
            weight *= 4
    shrink = [-int(s) for s in plan.smoothed]
    valid = read.grow(shrink, shrink)
    inside = np.zeros(valid.shape, bool)
    inside[valid.intersect(Box((0, 0, 0), plan.shape)).slices(valid)] = True
    return (total > plan.threshold * weight) & inside, valid


def seeds(fg: np.ndarray, valid: Box, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The seeds (global z, y, x, in C order) and their distances to the background (µm)."""
    if fg.all():  # no background within reach: every distance is the cap
        dist = np.full(fg.shape, RADIUS_UM)
    else:
        dist = ndimage.distance_transform_edt(fg, sampling=plan.spacing)
    quanta = np.rint(np.minimum(dist, RADIUS_UM) * QUANTUM).astype(np.int64)
    z, y, x = (np.arange(b, e, dtype=np.int64) for b, e in zip(valid.begin, valid.end))
    index = (z[:, None, None] * plan.shape[1] + y[None, :, None]) * plan.shape[2] + x
    key = np.where(fg, (quanta << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - index), 0)
    top = fg & (quanta >= MIN_SEED_UM * QUANTUM)
    top &= key == ndimage.maximum_filter(key, size=plan.footprint)
    where = np.argwhere(top)  # C order: ascending global index
    return where + np.asarray(valid.begin), quanta[tuple(where.T)] / QUANTUM


def assign(fg: np.ndarray, core: Box, at: np.ndarray, radius: np.ndarray, plan: Plan):
    """Each foreground voxel of the core (``fg`` over it) to its seed (``at``, measured
    ``radius``): the labels (uint64), and the seeds' ids."""
    sp = np.asarray(plan.spacing)
    cost = np.full(core.shape, np.inf)
    out = np.zeros(core.shape, np.uint64)
    ids = np.ravel_multi_index(tuple(at.T), plan.shape).astype(np.uint64) + np.uint64(1)
    for s, r, i in zip(at, radius, ids):  # C order: a tie goes to the earlier seed
        reach = r + MARGIN_UM
        half = np.floor(reach / sp).astype(int)
        ball = Box.from_bounds(s - half, s + half + 1).intersect(core)
        if ball.empty:
            continue
        dz, dy, dx = ((np.arange(b, e) - c) * p for b, e, c, p in zip(ball.begin, ball.end, s, sp))
        d = np.sqrt(dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2)
        where = ball.slices(core)
        better = fg[where] & (d <= reach) & (d - r < cost[where])
        cost[where] = np.where(better, d - r, cost[where])
        out[where] = np.where(better, i, out[where])
    return out, ids


def label_core(dapi: np.ndarray, read: Box, core: Box, plan: Plan) -> tuple[np.ndarray, LabelStats]:
    """The labels (uint64) of ``core`` from the DAPI of ``read`` (the core grown by the halo)."""
    fg, valid = foreground(dapi, read, plan)
    at, radius = seeds(fg, valid, plan)
    near = core.grow(plan.voxels(RADIUS_UM + MARGIN_UM), plan.voxels(RADIUS_UM + MARGIN_UM))
    close = np.all((at >= near.begin) & (at < near.end), axis=1)
    core_fg = fg[core.slices(valid)]
    out, ids = assign(core_fg, core, at[close], radius[close], plan)
    mine = np.all((at[close] >= core.begin) & (at[close] < core.end), axis=1)
    local = at[close][mine] - np.asarray(core.begin)
    owned = ids[mine][out[tuple(local.T)] == ids[mine]]
    stats = LabelStats(nuclei=len(owned), ids=tuple(int(i) for i in owned))
    stats.unassigned_voxels = int((core_fg & (out == 0)).sum())
    return out, stats


# -- block tasks ---------------------------------------------------------------------------------
def _dapi(plan: Plan):
    return store.open_array(Path(plan.root), layout.IMAGE)[plan.channel]


def histogram_block(plan: Plan, index: Triple) -> LabelStats:
    """The 256-bin histogram of one block's DAPI core."""
    t0 = time.perf_counter()
    data = store.read_box(_dapi(plan), plan.core(index))
    hist = np.bincount(data.ravel(), minlength=256).astype(np.int64)
    elapsed = time.perf_counter() - t0
    return LabelStats(read_s=elapsed, total_s=elapsed, histogram=hist)


def label_block(plan: Plan, index: Triple) -> LabelStats:
    """Label one block's core from its core and halo; write the core (one whole shard)."""
    t0 = time.perf_counter()
    core = plan.core(index)
    read = core.grow(plan.halo, plan.halo)
    dapi = store.read_box(_dapi(plan), read)
    tm = time.perf_counter()
    out, stats = label_core(dapi, read, core, plan)
    tw = time.perf_counter()
    store.write_box(label_image.open_level(plan.root, f"{label_image.GROUP}/0"), core, out)
    end = time.perf_counter()
    stats.ids = stats.ids if len(stats.ids) <= label_image.MAX_COLOURED else ()
    stats.items, stats.read_s, stats.model_s = stats.nuclei, tm - t0, tw - tm
    stats.write_s, stats.total_s = end - tw, end - t0
    return stats


# -- the run -------------------------------------------------------------------------------------
def _blocks(plan: Plan, name: str, fn, on_done) -> tasks.BlockTask:
    total = math.prod(plan.grid())
    return tasks.BlockTask(name, fn, (plan,), np.ndindex(*plan.grid()), total, on_done)


def threshold(root: Path, client, plan: Plan, progress=None) -> int:
    """Otsu's threshold of the volume's DAPI histogram, summed over the blocks' histograms."""
    histogram = np.zeros(256, np.int64)

    def add(finished: list[tuple[Triple, LabelStats]]) -> None:
        for _, stats in finished:
            np.add(histogram, stats.histogram, out=histogram)

    job = layout.job_of(root)
    tasks.run_task(client, job, _blocks(plan, "labels threshold", histogram_block, add), progress)
    return int(histogram_otsu(histogram))


def run(root: Path, client, block: Triple | None = None, progress=None) -> dict:
    """Label the nuclei of a store into ``labels/nuclei``, replacing only the label image this
    analysis wrote; returns the figures of the run."""
    root, t0 = Path(root), time.perf_counter()
    plan, job = check(root, block), layout.job_of(root)
    label_image.remove_ours(root)
    plan = dataclasses.replace(plan, threshold=threshold(root, client, plan, progress))
    levels = label_image.plan_levels(job, plan.block)
    figures = {
        "threshold": plan.threshold,
        "block": list(plan.block),
        "halo": list(plan.halo),
        "radius_um": RADIUS_UM,
        "margin_um": MARGIN_UM,
        "levels": [list(lvl.shape) for lvl in levels],
    }
    label_image.create_levels(root, job, levels, {"status": "writing", **figures})
    found = LabelStats()

    def add(finished: list[tuple[Triple, LabelStats]]) -> None:
        for _, s in finished:
            found.nuclei += s.nuclei
            found.unassigned_voxels += s.unassigned_voxels
            found.ids += s.ids if found.nuclei <= label_image.MAX_COLOURED else ()

    tasks.run_task(client, job, _blocks(plan, "labels", label_block, add), progress)
    label_image.build_levels(root, client, job, levels, progress)
    figures |= {
        "nuclei": found.nuclei,
        "unassigned_voxels": found.unassigned_voxels,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    ids = list(found.ids) if found.nuclei <= label_image.MAX_COLOURED else None
    ome = label_image.ome_metadata(job, levels, ids)
    attrs = {"ome": ome, label_image.OURS: {"status": "complete", **figures}}
    label_image.write_group(root / label_image.GROUP, attrs)
    label_image.list_nuclei(root, listed=True)
    store.consolidate(root)
    return {"store": str(root), "labels": label_image.GROUP, **figures}
