"""The OME-Zarr label image ``labels/nuclei`` in a store: its levels, metadata and ownership.

``labels/`` is a zarr group whose ``ome.labels`` lists the label images; ``labels/nuclei`` holds
the multiscale levels ``0``, ``1``, ... (uint64, z, y, x, sharded like the image) with the image
pyramid's shapes and voxel sizes, and its ``ome`` attributes carry the image's multiscales
without the channel axis and ``image-label`` (colours, source ``../../``: the root image).
Level k is the most frequent label of each window of level k - 1 (the smaller on a tie): a
mode, never a mean, so every level holds only real ids. A label image is replaced only when its
attributes show this analysis wrote it; other label images in ``labels/`` are kept and listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import pyramid
from tera_pipeline.runtime import tasks
from tera_pipeline.storage import store
from tera_pipeline.storage.atomic import write_json
from tera_pipeline.storage.ownership import OwnershipError

LABELS, NUCLEI = "labels", "nuclei"
GROUP = f"{LABELS}/{NUCLEI}"
OURS = "tera_pipeline"
"""The attribute that marks a label image as written by this project."""
MAX_COLOURED = 1024
"""Up to this many nuclei, ``image-label`` lists a colour per label; beyond, the viewer's own."""
EMPTY = np.iinfo(np.uint64).max
"""Padding of partial windows in the mode (no label reaches it)."""
Triple = tuple[int, int, int]


def mode_downsample(labels: np.ndarray, factor: Triple) -> np.ndarray:
    """The most frequent label of each ``factor`` window (the smaller on a tie); partial windows
    at the far edge count the voxels they have."""
    out = tuple(math.ceil(n / f) for n, f in zip(labels.shape, factor))
    padded = np.full(tuple(o * f for o, f in zip(out, factor)), EMPTY, np.uint64)
    padded[tuple(slice(0, n) for n in labels.shape)] = labels
    split = padded.reshape(out[0], factor[0], out[1], factor[1], out[2], factor[2])
    windows = np.sort(split.transpose(0, 2, 4, 1, 3, 5).reshape(*out, -1), axis=-1)
    counts = (windows[..., :, None] == windows[..., None, :]).sum(axis=-1)
    counts[windows == EMPTY] = -1
    pick = np.argmax(counts, axis=-1)[..., None]  # the first maximum: the smallest value
    return np.take_along_axis(windows, pick, axis=-1)[..., 0]


def open_level(root: Path | str, path: str):
    """A label level opened afresh: every run recreates the levels, perhaps with other shards,
    so no process may write through a handle it cached in an earlier run."""
    store.forget_handles()
    return store.open_array(Path(root), path)


def mode_block(root: str, source: str, level: pyramid.Level, index: Triple) -> tasks.BlockStats:
    """One block of a coarser level: the mode of the matching box of the level above."""
    t0 = time.perf_counter()
    begin = [i * b for i, b in zip(index, level.block)]
    end = [min(b + s, n) for b, s, n in zip(begin, level.block, level.shape)]
    src, target = open_level(root, source), store.open_array(Path(root), level.path)
    box = Box.from_bounds(
        [b * f for b, f in zip(begin, level.factor)],
        [min(e * f, n) for e, f, n in zip(end, level.factor, src.shape)],
    )
    data = mode_downsample(store.read_box(src, box), level.factor)
    store.write_box(target, Box.from_bounds(begin, end), data)
    return tasks.BlockStats(total_s=time.perf_counter() - t0)


def plan_levels(job: JobConfig, block: Triple) -> list[pyramid.Level]:
    """The image pyramid's levels (shapes, voxel sizes, factors) on the labels' block grid."""
    chunk = tuple(math.gcd(b, c) for b, c in zip(block, job.storage.chunk_shape))
    storage = job.storage.model_copy(update={"block": block, "shard": None, "chunk": chunk})
    levels = pyramid.plan_levels(job.model_copy(update={"storage": storage}))
    return [dataclasses.replace(lvl, path=f"{GROUP}/{lvl.index}") for lvl in levels]


def create_levels(root: Path, job: JobConfig, levels: list[pyramid.Level], attrs: dict) -> None:
    """The label image's group (with ``attrs``, our mark) and its empty level arrays."""
    write_group(root / GROUP, {OURS: attrs})
    for lvl in levels:
        spec = store.ArraySpec(
            lvl.path,
            lvl.shape,
            "uint64",
            ("z", "y", "x"),
            lvl.block,
            lvl.chunk,
            compression_level=job.storage.compression_level,
        )
        store.create_array(root, spec)


