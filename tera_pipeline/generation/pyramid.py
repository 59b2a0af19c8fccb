"""Viewer-ready output: a downsampled pyramid of the image and OME-NGFF 0.5 metadata.

After the last step, level k (k = 1, 2, ...) is the mean of 2-voxel windows of level k - 1 along
each axis finer than twice the finest spacing (so anisotropic volumes first become isotropic),
until y and x are at most ``MIN_SIZE`` voxels. Levels are written block by block as Dask tasks
(each reads at most 8 blocks of the level above and writes one whole shard), so the pyramid is
built out of core like the image. Level k lives in the group ``pyramid/<k>`` as ``image``
(c, z, y, x) with its own µm coordinates, so ``xr.open_zarr(store, group="pyramid/1")`` opens
it. The store's root group carries the OME-NGFF 0.5 ``multiscales`` (axes c, z, y, x in
micrometer; per level a scale and a translation to voxel centres) over ``image``,
``pyramid/1/image``, ...: napari (napari-ome-zarr), neuroglancer and other OME-Zarr readers open
the root. A resume rebuilds the pyramid from the finished image: the new levels are written under
``_pyramid_new`` and swapped in only once complete, so a pyramid is never left half-written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box
from tera_pipeline.runtime import tasks
from tera_pipeline.storage import layout, store
from tera_pipeline.storage.layout import IMAGE, PYRAMID

MIN_SIZE = 64
"""Levels are added until y and x are both at most this many voxels."""
OME_VERSION = "0.5"
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Level:
    """One pyramid level: where it lives, its shape, voxel size and shard (= block) shape."""

    index: int
    path: str
    shape: Triple
    spacing_um: tuple[float, float, float]
    factor: Triple
    """Downsampling factor from the previous level, per axis."""
    block: Triple
    chunk: Triple

    @property
    def group(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    def grid(self) -> Triple:
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def blocks(self) -> Iterator[Triple]:
        yield from np.ndindex(*self.grid())


def plan_levels(config: JobConfig, min_size: int = MIN_SIZE) -> list[Level]:
    """Level 0 (the image) and the downsampled levels for the job's volume."""
    st = config.storage
    shape, spacing = tuple(config.volume.shape), tuple(config.volume.spacing_um)
    levels = [Level(0, IMAGE, shape, spacing, (1, 1, 1), st.shard_shape, st.chunk_shape)]
    while max(shape[1:]) > min_size:
        finest = min(sp for sp, n in zip(spacing, shape) if n > 1)
        factor = tuple(2 if n > 1 and sp < 2 * finest else 1 for sp, n in zip(spacing, shape))
        shape = tuple(math.ceil(n / f) for n, f in zip(shape, factor))
        spacing = tuple(sp * f for sp, f in zip(spacing, factor))
        block = tuple(min(b, n) for b, n in zip(st.shard_shape, shape))
        chunk = tuple(math.gcd(b, c) for b, c in zip(block, st.chunk_shape))
        k = len(levels)
        levels.append(Level(k, f"{PYRAMID}/{k}/{IMAGE}", shape, spacing, factor, block, chunk))  # type: ignore[arg-type]
    return levels


def downsample(data: np.ndarray, factor: Triple) -> np.ndarray:
    """Mean over ``factor`` windows of the last three axes (partial windows at the far edge
    average the voxels they have), rounded back to uint8."""
    lead, spatial = data.shape[:-3], data.shape[-3:]
    out = tuple(math.ceil(n / f) for n, f in zip(spatial, factor))
    padded = np.zeros((*lead, *(o * f for o, f in zip(out, factor))), np.float32)
    weight = np.zeros(padded.shape[-3:], np.float32)
    inner = tuple(slice(0, n) for n in spatial)
    padded[(Ellipsis, *inner)] = data
    weight[inner] = 1.0
    shape = (*lead, out[0], factor[0], out[1], factor[1], out[2], factor[2])
    axes = tuple(len(lead) + a for a in (1, 3, 5))
    total = padded.reshape(shape).sum(axis=axes)
    count = weight.reshape(shape[len(lead) :]).sum(axis=(1, 3, 5))
    return np.rint(total / count).astype(np.uint8)


