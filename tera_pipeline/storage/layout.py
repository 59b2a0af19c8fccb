"""What a job's store holds and where: array names, their specs on the block grid, the
coordinates in µm, the job and panel recorded in it, and the [-1, 1] to uint8 mapping."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.storage import store

IMAGE = "image"
CONDITIONING = "conditioning"
CELL_COUNT = "cell_count"
STATES = (f"{store.SCRATCH}/state0", f"{store.SCRATCH}/state1")


def array_specs(config: JobConfig, genes: Sequence[str]) -> list[store.ArraySpec]:
    """Every array of a generation job, on one grid: shards of one block each."""
    vol, st, b = config.volume.shape, config.storage, config.conditioning.bin
    c = len(config.volume.stains)
    bins = bin_box(Box((0, 0, 0), vol), b).shape
    bin_shard = tuple(s // n for s, n in zip(st.shard_shape, b))
    bin_chunk = bin_shard  # gene rasters are small: one inner chunk per shard
    lvl = st.compression_level
    specs = [
        store.ArraySpec(
            IMAGE,
            (c, *vol),
            "uint8",
            ("c", "z", "y", "x"),
            (c, *st.shard_shape),
            (c, *st.chunk_shape),
            attributes={"long_name": "generated stains"},
            compression_level=lvl,
        ),
        store.ArraySpec(
            CONDITIONING,
            (len(genes), *bins),
            "float32",
            ("gene", "zbin", "ybin", "xbin"),
            (len(genes), *bin_shard),
            (len(genes), *bin_chunk),
            attributes={"long_name": "transcript counts per bin", "bin_voxels": list(b)},
            compression_level=lvl,
        ),
        store.ArraySpec(
            CELL_COUNT,
            bins,
            "float32",
            ("zbin", "ybin", "xbin"),
            bin_shard,
            bin_chunk,
            attributes={"long_name": "cell centroids per bin"},
            compression_level=lvl,
        ),
    ]
    for name in STATES:
        specs.append(
            store.ArraySpec(
                name,
                (c, *vol),
                st.scratch_dtype,
                ("c", "z", "y", "x"),
                (c, *st.shard_shape),
                (c, *st.chunk_shape),
                compression_level=1,
            )
        )
    return specs


def coordinates(config: JobConfig, genes: Sequence[str]) -> dict:
    """1-D coordinates in µm (voxel and bin centres), stain and gene names."""
    vol, sp, org, b = (
        config.volume.shape,
        config.volume.spacing_um,
        config.volume.origin_um,
        config.conditioning.bin,
    )
    um = {"units": "micrometer"}
    names = {"c": config.volume.stains, "gene": genes}
    coords = {k: (np.asarray(list(v), dtype=object), {}) for k, v in names.items()}
    for axis, name in enumerate("zyx"):
        n = vol[axis]
        coords[name] = (org[axis] + (np.arange(n) + 0.5) * sp[axis], um)
        nb = -(-n // b[axis])
        coords[f"{name}bin"] = (org[axis] + (np.arange(nb) + 0.5) * b[axis] * sp[axis], um)
    return coords


def bytes_needed(config: JobConfig, genes: Sequence[str]) -> int:
    """An upper bound of the bytes a job writes: every array uncompressed (the two scratch
    states are noise, which does not compress), plus the pyramid (under 1/7 of the image)."""
    total = 0
    for spec in array_specs(config, genes):
        size = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        total += size + (size // 7 if spec.name == IMAGE else 0)
    return total


@lru_cache(maxsize=8)
def job_genes(root: Path) -> tuple[str, ...]:
    """The gene panel of a job's store (read once per process)."""
    return tuple(store.group_attrs(root)["tera_pipeline"]["genes"])


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map the model's [-1, 1] range to uint8 intensities."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def job_of(root: Path) -> JobConfig:
    """The job that wrote the store at ``root``, with ``out`` pointing at it."""
    attrs = store.group_attrs(root)
    if "tera_pipeline" not in attrs:
        raise store.StoreError(f"{root} is not a tera-pipeline store (no tera_pipeline attributes)")
    try:
        job = JobConfig.model_validate(attrs["tera_pipeline"]["config"])
    except ValueError as err:  # pydantic's ValidationError
        raise store.StoreError(
            f"{root}: the job recorded in the store is not valid: {err}"
        ) from None
    return job.model_copy(update={"out": Path(root)})  # the store may have moved or been copied
