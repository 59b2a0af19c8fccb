"""A user's training data: an image volume (a zarr array (c, z, y, x) of uint8, or a store's
``image``) and its cells or transcripts, as every model's ``tera train --images --cells`` reads
them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tera_pipeline.inputs.synthetic import CellTable


@dataclass(frozen=True)
class UserData:
    """Where a user's images and cells are, the images' voxel spacing, and the genes to keep
    (default: every gene of the table)."""

    images: Path
    cells: Path
    spacing_um: tuple[float, float, float]
    genes: tuple[str, ...] | None = None

    def load(self) -> tuple[np.ndarray, CellTable]:
        """The images (c, z, y, x) uint8 and the cells, checked against the images' volume."""
        from tera_pipeline.core.config import VolumeSpec
        from tera_pipeline.inputs.cells import load_cells

        image = read_image(Path(self.images))
        volume = VolumeSpec(shape=image.shape[1:], spacing_um=self.spacing_um)
        return image, load_cells(self.cells, self.genes, volume=volume)


def read_image(path: Path) -> np.ndarray:
    """A (c, z, y, x) uint8 array from a zarr array, or from a store's ``image`` array."""
    import tensorstore as ts

    from tera_pipeline.core.errors import InputError

    array_path = path / "image" if (path / "image" / "zarr.json").is_file() else path
    for driver in ("zarr3", "zarr"):
        try:
            spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(array_path)}}
            array = ts.open(spec, open=True).result()
            break
        except (ValueError, RuntimeError):
            continue
    else:
        raise InputError(f"{path}: not a zarr array of images (c, z, y, x)")
    if array.rank != 4 or array.dtype != ts.uint8:
        raise InputError(f"{path}: need uint8 (c, z, y, x) images, got {array.dtype} {array.shape}")
    return array.read().result()
