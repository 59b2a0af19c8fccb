"""In-silico perturbation with SPATIA's generator: change named genes' expression of chosen cells,
generate each cell's image before and after from the same noise, measure the morphology change.

Changes are written ``GENE=VALUE`` (set the count), ``GENE=xF`` (multiply) or ``GENE=+N`` /
``GENE=-N`` (add; counts stay >= 0), several separated by commas. The noise of a cell is a pure
function of (seed, cell id), so "before" and "after" differ only through the expression.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.spatia import Spatia
from tera_pipeline.analysis.cells import CropError, nucleus_area
from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.intensity import to_uint8
from tera_pipeline.storage import layout, ownership

STEPS = 16
"""Euler steps of the flow-matching sampler."""
GUIDANCE = 2.0
"""Classifier-free guidance scale (1 = the conditional field alone; 2 sharpens the expression
effects: measured on held-out cells, see docs)."""


class PerturbError(TeraError, ValueError):
    """A perturbation that cannot be applied (unknown gene, bad change, unknown cell)."""


@dataclass(frozen=True)
class GeneChange:
    gene: str
    op: str  # "set", "scale" or "add"
    value: float

    def apply(self, counts: np.ndarray, genes: Sequence[str]) -> np.ndarray:
        out = counts.astype(np.float32, copy=True)
        g = list(genes).index(self.gene)
        if self.op == "set":
            out[:, g] = self.value
        elif self.op == "scale":
            out[:, g] *= self.value
        else:
            out[:, g] = np.maximum(out[:, g] + self.value, 0.0)
        return out

    def __str__(self) -> str:
        sign = {"set": "", "scale": "x", "add": "+" if self.value >= 0 else ""}[self.op]
        return f"{self.gene}={sign}{self.value:g}"


def parse_changes(text: str, genes: Sequence[str]) -> list[GeneChange]:
    """'Ccnd1=x4,Gfap=+10,Mbp=0' -> changes, every gene checked against the panel."""
    changes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        gene, sep, value = item.partition("=")
        gene, value = gene.strip(), value.strip()
        if not sep or not value:
            raise PerturbError(f"write a change as GENE=VALUE, GENE=xF or GENE=+N, got {item!r}")
        if gene not in genes:
            raise PerturbError(f"gene {gene!r} is not in the panel")
        op, number = "set", value
        if value[0] in "xX*":
            op, number = "scale", value[1:]
        elif value[0] in "+-":
            op = "add"
        try:
            v = float(number)
        except ValueError:
            raise PerturbError(f"{item!r}: {number!r} is not a number") from None
        if not np.isfinite(v) or (op != "add" and v < 0):
            raise PerturbError(f"{item!r}: counts and factors must be finite and >= 0")
        changes.append(GeneChange(gene, op, v))
    if not changes:
        raise PerturbError("no gene change given (e.g. Ccnd1=x4)")
    return changes


def cell_noise(seed: int, ids: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Standard normal noise (N, *shape), each row a pure function of (seed, cell id)."""
    out = np.empty((len(ids), *shape), np.float32)
    for i, cid in enumerate(np.asarray(ids, dtype=np.int64)):
        key = [int(seed), int(cid) & 0xFFFFFFFF, (int(cid) >> 32) & 0xFFFFFFFF]
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))
        out[i] = rng.standard_normal(shape, dtype=np.float32)
    return out