def downsample_block(root: str, source: str, level: Level, index: Triple):
    """One block of ``level``: read the matching box of the level above, average, write one
    whole shard."""
    from tera_pipeline.runtime.tasks import BlockStats

    t0 = time.perf_counter()
    begin = tuple(i * b for i, b in zip(index, level.block))
    out = Box.from_bounds(
        begin, [min(b + s, n) for b, s, n in zip(begin, level.block, level.shape)]
    )
    src = store.open_array(Path(root), source)
    src_shape = tuple(src.shape[-3:])
    box = Box.from_bounds(
        [b * f for b, f in zip(out.begin, level.factor)],
        [min(e * f, n) for e, f, n in zip(out.end, level.factor, src_shape)],
    )
    tr = time.perf_counter()
    data = store.read_box(src, box)
    read_s = time.perf_counter() - tr
    tw = time.perf_counter()
    store.write_box(store.open_array(Path(root), level.path), out, downsample(data, level.factor))
    done = time.perf_counter()
    return BlockStats(read_s=read_s, write_s=done - tw, total_s=done - t0)


def coordinates(config: JobConfig, level: Level) -> dict:
    """Voxel-centre coordinates in µm of a level, and the stain names."""
    stains = {"c": (np.asarray(list(config.volume.stains), dtype=object), {})}
    return stains | layout.grid_coordinates(
        config.volume, "", level.shape, (1, 1, 1), spacing_um=level.spacing_um
    )


def ome_metadata(config: JobConfig, levels: list[Level]) -> dict:
    """The OME-NGFF 0.5 ``ome`` attributes of the root group (multiscales and channels)."""
    origin = config.volume.origin_um
    datasets = [
        {
            "path": lvl.path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, *map(float, lvl.spacing_um)]},
                {
                    "type": "translation",
                    "translation": [0.0, *(o + sp / 2 for o, sp in zip(origin, lvl.spacing_um))],
                },
            ],
        }
        for lvl in levels
    ]
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    colors = ("0000FF", "00FF00", "FF0000", "FFFFFF")
    channels = [
        {
            "label": name,
            "color": colors[i % len(colors)],
            "active": True,
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
        }
        for i, name in enumerate(config.volume.stains)
    ]
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": "image",
                "axes": axes,
                "datasets": datasets,
                "type": "mean",
                "metadata": {
                    "description": "mean over 2-voxel windows per downsampled axis",
                    "method": "tera_pipeline.generation.pyramid.downsample",
                    "factors": [list(lvl.factor) for lvl in levels[1:]],
                },
            }
        ],
        "omero": {"channels": channels, "rdefs": {"model": "color"}},
    }


NEW, OLD = "_pyramid_new", "_pyramid_old"


def _swap_in(root: Path) -> None:
    """Replace ``pyramid`` with the complete ``_pyramid_new`` (two renames; the old levels go
    only after the new ones are in place)."""
    if (root / PYRAMID).exists():
        (root / PYRAMID).rename(root / OLD)
    (root / NEW).rename(root / PYRAMID)
    store.remove(root, OLD)


def build(config: JobConfig, client, progress=None) -> list:
    """Write every downsampled level block by block on the Dask client, then the OME-NGFF
    metadata; returns one PhaseReport per level."""

    root = Path(config.out)
    levels = plan_levels(config)
    for leftover in (NEW, OLD):  # a build cut short: its partial levels go
        store.remove(root, leftover)
    store.create_group(root / NEW, {}, {})
    c = len(config.volume.stains)
    reports = []
    for prev, lvl in zip(levels, levels[1:]):
        group = root / NEW / str(lvl.index)
        store.create_group(group, coordinates(config, lvl), {"level": lvl.index})
        spec = store.ArraySpec(
            IMAGE,
            (c, *lvl.shape),
            "uint8",
            ("c", "z", "y", "x"),
            (c, *lvl.block),
            (c, *lvl.chunk),
            attributes={"long_name": f"generated stains, pyramid level {lvl.index}"},
            compression_level=config.storage.compression_level,
        )
        store.create_array(group, spec)
        total = int(np.prod(lvl.grid()))
        source = prev.path if prev.index == 0 else f"{NEW}/{prev.index}/{IMAGE}"
        target = Level(lvl.index, f"{NEW}/{lvl.index}/{IMAGE}", *dataclasses.astuple(lvl)[2:])
        reports.append(
            tasks.run_task(
                client,
                config,
                tasks.BlockTask(
                    f"pyramid {lvl.index}/{len(levels) - 1}",
                    downsample_block,
                    (str(root), source, target),
                    lvl.blocks(),
                    total,
                ),
                progress,
            )
        )
    _swap_in(root)
    attrs = store.group_attrs(root)
    tera = attrs.get("tera_pipeline", {})
    tera["pyramid"] = {
        "levels": [{"path": lvl.path, "shape": list(lvl.shape)} for lvl in levels],
        "wall_s": round(sum(r.wall_s for r in reports), 3),
    }
    store.update_attrs(root, {"ome": ome_metadata(config, levels), "tera_pipeline": tera})
    return reports
