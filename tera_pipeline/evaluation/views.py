"""Pictures a person would rather look at: orthogonal slices of a generated store, with the
nuclei labels drawn over the DAPI slices when the store has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tera_pipeline.analysis.label_image import label_colours, nuclei_level
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import CONDITIONING, IMAGE


def label_overlay(labels: np.ndarray) -> np.ndarray:
    """RGBA over a 2-D slice of labels: each nucleus translucent in its colour (the one its
    ``image-label`` lists), its boundary opaque, the background transparent."""
    ids, index = np.unique(labels, return_inverse=True)
    rgba = label_colours(ids)[index.reshape(labels.shape)]
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        differs = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= differs
        edge[tuple(hi)] |= differs
    rgba[..., 3] = np.where(labels == 0, 0, np.where(edge, 255, 70))
    return rgba


def orthoslices_png(root: Path, out: Path) -> Path:
    """XY, XZ and YZ slices through the centre of each stain, plus the conditioning's counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    image = store.open_array(root, IMAGE)
    attrs = store.group_attrs(root)["tera_pipeline"]
    stains = attrs["config"]["volume"]["stains"]
    sz, sy, sx = attrs["spacing_um"]
    _, z, y, x = image.shape
    cz, cy, cx = z // 2, y // 2, x // 2
    cond = store.open_array(root, CONDITIONING)
    bz = attrs["config"]["conditioning"]["bin"][0]
    total = cond[:, cz // bz].read().result().sum(axis=0)
    level = nuclei_level(root)
    nuclei = store.open_array(root, level) if level else None
    cuts = ((cz,), (slice(None), cy), (slice(None), slice(None), cx))

    fig, axes = plt.subplots(len(stains), 4, figsize=(16, 4 * len(stains)), squeeze=False)
    for row, name in enumerate(stains):
        overlay = nuclei is not None and name == "DAPI"
        panels = [
            (f"{name} XY (z={cz})", sy / sx),
            (f"{name} XZ (y={cy})", sz / sx),
            (f"{name} YZ (x={cx})", sz / sy),
        ]
        for ax, (title, aspect), cut in zip(axes[row], panels, cuts):
            img = image[(row, *cut)].read().result()
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
            if overlay:
                drawn = label_overlay(nuclei[cut].read().result())
                ax.imshow(drawn, aspect=aspect, interpolation="nearest")
            ax.set_title(title + (" + nuclei labels" if overlay else ""))
            ax.axis("off")
        ax = axes[row, 3]
        if row == 0:
            ax.imshow(total, cmap="magma", interpolation="nearest")
            ax.set_title(f"conditioning: counts per bin (z={cz})")
        ax.axis("off")
    fig.suptitle(f"{root.name}: {tuple(image.shape)} (c, z, y, x), spacing {sz, sy, sx} µm")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
