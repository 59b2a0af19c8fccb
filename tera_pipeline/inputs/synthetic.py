"""A synthetic mouse-brain-like tissue: cells, gene programs, morphology, two rendered stains.

Cells are drawn per fixed tile of space (``CELL_TILE_UM``) from a generator keyed by
(seed, tile index), so any box of any size regenerates exactly the same cells and pixels. Density
and cell-type mix vary by region (upper and deep cortex, white matter, deep nuclei: bands along
y). Each type has a gene-expression program over ``GENE_PANEL`` and a morphology; two pairs of
subtypes share a program and differ only in morphology. The nucleus radius also follows the
expression of ``SIZE_DRIVER_GENE`` (a known expression -> morphology rule for SPATIA's tests).

Stains: DAPI-like (nuclei, brightness and texture by type) and PolyT-like (cytoplasmic mRNA, whose
intensity grows with the cell's total counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.core.noise import tiled_position_noise

GENE_PANEL: tuple[str, ...] = (
    "Slc17a7",
    "Slc17a6",
    "Camk2a",
    "Satb2",
    "Snap25",
    "Rbfox3",
    "Gad1",
    "Gad2",
    "Slc32a1",
    "Pvalb",
    "Sst",
    "Th",
    "Nr4a2",
    "Slc6a3",
    "Ddc",
    "Aqp4",
    "Gfap",
    "Slc1a3",
    "Aldh1l1",
    "Mbp",
    "Plp1",
    "Olig2",
    "Mog",
    "Cldn5",
    "Flt1",
    "Pecam1",
    "Cx3cr1",
    "P2ry12",
    "Csf1r",
    "Ccnd1",
    "Actb",
    "Gapdh",
)
SIZE_DRIVER_GENE = "Ccnd1"
STAINS: tuple[str, ...] = ("DAPI", "PolyT")
CELL_TILE_UM = 64.0
RANK_BITS = 15
"""A cell's id is its tile's index (16 bits per axis) followed by its rank in the tile
(``RANK_BITS`` bits): unique, non-negative, and the same from any box."""


@dataclass(frozen=True)
class CellType:
    name: str
    markers: dict[str, float]  # mean counts of marker genes
    nucleus_radius_um: float
    brightness: float  # DAPI intensity in [0, 1]
    texture: float  # chromatin texture amplitude


_EXN_MARKERS = {"Slc17a7": 30, "Slc17a6": 8, "Camk2a": 25, "Satb2": 12, "Snap25": 20, "Rbfox3": 15}
_ASTRO_MARKERS = {"Aqp4": 25, "Gfap": 20, "Slc1a3": 20, "Aldh1l1": 10}

# Two pairs of subtypes share their markers over the panel and differ only in morphology, as
# upper- and deep-layer pyramidal neurons or protoplasmic and fibrous astrocytes do under a
# targeted panel that lacks their markers: expression alone cannot tell them apart, the image can.
CELL_TYPES: tuple[CellType, ...] = (
    CellType("ExN-U", _EXN_MARKERS, 3.9, 0.62, 0.3),
    CellType("ExN-D", _EXN_MARKERS, 5.6, 0.45, 0.08),
    CellType(
        "InN",
        {"Gad1": 30, "Gad2": 25, "Slc32a1": 12, "Pvalb": 10, "Sst": 8, "Snap25": 18, "Rbfox3": 12},
        4.0,
        0.62,
        0.2,
    ),
    CellType(
        "DaN",
        {"Th": 30, "Nr4a2": 18, "Slc6a3": 20, "Ddc": 15, "Snap25": 15, "Slc17a6": 6},
        5.2,
        0.5,
        0.12,
    ),
    CellType("AstroP", _ASTRO_MARKERS, 3.6, 0.75, 0.35),
    CellType("AstroF", _ASTRO_MARKERS, 4.6, 0.55, 0.08),
    CellType("Oligo", {"Mbp": 35, "Plp1": 30, "Olig2": 10, "Mog": 12}, 3.1, 0.9, 0.25),
    CellType("Endo", {"Cldn5": 25, "Flt1": 15, "Pecam1": 12}, 3.0, 0.85, 0.3),
    CellType("Micro", {"Cx3cr1": 20, "P2ry12": 18, "Csf1r": 15}, 2.8, 0.88, 0.4),
)

# Regions along y (period in µm): upper and deep cortex, white matter, deep nuclei. Density in
# cells / µm³.
REGION_PERIOD_UM = 320.0
REGIONS = (
    # (y start, y end, density, type mix in CELL_TYPES order)
    (0.0, 80.0, 1 / 900, (0.40, 0.15, 0.15, 0.0, 0.10, 0.02, 0.05, 0.06, 0.07)),
    (80.0, 160.0, 1 / 900, (0.15, 0.40, 0.15, 0.0, 0.10, 0.02, 0.05, 0.06, 0.07)),
    (160.0, 224.0, 1 / 1400, (0.01, 0.01, 0.02, 0.0, 0.03, 0.11, 0.68, 0.07, 0.07)),
    (224.0, 320.0, 1 / 1100, (0.08, 0.07, 0.25, 0.35, 0.08, 0.02, 0.05, 0.05, 0.05)),
)


@dataclass(frozen=True)
class CellTable:
    """Cells with positions in µm (z, y, x), types, counts over a gene panel, and morphology."""

    position_um: np.ndarray  # (N, 3) float64
    counts: np.ndarray  # (N, G) float32
    genes: tuple[str, ...]
    cell_type: np.ndarray | None = None  # (N,) int
    cell_id: np.ndarray | None = None  # (N,) int64
    nucleus_radius_um: np.ndarray | None = None
    brightness: np.ndarray | None = None
    texture: np.ndarray | None = None
    cell_label: np.ndarray | None = None  # (N,) str: the input's own cell names

    def __len__(self) -> int:
        return len(self.position_um)

    def names(self) -> list[str]:
        """Each cell's name: the input's own label (an atlas's ``cell_label``), else its id."""
        if self.cell_label is not None:
            return [str(n) for n in self.cell_label]
        ids = self.cell_id if self.cell_id is not None else range(len(self))
        return [str(int(i)) for i in ids]

    def select(self, mask: np.ndarray) -> CellTable:
        def pick(a):
            return None if a is None else a[mask]

        return CellTable(
            self.position_um[mask],
            self.counts[mask],
            self.genes,
            pick(self.cell_type),
            pick(self.cell_id),
            pick(self.nucleus_radius_um),
            pick(self.brightness),
            pick(self.texture),
            pick(self.cell_label),
        )


def _region_params(y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.mod(y_um, REGION_PERIOD_UM)
    density = np.zeros_like(u)
    mix = np.zeros((len(u), len(CELL_TYPES)))
    for start, end, dens, weights in REGIONS:
        inside = (u >= start) & (u < end)
        density[inside] = dens
        mix[inside] = weights
    return density, mix


def _texture_phase(cell_id: int) -> float:
    """The phase of a cell's chromatin texture. It is the one cells had when their id was
    ``tile * 100_000 + rank`` in wrapping int64 arithmetic (ids that overflowed to negative
    values), so renders, and the checkpoints trained on them, stay bitwise the same."""
    legacy = (cell_id >> RANK_BITS) * 100_000 + (cell_id & ((1 << RANK_BITS) - 1))
    legacy = (legacy + 2**63) % 2**64 - 2**63
    return (legacy % 997) * 0.37


def _density_modulation(pos: np.ndarray) -> np.ndarray:
    """Smooth spatial variation of density (0.4 .. 1.0) so bins hold varied cell counts."""
    z, y, x = pos[:, 0], pos[:, 1], pos[:, 2]
    wave = np.sin(2 * np.pi * x / 170.0) * np.cos(2 * np.pi * y / 230.0 + 0.7)
    wave = wave + 0.5 * np.sin(2 * np.pi * z / 90.0 + 1.3)
    return 0.7 + 0.3 * np.clip(wave, -1.0, 1.0)


class SyntheticBrain:
    """The embedded default data set: deterministic tissue for any box, from a seed."""

    def __init__(self, seed: int = 0, spacing_um: Shape | tuple[float, ...] = (4.0, 1.0, 1.0)):
        self.seed = int(seed)
        self.spacing = np.asarray(spacing_um, dtype=np.float64)
        self.genes = GENE_PANEL
        self._gene_index = {g: i for i, g in enumerate(GENE_PANEL)}
        self._programs = np.full((len(CELL_TYPES), len(GENE_PANEL)), 0.3, dtype=np.float64)
        for t, ct in enumerate(CELL_TYPES):
            for gene, mean in ct.markers.items():
                self._programs[t, self._gene_index[gene]] = mean
        self._programs[:, self._gene_index["Actb"]] = 12.0
        self._programs[:, self._gene_index["Gapdh"]] = 10.0
        self._programs[:, self._gene_index[SIZE_DRIVER_GENE]] = 4.0

    # -- cells ---------------------------------------------------------------------------------
    def _tile_cells(self, tile: tuple[int, int, int]) -> CellTable:
        key = [self.seed, 0xCE11, *(t + 2**31 for t in tile)]
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))
        lam_max = max(r[2] for r in REGIONS)
        n = rng.poisson(lam_max * CELL_TILE_UM**3)
        pos = (np.asarray(tile, dtype=np.float64) + rng.random((n, 3))) * CELL_TILE_UM
        density, mix = _region_params(pos[:, 1])
        keep = rng.random(n) < density * _density_modulation(pos) / lam_max
        pos, mix = pos[keep], mix[keep]
        m = len(pos)
        types = np.array([rng.choice(len(CELL_TYPES), p=p) for p in mix], dtype=np.int64)
        library = rng.lognormal(0.0, 0.25, size=(m, 1))
        driver = rng.gamma(2.0, 0.5, size=m)  # per-cell activity of the size-driver gene
        means = self._programs[types] * library
        means[:, self._gene_index[SIZE_DRIVER_GENE]] *= driver
        counts = rng.poisson(means).astype(np.float32)
        base = np.array([ct.nucleus_radius_um for ct in CELL_TYPES])[types]
        size_rule = 0.85 + 0.12 * np.log1p(counts[:, self._gene_index[SIZE_DRIVER_GENE]])
        radius = base * size_rule * rng.uniform(0.92, 1.08, size=m)
        brightness = np.array([ct.brightness for ct in CELL_TYPES])[types] * rng.uniform(
            0.9, 1.1, size=m
        )
        texture = np.array([ct.texture for ct in CELL_TYPES])[types]
        if m >= 1 << RANK_BITS:
            raise ValueError(f"{m} cells in one tile: ids hold {1 << RANK_BITS}")
        tile_index = np.ravel_multi_index(
            [np.full(m, t + 2**15, dtype=np.int64) for t in tile], (2**16,) * 3
        )
        ids = (tile_index << RANK_BITS) + np.arange(m)
        return CellTable(pos, counts, self.genes, types, ids, radius, brightness, texture)

    def cells(self, box: Box, margin_um: float = 0.0) -> CellTable:
        """Cells whose centroid lies in ``box`` (voxels) grown by ``margin_um`` µm."""
        lo = np.asarray(box.begin) * self.spacing - margin_um
        hi = np.asarray(box.end) * self.spacing + margin_um
        first = np.floor(lo / CELL_TILE_UM).astype(int)
        last = np.floor((hi - 1e-9) / CELL_TILE_UM).astype(int)
        tables = [
            self._tile_cells((tz, ty, tx))
            for tz in range(first[0], last[0] + 1)
            for ty in range(first[1], last[1] + 1)
            for tx in range(first[2], last[2] + 1)
        ]
        merged = CellTable(
            np.concatenate([t.position_um for t in tables]),
            np.concatenate([t.counts for t in tables]),
            self.genes,
            *(
                np.concatenate([getattr(t, f) for t in tables])
                for f in ("cell_type", "cell_id", "nucleus_radius_um", "brightness", "texture")
            ),
        )
        inside = np.all((merged.position_um >= lo) & (merged.position_um < hi), axis=1)
        return merged.select(inside)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, box: Box) -> np.ndarray:
        """Both stains for ``box`` as uint8 of shape (2, *box.shape)."""
        max_radius = 2.2 * max(ct.nucleus_radius_um for ct in CELL_TYPES) * 1.4
        cells = self.cells(box, margin_um=max_radius)
        dapi = np.zeros(box.shape, dtype=np.float32)
        polyt = np.zeros(box.shape, dtype=np.float32)
        grids = [
            (np.arange(b, e, dtype=np.float64) + 0.5) * s
            for b, e, s in zip(box.begin, box.end, self.spacing, strict=True)
        ]
        total = cells.counts.sum(axis=1)
        for i in range(len(cells)):
            c = cells.position_um[i]
            r = cells.nucleus_radius_um[i]
            reach = 2.2 * r
            sl = []
            for axis in range(3):
                g = grids[axis]
                lo, hi = np.searchsorted(g, c[axis] - reach), np.searchsorted(g, c[axis] + reach)
                sl.append(slice(lo, hi))
            if any(s.stop <= s.start for s in sl):
                continue
            dz, dy, dx = (grids[a][sl[a]] - c[a] for a in range(3))
            d2 = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2
            d = np.sqrt(d2) / r
            nucleus = 1.0 / (1.0 + np.exp((d - 1.0) * 8.0))
            phase = _texture_phase(int(cells.cell_id[i]))
            tex = (
                np.sin(dz[:, None, None] * 1.9 + phase)
                * np.sin(dy[None, :, None] * 2.3 + 2 * phase)
                * np.sin(dx[None, None, :] * 2.1 + 3 * phase)
            )
            dapi[tuple(sl)] += nucleus * cells.brightness[i] * (1.0 + cells.texture[i] * tex)
            cyto = 1.0 / (1.0 + np.exp((d - 2.0) * 4.0))
            polyt[tuple(sl)] += (cyto - 0.7 * nucleus) * min(total[i] / 250.0, 1.2) * 0.3
        noise = tiled_position_noise(self.seed, 0x5EED, box, channels=2)
        dapi = np.clip(dapi + 0.04 + 0.02 * noise[0], 0.0, 1.0)
        polyt = np.clip(polyt + 0.06 + 0.02 * noise[1], 0.0, 1.0)
        return np.round(np.stack([dapi, polyt]) * 255.0).astype(np.uint8)