@torch.no_grad()
def generate(
    model: Spatia,
    counts: np.ndarray,
    ids: np.ndarray,
    seed: int = 0,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    batch: int = 64,
) -> np.ndarray:
    """Cell crops (N, C * crop_z, Y, X) uint8 generated from expression."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    noise = cell_noise(seed, ids, (cfg.in_channels, *cfg.crop[1:]))
    out = []
    for s in range(0, len(counts), batch):
        x = model.generator.sample(
            torch.from_numpy(np.asarray(counts[s : s + batch], np.float32)).to(dev),
            torch.from_numpy(noise[s : s + batch]).to(dev),
            steps,
            guidance,
        )
        x = x.cpu().numpy()
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, *noise.shape[1:]), np.uint8)


def morphology(crops: np.ndarray, crop_z: int) -> dict[str, np.ndarray]:
    """Per crop: nucleus area (px, Otsu on the DAPI of the centre slice), mean DAPI inside the
    nucleus, mean PolyT over the crop."""
    dapi = crops[:, crop_z // 2]
    polyt = crops[:, crop_z + crop_z // 2]
    area = np.array([nucleus_area(d) for d in dapi])
    mean_dapi = np.array([d[d > np.median(d)].mean() if d.size else 0.0 for d in dapi])
    return {"nucleus_area_px": area, "dapi_mean": mean_dapi, "polyt_mean": polyt.mean((1, 2))}


def perturb(
    model: Spatia,
    counts: np.ndarray,
    ids: np.ndarray,
    genes: Sequence[str],
    changes: Sequence[GeneChange],
    seed: int = 0,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
) -> dict:
    """Generate every cell before and after ``changes``; morphology of both and the change."""
    after_counts = counts
    for ch in changes:
        after_counts = ch.apply(after_counts, genes)
    before = generate(model, counts, ids, seed, steps, guidance)
    after = generate(model, after_counts, ids, seed, steps, guidance)
    mb, ma = morphology(before, model.cfg.crop[0]), morphology(after, model.cfg.crop[0])
    changed = np.any(after_counts != counts, axis=1)  # e.g. x4 leaves a count of 0 unchanged
    area_b, area_a = mb["nucleus_area_px"][changed], ma["nucleus_area_px"][changed]
    n = int(changed.sum())
    return {
        "before": before,
        "after": after,
        "counts_after": after_counts,
        "morphology_before": mb,
        "morphology_after": ma,
        "summary": {
            "changes": [str(c) for c in changes],
            "cells": len(ids),
            "cells_changed": n,
            "nucleus_area_increased": float(np.mean(area_a > area_b)) if n else 0.0,
            "nucleus_area_before_mean_px": float(area_b.mean()) if n else 0.0,
            "nucleus_area_after_mean_px": float(area_a.mean()) if n else 0.0,
            "nucleus_area_change_median": float(np.median(area_a / np.maximum(area_b, 1) - 1))
            if n
            else 0.0,
            "polyt_mean_change": float(
                np.mean(ma["polyt_mean"][changed] - mb["polyt_mean"][changed])
            )
            if n
            else 0.0,
        },
    }


def perturb_store(
    root: Path,
    changes_text: str,
    n_cells: int = 8,
    cell_ids: Sequence[str | int] = (),
    checkpoint: Path | None = None,
    seed: int = 0,
    out_dir: Path | None = None,
) -> dict:
    """Perturb cells of a store's central analysis block (or ``cell_ids`` there: the input's
    cell labels, or ids, as SPATIA's ``obs_names`` give them); writes
    ``<stem>.perturb.json`` and ``<stem>.perturb.png`` beside the store."""
    from tera_pipeline.analysis import spatia, spatia_plan
    from tera_pipeline.analysis.cells import cell_voxels, crop_halo, extract_crops
    from tera_pipeline.storage import store

    root = Path(root)
    p, source = spatia_plan.plan(root, checkpoint)
    changes = parse_changes(changes_text, p.genes)
    grid = p.grid
    box = grid.block(tuple(n // 2 for n in grid.shape)).core
    cells = _chosen_cells(
        spatia.cells_in(source, box, p.job.volume.spacing_um), box, cell_ids, n_cells, seed, root
    )
    model = spatia.get_model(p.checkpoint)
    result = perturb(model, cells.counts, cells.cell_id, p.genes, changes, seed)
    voxels = cell_voxels(cells.position_um, p.job.volume.spacing_um)
    below, above = crop_halo(p.crop)
    frame = box.grow(below, above)
    image = store.read_box(store.open_array(root, layout.IMAGE), frame)
    real = extract_crops(image, frame, voxels, p.crop)
    out_dir = Path(out_dir or root.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        **result["summary"],
        "store": str(root),
        "checkpoint": p.checkpoint,
        "seed": seed,
        "per_cell": _per_cell(cells, result, p.genes, changes),
    }
    json_path = out_dir / f"{root.stem}.perturb.json"
    png_path = out_dir / f"{root.stem}.perturb.png"
    with ownership.side_file(root, json_path), ownership.side_file(root, png_path):
        json_path.write_text(json.dumps(report, indent=2))
        panel_png(real, result, p.crop[0], report, png_path)
    return {**report, "json": str(json_path), "png": str(png_path)}


def _chosen_cells(cells, box, cell_ids: Sequence, n_cells: int, seed: int, root: Path):
    """The cells of ``box`` to perturb: those named by ``cell_ids``, else ``n_cells`` at random."""
    if cell_ids:
        where = {name: i for i, name in enumerate(cells.names())}
        missing = [str(c) for c in cell_ids if str(c) not in where]
        if missing:
            raise CropError(
                f"cells {missing[:5]} are not in the volume's central block {box} "
                f"({len(cells)} cells there, e.g. {', '.join(list(where)[:3]) or 'none'})"
            )
        return cells.select(np.array([where[str(c)] for c in cell_ids]))
    if len(cells) == 0:
        raise PerturbError(f"no cells in the central block {box} of {root}")
    pick = np.random.default_rng(seed).choice(len(cells), min(n_cells, len(cells)), False)
    return cells.select(np.sort(pick))


def _per_cell(cells, result: dict, genes: Sequence[str], changes) -> list[dict]:
    """Each perturbed cell's nucleus area and changed genes, before and after."""
    names = cells.names()
    return [
        {
            "cell_id": names[i],
            "nucleus_area_px": [
                float(result["morphology_before"]["nucleus_area_px"][i]),
                float(result["morphology_after"]["nucleus_area_px"][i]),
            ],
            "genes_before_after": {
                c.gene: [
                    float(cells.counts[i, genes.index(c.gene)]),
                    float(result["counts_after"][i, genes.index(c.gene)]),
                ]
                for c in changes
            },
        }
        for i in range(len(cells))
    ]


