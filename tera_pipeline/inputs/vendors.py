"""Transcript tables as instruments write them: one layout per vendor, chosen by its columns.

The layouts, from the vendors' documentation:

- **10x Xenium** ``transcripts.parquet``: ``x_location``, ``y_location``, ``z_location`` (µm),
  ``feature_name``, ``qv`` (Phred; kept at 20 and above), ``cell_id`` ("UNASSIGNED" when none).
  Control codewords (``NegControlProbe_``, ``NegControlCodeword_``, ``UnassignedCodeword_``,
  ``DeprecatedCodeword_``, ``BLANK_``, ``Intergenic_Region``) are dropped and counted.
- **Vizgen MERSCOPE** ``detected_transcripts.csv``: ``global_x``, ``global_y`` (µm),
  ``global_z`` (a z-plane index: ``z_step_um`` is required), ``gene``; its ``x``, ``y`` are FOV
  pixels and are not read. ``Blank-`` codewords are dropped and counted.
- **NanoString CosMx** ``*_tx_file.csv``: ``x_global_px``, ``y_global_px`` (pixels of
  0.12028 µm), ``z`` (a plane index), ``target``; ``NegPrb``, ``FalseCode`` and
  ``SystemControl`` probes are dropped and counted.
- **table**: ``x``, ``y``, ``z`` (µm), ``gene``.
- **SpatialData** ``.zarr`` folders: the points element (``transcripts`` if there are several),
  ``x``, ``y`` (``z`` when present; else a 2-D section at z = 0) in the element's own frame,
  taken as µm; genes from its ``feature_key`` column, cells from its ``instance_key``.

Every table is read in record batches of the columns it needs, so memory stays at one batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tera_pipeline.core.errors import InputError
from tera_pipeline.core.transcript_spec import TranscriptSpec
from tera_pipeline.inputs.csv_text import csv_header, transcript_csv_batches
from tera_pipeline.inputs.files import PARQUET_SUFFIXES, name_list

BATCH_ROWS = 1_000_000


@dataclass(frozen=True)
class TranscriptLayout:
    """A vendor's transcript table: its column names, units and control codewords."""

    name: str
    x: str
    y: str
    z: str | None
    """None: a 2-D section, every transcript at z = 0."""
    gene: str
    units: str = "um"
    """Units of x and y: ``um`` or ``px``."""
    z_is_plane: bool = False
    pixel_size_um: float | None = None
    qv: str | None = None
    min_qv: float = 0.0
    controls: tuple[str, ...] = ()
    """Prefixes of the gene names of control, blank and unassigned codewords."""
    cell: str | None = None
    no_cell: tuple[str, ...] = ()
    """Cell ids that mean "in no cell"."""

    @property
    def required(self) -> list[str]:
        return [c for c in (self.x, self.y, self.z, self.gene) if c]


LAYOUTS: dict[str, TranscriptLayout] = {
    "xenium": TranscriptLayout(
        "xenium", "x_location", "y_location", "z_location", "feature_name",
        qv="qv", min_qv=20.0, cell="cell_id", no_cell=("UNASSIGNED", "-1"),
        controls=("NegControlProbe_", "NegControlCodeword_", "UnassignedCodeword_",
                  "DeprecatedCodeword_", "BLANK_", "Intergenic_Region"),
    ),
    "merscope": TranscriptLayout(
        "merscope", "global_x", "global_y", "global_z", "gene", z_is_plane=True,
        cell="cell_id", no_cell=("-1",), controls=("Blank-",),
    ),
    "cosmx": TranscriptLayout(
        "cosmx", "x_global_px", "y_global_px", "z", "target", units="px", z_is_plane=True,
        pixel_size_um=0.12028, cell="cell_ID", no_cell=("0",),
        controls=("NegPrb", "FalseCode", "SystemControl"),
    ),
    "table": TranscriptLayout("table", "x", "y", "z", "gene"),
}  # fmt: skip
"""In the order they are detected: the first whose x, y and gene columns are present."""