def build_levels(root: Path, client, job: JobConfig, levels, progress=None) -> list:
    """Levels 1, 2, ... from level 0, block by block on the Dask client."""
    reports = []
    for prev, lvl in zip(levels, levels[1:]):
        task = tasks.BlockTask(
            f"labels level {lvl.index}/{len(levels) - 1}",
            mode_block,
            (str(root), prev.path, lvl),
            lvl.blocks(),
            math.prod(lvl.grid()),
        )
        reports.append(tasks.run_task(client, job, task, progress))
    return reports


def label_colours(ids) -> np.ndarray:
    """RGBA (uint8) of each label id, the same wherever it is drawn; 0 is transparent."""
    ids = np.atleast_1d(np.asarray(ids, np.uint64))
    with np.errstate(over="ignore"):
        h = ids * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    rgb = [64 + ((h >> np.uint64(s)) & np.uint64(255)).astype(np.int64) * 191 // 255
           for s in (40, 48, 56)]  # fmt: skip
    return np.stack([*rgb, np.where(ids == 0, 0, 255)], axis=-1).astype(np.uint8)


def ome_metadata(job: JobConfig, levels: list[pyramid.Level], ids: list[int] | None) -> dict:
    """The label image's OME-NGFF 0.5 ``ome``: the image's multiscales without the channel axis,
    and ``image-label`` (background transparent, a colour per label when there are few)."""
    image = pyramid.ome_metadata(job, levels)["multiscales"][0]
    datasets = [
        {
            "path": str(lvl.index),
            "coordinateTransformations": [
                {"type": t["type"], t["type"]: t[t["type"]][1:]}
                for t in dataset["coordinateTransformations"]
            ],
        }
        for lvl, dataset in zip(levels, image["datasets"])
    ]
    shown = sorted(ids or [])
    colours = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    if shown:
        colours += [{"label-value": i, "rgba": c.tolist()}
                    for i, c in zip(shown, label_colours(shown))]  # fmt: skip
    method = {
        "description": "most frequent label of each window (the smaller on a tie)",
        "method": "tera_pipeline.analysis.label_image.mode_downsample",
    }
    multiscale = {"name": NUCLEI, "axes": image["axes"][1:], "datasets": datasets,
                  "type": "mode", "metadata": method}  # fmt: skip
    return {
        "version": pyramid.OME_VERSION,
        "multiscales": [multiscale],
        "image-label": {"colors": colours, "source": {"image": "../../"}},
    }


# -- the group, and what is ours -----------------------------------------------------------------
def node_attrs(node: Path) -> dict | None:
    """A zarr node's attributes (None when it is not one)."""
    try:
        meta = json.loads((node / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}) if isinstance(meta, dict) else None


def check_ours(root: Path) -> None:
    """Refuse a ``labels`` that is not a zarr group, or a ``labels/nuclei`` we did not write."""
    group, node = root / LABELS, root / GROUP
    if group.exists() and (group.is_symlink() or node_attrs(group) is None):
        raise OwnershipError(f"refusing to write into {group}: it is not a zarr group")
    if node.exists() or node.is_symlink():
        attrs = node_attrs(node)
        if node.is_symlink() or not attrs or OURS not in attrs:
            raise OwnershipError(
                f"refusing to replace {node}: tera-pipeline did not write it; move it away first"
            )


def write_group(node: Path, attrs: dict) -> None:
    """Create or replace a zarr v3 group's metadata, atomically."""
    node.mkdir(parents=True, exist_ok=True)
    write_json(node / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def list_nuclei(root: Path, listed: bool) -> None:
    """Add ``nuclei`` to (or take it from) the ``labels`` group's list, creating the group; the
    other label images listed stay."""
    attrs = node_attrs(root / LABELS) or {}
    ome = attrs.setdefault("ome", {"version": pyramid.OME_VERSION})
    ome["labels"] = [n for n in ome.get("labels", []) if n != NUCLEI] + [NUCLEI] * listed
    write_group(root / LABELS, attrs)


def remove_ours(root: Path) -> None:
    """Unlist, then delete, the label image this analysis wrote (``check_ours`` first)."""
    check_ours(root)
    list_nuclei(root, listed=False)  # readers stop seeing it before it goes
    if (root / GROUP).exists():
        store.remove(root, GROUP)


def nuclei_level(root: Path) -> str | None:
    """The full-resolution array of a store's nuclei labels, when it has finished ones."""
    ome = (node_attrs(Path(root) / LABELS) or {}).get("ome", {})
    return f"{GROUP}/0" if NUCLEI in ome.get("labels", []) else None
