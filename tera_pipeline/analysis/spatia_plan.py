"""Planning a SPATIA run: every check that can fail before a task runs (store, checkpoint, panel,
crop, genes to impute), and the picklable plan the block tasks share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.checkpoint import DEFAULT_SPATIA
from models.checkpoint_files import file_digest, read_metadata
from tera_pipeline.analysis.cells import (
    check_crop,
)
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.geometry import BlockGrid, PatchLattice, Shape
from tera_pipeline.generation import integrity
from tera_pipeline.inputs.panel import panel_difference
from tera_pipeline.storage import layout, store


class SpatiaError(TeraError, ValueError):
    """SPATIA cannot run on this store with this checkpoint; the message says why."""


@dataclass(frozen=True)
class Plan:
    """Everything a SPATIA block task needs (picklable)."""

    job: JobConfig
    checkpoint: str
    genes: tuple[str, ...]
    crop: Shape
    niche: Shape
    tissue: Shape
    block: Shape
    parts: str
    masked: tuple[str, ...] = ()
    uns: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def grid(self) -> BlockGrid:
        """The analysis block grid: the job's blocks, coarsened to whole niches if needed (only
        cores are used: no patch lattice constrains it)."""
        return BlockGrid(self.job.volume.shape, self.block, PatchLattice((1, 1, 1), (1, 1, 1)))

    @property
    def niche_grid(self) -> Shape:
        return tuple(-(-v // n) for v, n in zip(self.job.volume.shape, self.niche, strict=True))

    @property
    def tissue_grid(self) -> Shape:
        return tuple(-(-n // t) for n, t in zip(self.niche_grid, self.tissue, strict=True))


def niche_voxels(meta: dict, spacing_um: Sequence[float]) -> Shape:
    """The checkpoint's niche size (µm) in voxels of this volume."""
    return tuple(max(1, round(u / s)) for u, s in zip(meta["niche_um"], spacing_um, strict=True))


def plan(
    root: Path,
    checkpoint: Path | None = None,
    masked: Sequence[str] = (),
    block: Shape | None = None,
) -> tuple[Plan, object]:
    """Check everything that can fail before any task runs; returns (plan, cell source).
    ``block`` overrides the job's block (voxels) for this analysis."""
    from models.checkpoint import CheckpointError
    from tera_pipeline.inputs.conditioning import open_source
    from tera_pipeline.storage.layout import job_of

    root = Path(root).resolve()
    if not (root / "zarr.json").is_file():
        raise SpatiaError(f"{root} is not a zarr store")
    # the store where it is now (it may have been moved or copied since it was generated)
    job = job_of(root).model_copy(update={"out": root.resolve()})
    integrity.require_intact(job, conditioning=False)  # a lost shard would read as zeros
    if not (root / layout.IMAGE / "zarr.json").is_file():
        raise SpatiaError(f"{root} has no image array to crop cells from")
    genes = tuple(store.group_attrs(root)["tera_pipeline"]["genes"])
    ckpt = Path(checkpoint or DEFAULT_SPATIA)
    meta = read_metadata(ckpt)
    if meta.get("kind") != "spatia":
        raise CheckpointError(f"{ckpt} holds a {meta.get('kind')!r} model, not a SPATIA model")
    difference = panel_difference(genes, meta.get("genes", []))
    if difference:
        raise CheckpointError(
            f"SPATIA checkpoint {ckpt} was trained on another gene panel than the store's: "
            f"{difference}"
        )
    source = open_source(job, genes)
    if not hasattr(source, "cells"):
        raise SpatiaError(
            f"{root} has no cells: it was conditioned on a transcript table "
            f"({job.conditioning.source}); SPATIA needs a cell table (positions and counts per "
            "cell: .h5ad or cell .csv) or the synthetic brain"
        )
    cfg = meta["config"]
    crop = tuple(cfg["crop"])
    check_crop(crop, job.volume.shape)
    niche = niche_voxels(meta, job.volume.spacing_um)
    block = tuple(math.lcm(b, n) for b, n in zip(block or job.storage.block, niche, strict=True))
    unknown = [g for g in masked if g not in genes]
    if unknown:
        raise SpatiaError(f"genes to impute {unknown} are not in the panel")
    uns = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": file_digest(ckpt),
        "store": str(root),
        "crop_voxels": list(crop),
        "niche_voxels": list(niche),
        "tissue_niches": list(meta["tissue_niches"]),
        "masked_genes": list(masked),
        "cell_types": list(meta.get("cell_types", [])),
    }
    parts = root.parent / f".{root.stem}.spatia-parts"
    p = Plan(job, str(ckpt), genes, crop, niche, tuple(meta["tissue_niches"]), block,
             str(parts), tuple(masked), uns)  # fmt: skip
    return p, source
