"""The figures of a finished run a person asks for first: size, blocks, steps, time per step,
conditioning fidelity and seam score, as a dict and as a markdown table (the flow's artifact).

Times come from the store's run record. Fidelity and the seam score read the whole image slice by
slice, so they are measured here only for volumes up to ``MEASURE_VOXELS``; for larger ones they
come from ``tera evaluate``'s ``<store name>.evaluation.json`` beside the store when it has
measured this store, and are reported as not measured otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tera_pipeline.storage import store
from tera_pipeline.storage.status import sampling_cost

MEASURE_VOXELS = 2**27
"""Largest volume (voxels per stain) whose fidelity and seam score a run measures itself."""


def run_figures(root: Path, measure_voxels: int = MEASURE_VOXELS) -> dict:
    """Figures of the run that wrote ``root`` (a finished store)."""
    from tera_pipeline.core.config import JobConfig
    from tera_pipeline.evaluation.fidelity import conditioning_fidelity
    from tera_pipeline.evaluation.metrics import run_seam_scores

    root = Path(root)
    attrs = store.group_attrs(root)["tera_pipeline"]
    config, run = attrs["config"], attrs.get("run", {})
    phases = run.get("phases", [])
    steps = [p for p in phases if p["phase"].startswith("step ")]
    shape = config["volume"]["shape"]
    figures: dict = {
        "store": str(root),
        "shape_czyx": [len(config["volume"]["stains"]), *shape],
        "spacing_um": config["volume"]["spacing_um"],
        "voxels": run.get("voxels", int(np.prod(shape)) * len(config["volume"]["stains"])),
        "blocks": run.get("blocks"),
        "block": config["storage"]["block"],
        "steps": config["diffusion"]["steps"],
        "step_s": [p["wall_s"] for p in steps],
        "phases": phases,
        "pyramid": attrs.get("pyramid"),
        "status": attrs.get("status"),
    }
    figures |= sampling_cost(config)
    if steps:
        figures["time_per_step_s"] = float(np.mean(figures["step_s"]))
        evaluated = float(np.mean([p.get("patches", 0) for p in steps]))
        patch = config["lattice"]["patch"]
        figures["E_measured"] = round(evaluated * np.prod(patch) / np.prod(shape), 3)
    evaluation = _evaluation(root)
    if evaluation:
        figures["fidelity_r"] = evaluation["fidelity"]["pearson_r"]
        figures["seam_score"] = evaluation["seams"]["engine"]["seam_score"]
        for key, name in (("final_lattice", "last_lattice"), ("all_lattices", "all_lattices")):
            if f"engine_{name}" in evaluation["seams"]:
                figures[f"seam_score_{key}"] = evaluation["seams"][f"engine_{name}"]["seam_score"]
        figures["seam_score_naive_tiling"] = evaluation["seams"]["naive_tiling"]["seam_score"]
        figures["measured_by"] = "tera evaluate"
    elif int(np.prod(shape)) <= measure_voxels:
        figures["fidelity_r"] = conditioning_fidelity(root)["pearson_r"]
        figures |= run_seam_scores(root, JobConfig.from_record(config))
        figures["measured_by"] = "the run"
    return figures


def _evaluation(root: Path) -> dict | None:
    """``tera evaluate``'s report beside the store, when it is about this store."""
    path = root.parent / f"{root.stem}.evaluation.json"  # as tera_pipeline.report names it
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if Path(report.get("store", "")).resolve() != root.resolve():
        return None
    return report


def _cost(figures: dict) -> str:
    measured = figures.get("E_measured")
    return f"{figures['E']:g}" + (f" (measured {measured:g})" if measured is not None else "")


def markdown(figures: dict) -> str:
    """The figures as markdown: a summary table and one row per phase."""

    def fmt(value, digits: int = 3) -> str:
        return "not measured" if value is None else f"{value:.{digits}f}"

    times = figures.get("step_s") or []
    per_step = (
        f"{figures['time_per_step_s']:.2f} s (min {min(times):.2f}, max {max(times):.2f})"
        if times
        else "-"
    )
    pyramid = figures.get("pyramid") or {}
    levels = " → ".join("×".join(map(str, lvl["shape"])) for lvl in pyramid.get("levels", []))
    rows = [
        ("store", f"`{figures['store']}`"),
        ("status", figures.get("status") or "-"),
        ("shape (c, z, y, x)", " × ".join(map(str, figures["shape_czyx"]))),
        ("spacing (µm, z y x)", " × ".join(f"{s:g}" for s in figures["spacing_um"])),
        ("voxels", f"{figures['voxels']:,}"),
        ("blocks", f"{figures['blocks']:,} of {' × '.join(map(str, figures['block']))}"),
        ("DDIM steps", str(figures["steps"])),
        ("time per step", per_step),
        ("E: patch evaluations per voxel and step", _cost(figures)),
        ("model evaluations per voxel", f"{figures['model_evaluations_per_voxel']:g}"),
        ("pyramid levels", levels or "-"),
        ("conditioning fidelity r", fmt(figures.get("fidelity_r"))),
        ("seam score (1 = seamless)", fmt(figures.get("seam_score"))),
    ]
    if "seam_score_final_lattice" in figures:
        rows.append(("seam score, last step's lattice", fmt(figures["seam_score_final_lattice"])))
        rows.append(("seam score, mean over the steps' lattices",
                     fmt(figures["seam_score_all_lattices"])))  # fmt: skip
    if "seam_score_naive_tiling" in figures:
        rows.append(("seam score, naive tiling", fmt(figures["seam_score_naive_tiling"])))
    if "measured_by" in figures:
        rows.append(("fidelity and seams measured by", figures["measured_by"]))
    lines = ["| figure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    if figures.get("phases"):
        lines += ["", "| phase | blocks run | wall (s) | patches | model (s) |"]
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for p in figures["phases"]:
            lines.append(
                f"| {p['phase']} | {p['blocks']} | {p['wall_s']:.2f} | {p.get('patches', 0)} "
                f"| {p.get('model_s', 0):.2f} |"
            )
    return "\n".join(lines) + "\n"
