"""What a job's store holds and where: array names, their specs on the block grid, the
coordinates in µm, and the job and panel recorded in it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from tera_pipeline.core import frames
from tera_pipeline.core.config import JobConfig, VolumeSpec
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.storage import store

IMAGE = "image"
PYRAMID = "pyramid"
"""The group of the image's coarser levels (``pyramid/<k>/image``)."""
CONDITIONING = "conditioning"
CELL_COUNT = "cell_count"
STATES = (f"{store.SCRATCH}/state0", f"{store.SCRATCH}/state1")
"""The sampling state, ping-pong: phase p (after step p - 1) writes ``STATES[p % 2]``."""
PREVIOUS_X0 = (f"{store.SCRATCH}/x0_0", f"{store.SCRATCH}/x0_1")
"""DPM-Solver++'s x0 predictions, beside the state: phase p writes ``PREVIOUS_X0[p % 2]``."""
ROLLED_IMAGE = f"{store.SCRATCH}/image"
"""The last step's uint8 image, stored rolled (``core.frames``) until the image phase writes
the image in place."""


def scratch_arrays(config: JobConfig, phase: int) -> list[str]:
    """The scratch arrays that denoising phase ``phase`` (1 .. steps - 1; steps where the last
    step rolls) writes."""
    if phase == config.diffusion.steps and frames.unrolls(config):
        return [ROLLED_IMAGE]
    names = [STATES[phase % 2]]
    if config.diffusion.keeps_previous_x0 and phase < config.diffusion.steps - 1:
        names.append(PREVIOUS_X0[phase % 2])
    return names


UM = {"units": "micrometer"}


def array_specs(config: JobConfig, genes: Sequence[str]) -> list[store.ArraySpec]:
    """Every array of a generation job, on one grid: shards of one block each."""
    vol, st, b = config.volume.shape, config.storage, config.conditioning.bin
    c = len(config.volume.stains)
    bins = bin_box(Box((0, 0, 0), vol), b).shape
    bin_shard = tuple(s // n for s, n in zip(st.shard_shape, b))
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
            (len(genes), *bin_shard),  # gene rasters are small: one inner chunk per shard
            attributes={"long_name": "transcript counts per bin", "bin_voxels": list(b)},
            compression_level=lvl,
        ),
        store.ArraySpec(
            CELL_COUNT,
            bins,
            "float32",
            ("zbin", "ybin", "xbin"),
            bin_shard,
            attributes={"long_name": "cell centroids per bin"},
            compression_level=lvl,
        ),
    ]
    x0 = PREVIOUS_X0 if config.diffusion.keeps_previous_x0 else ()
    for name in (*STATES, *x0):
        specs.append(
            store.ArraySpec(
                name,
                (c, *vol),
                st.scratch_dtype,
                ("c", "z", "y", "x"),
                (c, *st.shard_shape),
                (c, *st.chunk_shape),
                compression_level=1,
                codec=st.scratch_codec,
                # uncompressed: a shard is one file of raw bytes, read and written directly
                sharded=st.scratch_codec != "none",
            )
        )
    if frames.unrolls(config):  # raw chunks of one block each, read and written directly
        shape = (c, *st.shard_shape)
        specs.append(store.ArraySpec(ROLLED_IMAGE, (c, *vol), "uint8", ("c", "z", "y", "x"),
                                     shape, shape, codec="none", sharded=False))  # fmt: skip
    return specs


def coordinates(config: JobConfig, genes: Sequence[str]) -> dict:
    """1-D coordinates of the job's arrays: voxel and bin centres in µm, stain and gene names."""
    vol = config.volume
    names = {"c": vol.stains, "gene": genes}
    coords = {k: (np.asarray(list(v), dtype=object), {}) for k, v in names.items()}
    coords |= grid_coordinates(vol, "", vol.shape, (1, 1, 1))
    bins = tuple(-(-n // b) for n, b in zip(vol.shape, config.conditioning.bin, strict=True))
    return coords | grid_coordinates(vol, "bin", bins, config.conditioning.bin)


def grid_coordinates(
    volume: VolumeSpec,
    suffix: str,
    counts: Sequence[int],
    size: Sequence[int],
    stride: Sequence[int] | None = None,
    spacing_um: Sequence[float] | None = None,
) -> dict:
    """The µm centres of ``counts`` boxes of ``size`` voxels, one every ``stride`` (default
    ``size``) voxels, along z, y and x, as coordinates ``z<suffix>``, ``y<suffix>``, ``x<suffix>``
    (voxels of ``spacing_um``, by default the volume's). Every array of a store, analyses and
    pyramid levels included, places its elements this way."""
    stride = size if stride is None else stride
    sp = volume.spacing_um if spacing_um is None else spacing_um
    return {
        f"{name}{suffix}": (
            volume.origin_um[a] + (np.arange(counts[a]) * stride[a] + size[a] / 2) * sp[a],
            UM,
        )
        for a, name in enumerate("zyx")
    }


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


def job_of(root: Path) -> JobConfig:
    """The job that wrote the store at ``root``, with ``out`` pointing at it."""
    attrs = store.group_attrs(root)
    if "tera_pipeline" not in attrs:
        raise store.StoreError(f"{root} is not a tera-pipeline store (no tera_pipeline attributes)")
    try:
        job = JobConfig.from_record(attrs["tera_pipeline"]["config"])
    except ValueError as err:  # pydantic's ValidationError
        raise store.StoreError(
            f"{root}: the job recorded in the store is not valid: {err}"
        ) from None
    return job.model_copy(update={"out": Path(root)})  # the store may have moved or been copied
