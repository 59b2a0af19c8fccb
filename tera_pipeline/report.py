"""``tera evaluate``: one JSON and one PNG report on a generated store.

(a) conditioning fidelity, (b) seam scores of the engine and of naive tiling (each patch
denoised on its own: the same job with stride = patch, so no halo and no blending) on the same
input and seed, (c) SSIM / PSNR per slice against the synthetic ground truth where there is one,
(d) detected nuclei (count, sizes) against the conditioning's cells.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tera_pipeline import engine, store
from tera_pipeline.conditioning import bin_box
from tera_pipeline.config import JobConfig
from tera_pipeline.evaluate import compare_to_truth, detect_nuclei, seam_score
from tera_pipeline.geometry import Box
from tera_pipeline.quality import conditioning_fidelity
from tera_pipeline.synthetic import SyntheticBrain

MAX_NUCLEI_VOXELS = 64 * 1024 * 1024  # larger volumes: nuclei measured on the central block


def job_of(root: Path) -> JobConfig:
    """The job that wrote the store at ``root``, with ``out`` pointing at it."""
    attrs = store.group_attrs(root)
    if "tera_pipeline" not in attrs:
        raise store.StoreError(f"{root} is not a tera-pipeline store (no tera_pipeline attributes)")
    job = JobConfig.model_validate(attrs["tera_pipeline"]["config"])
    return job.model_copy(update={"out": Path(root)})  # the store may have moved or been copied


def naive_tiling_job(job: JobConfig, out: Path) -> JobConfig:
    """The same job with non-overlapping patches: every patch denoised on its own."""
    return job.with_overrides(out=str(out), **{"lattice.stride": job.lattice.patch})


def evaluate(root: Path, client, out_dir: Path | None = None) -> dict:
    """Measure a store and write ``evaluation.json`` and ``evaluation.png`` next to it."""
    root = Path(root)
    job = job_of(root)
    out_dir = Path(out_dir or root.parent)
    naive = naive_tiling_job(job, out_dir / f"{root.stem}.naive-tiling.zarr")
    engine.generate(naive, client, overwrite=True)

    stride, patch = job.lattice.stride, job.lattice.patch
    report: dict = {
        "store": str(root),
        "fidelity": conditioning_fidelity(root),
        "seams": {
            "engine": seam_score(root, (stride[1], stride[2])),
            "naive_tiling": seam_score(naive.out, (patch[1], patch[2])),
            "engine_at_naive_faces": seam_score(root, (patch[1], patch[2])),
        },
    }
    truth = None
    if job.conditioning.source == "synthetic":
        brain = SyntheticBrain(job.synthetic_seed, job.volume.spacing_um)
        _, ny, nx = job.volume.shape

        def truth(z: int) -> np.ndarray:
            return brain.render(Box((z, 0, 0), (1, ny, nx)))[:, 0]

        report["truth"] = compare_to_truth(root, truth)
    report["nuclei"] = _nuclei(root, job, truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    _plot(report, out_dir / "evaluation.png")
    return report


def _nuclei(root: Path, job: JobConfig, truth) -> dict:
    vol = job.volume.shape
    box = Box((0, 0, 0), vol)
    if np.prod(vol) > MAX_NUCLEI_VOXELS:
        box = job.grid().block(tuple(n // 2 for n in job.grid().shape)).core
    dapi = store.read_box(store.open_array(root, engine.IMAGE), box)[0]
    counts = store.read_box(
        store.open_array(root, engine.CELL_COUNT), bin_box(box, job.conditioning.bin)
    )
    result = {
        "box": str(box),
        "cells_in_conditioning": int(counts.sum()),
        "generated": detect_nuclei(dapi, job.volume.spacing_um),
    }
    if truth is not None:
        ref = np.stack([truth(z)[0] for z in range(box.begin[0], box.end[0])])
        ref = ref[:, box.begin[1] : box.end[1], box.begin[2] : box.end[2]]
        result["ground_truth"] = detect_nuclei(ref, job.volume.spacing_um)
    return result


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    seams = report["seams"]
    names = ["engine", "naive_tiling"]
    values = [seams[n]["seam_score"] for n in names]
    ax[0].bar(["engine\n(exact halo)", "naive tiling"], values, color=["tab:green", "tab:red"])
    ax[0].axhline(1.0, color="k", lw=0.8, ls="--")
    ax[0].set_title("seam score (1 = seamless)")
    for i, v in enumerate(values):
        ax[0].text(i, v, f"{v:.3f}", ha="center", va="bottom")
    fid = report["fidelity"]
    ax[1].bar(["Pearson r"], [fid["pearson_r"]], color="tab:blue")
    ax[1].axhline(0.6, color="k", lw=0.8, ls="--")
    ax[1].set_ylim(0, 1)
    ax[1].set_title(f"DAPI per bin vs cells per bin: r = {fid['pearson_r']:.3f}")
    if "truth" in report:
        ssim = np.asarray(report["truth"]["ssim_per_slice"])
        for c in range(ssim.shape[1]):
            ax[2].plot(ssim[:, c], marker="o", label=["DAPI", "PolyT"][c] if c < 2 else str(c))
        ax[2].set_xlabel("z slice")
        ax[2].set_title("SSIM against the synthetic ground truth")
        ax[2].legend()
    nuc = report["nuclei"]
    bins = np.linspace(0, 12, 25)
    ax[3].hist(nuc["generated"]["radius_um"], bins=bins, alpha=0.6, label="generated")
    if "ground_truth" in nuc:
        ax[3].hist(nuc["ground_truth"]["radius_um"], bins=bins, alpha=0.6, label="ground truth")
    ax[3].set_xlabel("equivalent radius (µm)")
    ax[3].set_title(
        f"nuclei: {nuc['generated']['count']} generated, "
        f"{nuc.get('ground_truth', {}).get('count', '?')} truth, "
        f"{nuc['cells_in_conditioning']} cells"
    )
    ax[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