def panel_png(real, result: dict, crop_z: int, report: dict, path: Path) -> Path:
    """Rows = cells; columns = the store's crop, generated before / after (DAPI, PolyT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(real)
    cols = ["store DAPI", "before DAPI", "after DAPI", "before PolyT", "after PolyT"]
    fig, ax = plt.subplots(max(n, 1), len(cols), figsize=(2.2 * len(cols), 2.2 * max(n, 1)),
                           squeeze=False)  # fmt: skip
    d, t = crop_z // 2, crop_z + crop_z // 2
    for i in range(n):
        images = [real[i, d], result["before"][i, d], result["after"][i, d],
                  result["before"][i, t], result["after"][i, t]]  # fmt: skip
        areas = report["per_cell"][i]["nucleus_area_px"]
        for j, im in enumerate(images):
            ax[i, j].imshow(im, cmap="gray" if j < 3 else "magma", vmin=0, vmax=255)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if i == 0:
                ax[i, j].set_title(cols[j], fontsize=9)
        ax[i, 1].set_xlabel(f"{areas[0]:.0f} px", fontsize=8)
        ax[i, 2].set_xlabel(f"{areas[1]:.0f} px", fontsize=8)
        ax[i, 0].set_ylabel(str(report["per_cell"][i]["cell_id"]), fontsize=7)
    fig.suptitle(
        f"{', '.join(report['changes'])}: nucleus area increased in "
        f"{100 * report['nucleus_area_increased']:.0f}% of {n} cells",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
