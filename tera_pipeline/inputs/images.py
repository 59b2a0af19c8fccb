"""Microscope images into the (c, z, y, x) uint8 zarr array that training and the analyses read.

Two layouts, detected from the path:

- **OME-TIFF** (``*.ome.tif``; Xenium's ``morphology_focus``): the first series, its axes from the
  file, the voxel size from the OME-XML ``PhysicalSizeX/Y/Z`` (µm), channel names from its
  ``Channel`` elements.
- **MERSCOPE mosaics** (a folder holding ``images/``, or ``images/`` itself):
  ``mosaic_{stain}_z{N}.tif`` with ``micron_to_mosaic_pixel_transform.csv`` (the 3 x 3 µm → pixel
  affine): the pixel size and the mosaic's origin in µm from the affine; the z step is not in the
  files, so it must be given (``--z-step``; MERSCOPE images 1.5 µm apart by default protocol).

Planes are read one at a time (memory: one plane and the output's chunk row), scaled per channel
from a robust intensity window (percentiles of a subsample) to uint8, optionally averaged over
``downsample`` x ``downsample`` pixels, and written with the spacing and origin in the array's
attributes. Nothing existing is replaced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tera_pipeline.core.errors import InputError

MERSCOPE_TRANSFORM = "micron_to_mosaic_pixel_transform.csv"
MOSAIC = re.compile(r"mosaic_(?P<stain>.+)_z(?P<z>\d+)\.tiff?$")
PERCENTILES = (0.5, 99.8)
"""The intensity window mapped to 0..255, per channel."""
UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}


@dataclass(frozen=True)
class ImageSource:
    """Images as planes: ``plane(c, z)`` reads one (y, x) plane; spacing and origin µm (z, y, x)."""

    path: Path
    layout: str
    channels: tuple[str, ...]
    depth: int
    shape_yx: tuple[int, int]
    spacing_um: tuple[float, float, float]
    origin_um: tuple[float, float, float]
    plane: Callable[[int, int], np.ndarray] = field(repr=False)

    def describe(self) -> str:
        z, y, x = self.spacing_um
        return (
            f"{self.layout}: {len(self.channels)} channels ({', '.join(self.channels)}), "
            f"{self.depth} x {self.shape_yx[0]} x {self.shape_yx[1]} planes, {z:g} x {y:g} x "
            f"{x:g} µm voxels"
        )


def open_images(path: Path, z_step_um: float | None = None) -> ImageSource:
    """The image source at ``path`` (an OME-TIFF file or a MERSCOPE folder), by its layout."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        if (folder / MERSCOPE_TRANSFORM).is_file():
            return _merscope(folder, z_step_um)
        raise InputError(
            f"{path}: not a MERSCOPE images folder (no {MERSCOPE_TRANSFORM}); give an OME-TIFF "
            "file or the folder holding images/"
        )
    if path.suffix.lower() in (".tif", ".tiff"):
        return _ome_tiff(path, z_step_um)
    raise InputError(f"{path}: images must be an OME-TIFF (.ome.tif) or a MERSCOPE folder")


def _ome_tiff(path: Path, z_step_um: float | None) -> ImageSource:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.is_ome:
            raise InputError(f"{path}: a TIFF without OME metadata (no voxel size): need OME-TIFF")
        series = tif.series[0]
        axes, shape = series.axes.upper(), series.shape
        meta = tifffile.xml2dict(tif.ome_metadata)
    pixels = _first(meta["OME"]["Image"])["Pixels"]
    size = {a: _um(pixels, a, path) for a in "XYZ"}
    if any(a not in "CZYX" for a in axes) or axes[-2:] != "YX":
        raise InputError(f"{path}: axes {axes!r}; need some of C, Z then Y, X")
    channels = [c.get("Name") for c in _list(pixels.get("Channel", []))]
    n_c = shape[axes.index("C")] if "C" in axes else 1
    names = tuple(n or f"channel {i}" for i, n in zip(range(n_c), channels + [None] * n_c))
    depth = shape[axes.index("Z")] if "Z" in axes else 1
    z_um = size["Z"] or z_step_um
    if depth > 1 and z_um is None:
        raise InputError(f"{path}: no PhysicalSizeZ in its OME metadata: pass --z-step (µm)")
    lead = [a for a in axes[:-2]]

    def plane(c: int, z: int) -> np.ndarray:
        index = {"C": c, "Z": z}
        page = int(np.ravel_multi_index([index[a] for a in lead], shape[:-2])) if lead else 0
        with tifffile.TiffFile(path) as tif:
            return tif.series[0].pages[page].asarray()

    return ImageSource(
        path, "ome-tiff", names, depth, tuple(shape[-2:]),
        (float(z_um or 1.0), size["Y"], size["X"]), (0.0, 0.0, 0.0), plane,
    )  # fmt: skip


def _um(pixels: dict, axis: str, path: Path) -> float | None:
    value = pixels.get(f"PhysicalSize{axis}")
    if value is None:
        if axis == "Z":
            return None
        raise InputError(f"{path}: no PhysicalSize{axis} in its OME metadata (the pixel size)")
    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
    if unit not in UM:
        raise InputError(f"{path}: PhysicalSize{axis}Unit {unit!r} is not a length unit we read")
    return float(value) * UM[unit]


