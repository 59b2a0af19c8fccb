"""An independent count of transcripts per gene bin, to check the conditioning a job stored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tera_pipeline.core.config import JobConfig


def binned_counts(
    xyz: np.ndarray, genes: Sequence[str], panel: Sequence[str], job: JobConfig
) -> np.ndarray:
    """Counts (gene, zbin, ybin, xbin) of transcripts at ``xyz`` (x, y, z µm, input frame)."""
    zyx = np.asarray(xyz, dtype=np.float64)[:, ::-1] - np.asarray(job.volume.origin_um)
    voxel = np.floor(zyx / np.asarray(job.volume.spacing_um)).astype(int)
    bins = voxel // np.asarray(job.conditioning.bin)
    shape = -(-np.asarray(job.volume.shape) // np.asarray(job.conditioning.bin))
    out = np.zeros((len(panel), *shape), np.float32)
    code = {g: i for i, g in enumerate(panel)}
    np.add.at(out, (np.array([code[g] for g in genes]), *bins.T), 1.0)
    return out
