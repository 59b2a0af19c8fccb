"""Pictures a person would rather look at: orthogonal slices of a generated store."""

from __future__ import annotations

from pathlib import Path

from tera_pipeline.storage import store
from tera_pipeline.storage.layout import CONDITIONING, IMAGE


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

    fig, axes = plt.subplots(len(stains), 4, figsize=(16, 4 * len(stains)), squeeze=False)
    for row, name in enumerate(stains):
        xy = image[row, cz].read().result()
        xz = image[row, :, cy].read().result()
        yz = image[row, :, :, cx].read().result()
        panels = [
            (xy, f"{name} XY (z={cz})", sy / sx),
            (xz, f"{name} XZ (y={cy})", sz / sx),
            (yz, f"{name} YZ (x={cx})", sz / sy),
        ]
        for ax, (img, title, aspect) in zip(axes[row], panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
            ax.set_title(title)
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