def _merscope(folder: Path, z_step_um: float | None) -> ImageSource:
    import tifffile

    found: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        m = MOSAIC.match(f.name)
        if m:
            found.setdefault(m["stain"], {})[int(m["z"])] = f
    if not found:
        raise InputError(f"{folder}: no mosaic_<stain>_z<N>.tif images")
    planes = sorted({z for by_z in found.values() for z in by_z})
    for stain, by_z in found.items():
        if sorted(by_z) != planes:
            raise InputError(
                f"{folder}: stain {stain} lacks planes {sorted(set(planes) - set(by_z))}"
            )
    if len(planes) > 1 and z_step_um is None:
        raise InputError(
            f"{folder}: {len(planes)} mosaic planes and no z step in the files: pass --z-step "
            "(µm between planes; 1.5 on the MERSCOPE protocol)"
        )
    affine = np.loadtxt(folder / MERSCOPE_TRANSFORM)
    if affine.shape != (3, 3) or affine[0, 1] or affine[1, 0] or affine[0, 0] <= 0:
        raise InputError(f"{folder / MERSCOPE_TRANSFORM}: need a 3 x 3 scale-and-shift affine")
    sx, sy = affine[0, 0], affine[1, 1]  # pixels per µm
    origin = (float(planes[0] * (z_step_um or 1.0)), -affine[1, 2] / sy, -affine[0, 2] / sx)
    stains = tuple(found)
    first = found[stains[0]][planes[0]]
    with tifffile.TiffFile(first) as tif:
        shape_yx = tuple(tif.pages[0].shape[:2])

    def plane(c: int, z: int) -> np.ndarray:
        return tifffile.imread(found[stains[c]][planes[z]])

    return ImageSource(
        folder, "merscope mosaics", stains, len(planes), shape_yx,
        (float(z_step_um or 1.0), 1.0 / sy, 1.0 / sx), origin, plane,
    )  # fmt: skip


def _first(value):
    return value[0] if isinstance(value, list) else value


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def intensity_window(source: ImageSource, c: int, samples: int = 8) -> tuple[float, float]:
    """The ``PERCENTILES`` of channel ``c`` over up to ``samples`` planes (every 4th pixel)."""
    zs = np.unique(np.linspace(0, source.depth - 1, min(samples, source.depth)).astype(int))
    values = np.concatenate([source.plane(c, int(z))[::4, ::4].ravel() for z in zs])
    lo, hi = np.percentile(values.astype(np.float64), PERCENTILES)
    return float(lo), float(max(hi, lo + 1e-6))


def import_images(
    source: ImageSource,
    out: Path,
    channels: Sequence[str] | None = None,
    downsample: int = 1,
) -> dict:
    """Write ``source`` (the named ``channels``, default all) as a (c, z, y, x) uint8 zarr v3
    array at ``out``; returns what was written (also in the array's attributes)."""
    import tensorstore as ts

    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists; give a new path for the imported images")
    chosen = list(channels or source.channels)
    missing = [c for c in chosen if c not in source.channels]
    if missing:
        raise InputError(f"{source.path}: no channels {missing}; it has {list(source.channels)}")
    if downsample < 1:
        raise InputError(f"--downsample must be 1 or more, got {downsample}")
    y, x = (n // downsample for n in source.shape_yx)
    windows = {c: intensity_window(source, source.channels.index(c)) for c in chosen}
    spacing = (source.spacing_um[0], *(s * downsample for s in source.spacing_um[1:]))
    record = {
        "source": str(source.path), "layout": source.layout, "channels": chosen,
        "spacing_um": list(spacing), "origin_um": list(source.origin_um),
        "intensity_window": {c: list(w) for c, w in windows.items()},
        "downsample": downsample,
    }  # fmt: skip
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(out)},
        "metadata": {
            "shape": [len(chosen), source.depth, y, x],
            "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [1, 1, min(y, 512), min(x, 512)]}},
            "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
            "dimension_names": ["c", "z", "y", "x"],
            "attributes": {"tera_pipeline": {"images": record}},
        },
        "create": True,
    }  # fmt: skip
    array = ts.open(spec).result()
    for i, name in enumerate(chosen):
        lo, hi = windows[name]
        for z in range(source.depth):
            plane = source.plane(source.channels.index(name), z).astype(np.float32)
            plane = plane[: y * downsample, : x * downsample]
            if downsample > 1:
                plane = plane.reshape(y, downsample, x, downsample).mean(axis=(1, 3))
            scaled = np.clip((plane - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            array[i, z].write(scaled).result()
    return record | {"shape": [len(chosen), source.depth, y, x], "out": str(out)}


def recorded_spacing(path: Path) -> tuple[float, float, float] | None:
    """The spacing an imported image array records, or None."""
    import json

    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    attrs = json.loads(meta.read_text()).get("attributes", {})
    spacing = attrs.get("tera_pipeline", {}).get("images", {}).get("spacing_um")
    return tuple(float(s) for s in spacing) if spacing else None