def detect(columns: Sequence[str]) -> TranscriptLayout | None:
    """The layout of a table with these columns, or None."""
    for layout in LAYOUTS.values():
        if {layout.x, layout.y, layout.gene} <= set(columns):
            return layout
    return None


def layout_of(columns: Sequence[str], spec: TranscriptSpec, source: str) -> TranscriptLayout:
    """The layout named by ``spec.format`` (checked against the columns), or the detected one."""
    if spec.format == "auto":
        layout = detect(columns)
        if layout is None:
            known = "; ".join(f"{n}: {', '.join(v.required)}" for n, v in LAYOUTS.items())
            raise InputError(
                f"{source}: not a transcript table of a known layout (columns "
                f"{name_list(columns)}); the layouts read are {known}"
            )
    else:
        layout = LAYOUTS[spec.format]
    if layout.name == "table" and "fov" in columns:
        hint = (
            "this is a MERSCOPE table: pass --format merscope (it reads global_x, global_y)"
            if "global_x" in columns
            else "give positions in µm in the volume's frame"
        )
        raise InputError(f"{source}: x, y look like FOV-local pixels (a 'fov' column); {hint}")
    missing = [c for c in layout.required if c not in columns]
    if missing:
        raise InputError(
            f"{source}: missing columns {name_list(missing)} of the {layout.name} layout; need "
            f"{name_list(layout.required)}"
        )
    return layout


@dataclass(frozen=True)
class Reading:
    """A layout with the units, filters and scales a table is read with."""

    layout: TranscriptLayout
    units: str
    xy_um: float
    """µm per unit of x and y."""
    z_um: float
    """µm per unit of z (a plane index: the z step)."""
    min_qv: float
    keep_controls: bool
    files: tuple[Path, ...] = ()
    """The parquet or CSV files the table is in (a SpatialData element: its parts)."""
    columns: tuple[str, ...] = ()
    """Their columns."""

    def describe(self) -> str:
        z = f"z planes {self.z_um:g} µm apart" if self.layout.z_is_plane else "z likewise"
        qv = f", qv >= {self.min_qv:g}" if self.layout.qv and self.min_qv else ""
        return f"{self.layout.name} (x, y in {self.units}, {self.xy_um:g} µm each; {z}{qv})"


def reading(
    layout: TranscriptLayout,
    spec: TranscriptSpec,
    source: str,
    files: Sequence[Path] = (),
    columns: Sequence[str] = (),
) -> Reading:
    """Resolve units and filters; a pixel table without a pixel size, and a plane index
    without a z step, are refused naming the flag to pass."""
    units = layout.units if spec.units == "auto" else spec.units
    pixel = spec.pixel_size_um or layout.pixel_size_um
    if units == "px" and pixel is None:
        raise InputError(f"{source}: x, y are pixels: pass --pixel-size (µm per pixel)")
    xy_um = {"um": 1.0, "mm": 1000.0, "px": pixel}[units]
    if layout.z_is_plane:
        if spec.z_step_um is None:
            raise InputError(
                f"{source}: {layout.z!r} is a z-plane index ({layout.name}): pass --z-step "
                "(µm between planes)"
            )
        z_um = spec.z_step_um
    else:
        z_um = xy_um
    min_qv = layout.min_qv if spec.min_qv is None else spec.min_qv
    return Reading(
        layout, units, float(xy_um), float(z_um), min_qv, spec.keep_controls, tuple(files),
        tuple(columns),
    )  # fmt: skip


