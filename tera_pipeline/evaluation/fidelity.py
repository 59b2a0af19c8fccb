"""Quality measures of a generated store that need no ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tera_pipeline.storage import store
from tera_pipeline.storage.layout import CELL_COUNT, IMAGE


def conditioning_fidelity(root: Path, stain: int = 0) -> dict:
    """Pearson r between per-bin mean intensity of ``stain`` (DAPI) and per-bin cell count.

    Reads the image and the cell-count raster bin by bin along z (memory: one z-bin slab).
    """
    root = Path(root)
    image = store.open_array(root, IMAGE)
    counts = store.open_array(root, CELL_COUNT)
    bin_shape = tuple(store.group_attrs(root)["tera_pipeline"]["config"]["conditioning"]["bin"])
    _, z, y, x = image.shape
    nz, ny, nx = counts.shape
    means, cells = [], []
    for k in range(nz):
        z0, z1 = k * bin_shape[0], min(z, (k + 1) * bin_shape[0])
        slab = image[stain, z0:z1].read().result().astype(np.float64)
        pad = np.zeros((z1 - z0, ny * bin_shape[1], nx * bin_shape[2]))
        pad[:, :y, :x] = slab
        w = np.zeros_like(pad)
        w[:, :y, :x] = 1.0
        shape = (z1 - z0, ny, bin_shape[1], nx, bin_shape[2])
        means.append(pad.reshape(shape).sum(axis=(0, 2, 4)) / w.reshape(shape).sum(axis=(0, 2, 4)))
        cells.append(counts[k].read().result())
    m, c = np.concatenate([a.ravel() for a in means]), np.concatenate([a.ravel() for a in cells])
    r = float(np.corrcoef(m, c)[0, 1]) if m.std() > 0 and c.std() > 0 else 0.0
    return {
        "pearson_r": r,
        "bins": int(m.size),
        "mean_cells_per_bin": float(c.mean()),
        "stain": stain,
    }