def columns_of(path: Path) -> list[str]:
    """A table's column names (parquet schema, or the CSV header)."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as err:
            first = str(err).strip().splitlines()[0]
            raise InputError(f"{path}: cannot read as parquet: {first}") from err
    return csv_header(path)


def open_reading(path: Path, spec: TranscriptSpec) -> Reading:
    """How the table at ``path`` (a file, or a SpatialData folder) is read: its files, their
    columns, its layout, units and filters."""
    if path.is_dir():
        if spec.format not in ("auto", "spatialdata"):
            raise InputError(f"{path}: a folder is read as a SpatialData store, not {spec.format}")
        files, name, attrs = spatialdata_points(path)
        columns = columns_of(files[0])
        layout = spatialdata_layout(name, attrs, columns, str(path))
    else:
        if spec.format == "spatialdata":
            raise InputError(f"{path}: --format spatialdata takes a SpatialData .zarr folder")
        files, columns = [path], columns_of(path)
        layout = layout_of(columns, spec, str(path))
    return reading(layout, spec, str(path), files, columns)


# -- SpatialData stores (points elements) ---------------------------------------------------------
ALL_CONTROLS = tuple(dict.fromkeys(c for lay in LAYOUTS.values() for c in lay.controls))


def spatialdata_points(path: Path) -> tuple[list[Path], str, dict]:
    """The parquet files, name and attributes of a SpatialData store's points element (the one
    there is, or ``transcripts``)."""
    root = Path(path) / "points"
    elements = sorted(p for p in root.iterdir() if (p / "points.parquet").exists()) if (
        root.is_dir()
    ) else []  # fmt: skip
    if not elements:
        raise InputError(
            f"{path}: not a SpatialData store with points (points/NAME/points.parquet)"
        )
    named = [e for e in elements if e.name == "transcripts"]
    if len(elements) > 1 and not named:
        names = name_list(e.name for e in elements)
        raise InputError(f"{path}: several points elements ({names}) and none named 'transcripts'")
    element = (named or elements)[0]
    data = element / "points.parquet"
    files = sorted(f for f in data.rglob("*.parquet") if f.is_file()) if data.is_dir() else [data]
    if not files:
        raise InputError(f"{data}: no parquet files")
    attrs: dict = {}
    for meta in (element / ".zattrs", element / "zarr.json"):  # zarr v2, v3
        if meta.is_file():
            loaded = json.loads(meta.read_text())
            attrs = loaded.get("attributes", loaded) if meta.name == "zarr.json" else loaded
    return files, element.name, attrs


def spatialdata_layout(
    name: str, attrs: dict, columns: Sequence[str], source: str
) -> TranscriptLayout:
    """The layout of a SpatialData points element: x, y (and z) in its own frame, taken as µm;
    genes in its ``feature_key`` column, cells in its ``instance_key``; a ``qv`` column when
    there is one; the vendors' control codewords."""
    keys = attrs.get("spatialdata_attrs", {})
    gene = keys.get("feature_key")
    if not gene or gene not in columns:
        raise InputError(
            f"{source}: points {name!r} name no gene column (spatialdata_attrs.feature_key)"
        )
    missing = [c for c in ("x", "y") if c not in columns]
    if missing:
        raise InputError(f"{source}: points {name!r} lack columns {name_list(missing)}")
    cell = keys.get("instance_key")
    return TranscriptLayout(
        f"spatialdata points {name!r}", "x", "y", "z" if "z" in columns else None, gene,
        qv="qv" if "qv" in columns else None, controls=ALL_CONTROLS,
        cell=cell if cell in columns else None, no_cell=("-1", "", "UNASSIGNED"),
    )  # fmt: skip


@dataclass
class Batch:
    """Transcripts of one record batch that pass the filters: positions (n, 3) as (x, y, z)
    µm, gene names, each row's index into them, and cell ids (or None)."""

    xyz: np.ndarray
    names: np.ndarray
    index: np.ndarray
    cells: pa.Array | None


def batches(path: Path, read: Reading, dropped: Counter) -> Iterator[Batch]:
    """The table in record batches, filtered (low qv, control codewords: counted in
    ``dropped``) and in µm."""
    lay = read.layout
    wanted = [c for c in (lay.x, lay.y, lay.z, lay.gene) if c]
    extra = [c for c in (lay.qv, lay.cell) if c and c in read.columns]
    try:
        if path.is_dir() or path.suffix.lower() in PARQUET_SUFFIXES:
            source = (
                b
                for f in read.files
                for b in pq.ParquetFile(f).iter_batches(BATCH_ROWS, columns=wanted + extra)
            )
        else:
            numeric = [lay.qv] if lay.qv in extra else []
            text = [lay.cell] if lay.cell in extra else []
            source = transcript_csv_batches(
                path, coords=wanted[:3], gene=lay.gene, numeric=numeric, text=text
            )
        for batch in source:
            yield _filtered(batch, read, path, dropped)
    except (pa.ArrowInvalid, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path}: cannot read as a transcript table: {first}") from err


def _filtered(batch: pa.RecordBatch, read: Reading, path: Path, dropped: Counter) -> Batch:
    lay = read.layout
    try:
        xyz = np.stack(
            [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64) if c
             else np.zeros(batch.num_rows) for c in (lay.x, lay.y, lay.z)], axis=1,
        )  # fmt: skip
    except (ValueError, TypeError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: coordinates {lay.x}, {lay.y}, {lay.z} must be numbers") from err
    xyz *= np.array([read.xy_um, read.xy_um, read.z_um])
    gene = batch.column(lay.gene)
    if gene.null_count:
        raise InputError(f"{path}: {gene.null_count} transcripts have no gene")
    if not pa.types.is_dictionary(gene.type):
        gene = pc.dictionary_encode(gene)
    names = gene.dictionary.to_numpy(zero_copy_only=False).astype(str)
    index = gene.indices.to_numpy(zero_copy_only=False)
    keep = np.ones(len(xyz), dtype=bool)
    if lay.qv and lay.qv in batch.schema.names and read.min_qv > 0:
        qv = batch.column(lay.qv).to_numpy(zero_copy_only=False).astype(np.float64)
        low = ~(qv >= read.min_qv)
        dropped[f"qv below {read.min_qv:g}"] += int(low.sum())
        keep &= ~low
    if lay.controls and not read.keep_controls:
        control = np.array([n.startswith(lay.controls) for n in names], dtype=bool)
        rows = control[index] & keep
        dropped["control, blank or unassigned codewords"] += int(rows.sum())
        keep &= ~control[index]
    cells = batch.column(lay.cell) if lay.cell and lay.cell in batch.schema.names else None
    if not keep.all():
        xyz, index = xyz[keep], index[keep]
        cells = None if cells is None else cells.filter(pa.array(keep))
    return Batch(xyz, names, index, cells)


class Extent:
    """The bounding box of the positions seen (in the order given: x, y, z or z, y, x µm), and,
    for (z, y, x) positions in the volume frame, what it says of their units."""

    def __init__(self) -> None:
        self.lo = np.full(3, np.inf)
        self.hi = np.full(3, -np.inf)

    def add(self, pos: np.ndarray) -> None:
        if len(pos):
            self.lo = np.minimum(self.lo, pos.min(axis=0))
            self.hi = np.maximum(self.hi, pos.max(axis=0))

    def check_units(self, volume_um: np.ndarray, source: str) -> None:
        """Refuse positions that span a tiny fraction of the volume's y and x (millimetres read
        as µm) or lie mostly beyond it (pixels read as µm), naming the unit they look like."""
        span = (self.hi - self.lo)[1:]
        size = np.asarray(volume_um, dtype=np.float64)[1:]
        if np.all(span * 100 < size) and np.all(span * 1000 <= size * 2):
            raise InputError(
                f"{source}: the transcripts span {span[1]:.3g} x {span[0]:.3g} (x, y), "
                f"a tiny part of the volume's {size[1]:g} x {size[0]:g} µm: they look like mm; "
                "pass --units mm (or --units um if they are µm)"
            )
        if np.all(self.lo[1:] >= 0) and np.all(self.hi[1:] > 4 * size):
            raise InputError(
                f"{source}: the transcripts reach {self.hi[2]:.4g} x {self.hi[1]:.4g} (x, y), "
                f"far beyond the volume's {size[1]:g} x {size[0]:g} µm: they look like pixels; "
                "pass --units px --pixel-size UM (or --units um if they are µm)"
            )


def is_transcript_table(path: Path) -> bool:
    """A parquet table, a CSV whose header is a transcript layout's, or a SpatialData store."""
    path = Path(path)
    if path.is_dir():
        return (path / "points").is_dir()
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    if path.suffix.lower() == ".csv" and path.is_file():
        return detect(csv_header(path)) is not None  # binary, non-UTF-8: InputError
    return False
