"""``tera evaluate``: one JSON and one PNG report on a generated store.

(a) conditioning fidelity, (b) seam scores of the engine and of naive tiling (each patch
denoised on its own: the same job with stride = patch, so no halo and no blending) on the same
input and seed, (c) SSIM / PSNR per slice against the synthetic ground truth where there is one,
(d) detected nuclei (count, sizes) against the conditioning's cells.

It only measures finished stores, and it never deletes or overwrites what it did not write: the
report is ``<store name>.evaluation.json`` and ``.evaluation.png`` (one pair per store, each
marked as written by ``tera evaluate`` for that store), and the naive-tiling run goes to a fresh
temporary folder inside the report folder, removed entry by entry afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.evaluation.fidelity import conditioning_fidelity
from tera_pipeline.evaluation.metrics import (
    compare_to_truth,
    detect_nuclei,
    run_seam_scores,
    seam_score,
)
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs.synthetic import SyntheticBrain
from tera_pipeline.storage import atomic, layout, ledger, lock, store
from tera_pipeline.storage.layout import job_of

log = logging.getLogger(__name__)

MAX_NUCLEI_VOXELS = 64 * 1024 * 1024  # larger volumes: nuclei measured on the central block
WRITER = "tera evaluate"  # the marker in every report file this module writes


class EvaluateError(TeraError):
    """A store that cannot be evaluated, or an output path that is not ours to write."""


def store_name(root: Path) -> str:
    """The name a store's outputs are named after: ``demo.zarr`` -> ``demo``."""
    return Path(root).stem


def report_paths(root: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Where the report on ``root`` goes: ``<name>.evaluation.json`` and ``.png`` in
    ``out_dir`` (default: beside the store)."""
    root = Path(root)
    folder = Path(out_dir) if out_dir is not None else root.parent
    name = store_name(root)
    return folder / f"{name}.evaluation.json", folder / f"{name}.evaluation.png"


def check_finished(root: Path) -> None:
    """Raise unless the store's run completed: status ``complete`` and every phase done."""
    root = Path(root)
    attrs = store.group_attrs(root).get("tera_pipeline", {})
    state = attrs.get("status", "unknown")
    if state != "complete":
        raise EvaluateError(f"cannot evaluate {root}: {_unfinished(root, state)}")
    try:
        phases = ledger.progress(root)
    except store.StoreError:
        return  # no ledger to cross-check; the status is the record
    steps = attrs.get("config", {}).get("diffusion", {}).get("steps", len(phases))
    for phase, (done, total) in enumerate(phases):
        if done < total:
            name = ledger.phase_name(phase, steps)
            raise EvaluateError(
                f"cannot evaluate {root}: its status is complete but its ledger has {name} "
                f"at {done} of {total} blocks done"
            )


def _unfinished(root: Path, state: str) -> str:
    """One clause on why a store with status ``state`` is not finished."""
    if state == "running":
        try:
            owner = lock.read(root)
        except lock.LockError:
            owner = None
        if owner is not None and lock.alive(owner):
            return (f"it is still being generated (status 'running', held by "
                    f"{lock.describe(owner)}); evaluate it once it is complete")  # fmt: skip
        return ("its run stopped before it finished (status 'running', no live run holds it); "
                "finish it with tera generate --resume")  # fmt: skip
    return f"its status is {state!r}, not 'complete'; only a finished store can be evaluated"


def identity(root: Path) -> dict:
    """What ties a report to its store: the store's path and its run (start, config hash)."""
    root = Path(root)
    attrs = store.group_attrs(root).get("tera_pipeline", {})
    run = {"started": attrs.get("started"), "seed": attrs.get("seed"),
           "config_sha256": ledger.identity_hash(attrs.get("config", {}))}  # fmt: skip
    return {"writer": WRITER, "store": str(root.resolve()), "run": run}


def _ours(existing: dict | None, mine: dict) -> bool:
    """Whether a report file's marker says this module wrote it for this store (the same path,
    or the same run when the store and its reports were moved together)."""
    if not isinstance(existing, dict) or existing.get("writer") != WRITER:
        return False
    return existing.get("store") == mine["store"] or existing.get("run") == mine["run"]


def _json_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


def _png_marker(path: Path) -> dict | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get("tera-evaluate", ""))
    except (OSError, ValueError, AttributeError):
        return None


def check_outputs(root: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """The report paths, after checking that each is free or this store's own earlier report;
    raise naming the first path that holds anything else."""
    mine = identity(root)
    paths = report_paths(root, out_dir)
    for path, marker in zip(paths, (_json_marker, _png_marker), strict=True):
        if (path.exists() or path.is_symlink()) and not (
            path.is_file() and not path.is_symlink() and _ours(marker(path), mine)
        ):
            raise EvaluateError(
                f"{path} already exists and is not tera evaluate's report on {root}; "
                "move it away or pass another --out"
            )
    return paths


def naive_tiling_job(job: JobConfig, out: Path) -> JobConfig:
    """The same job with non-overlapping patches on one fixed lattice (not moved between steps,
    not wrapped): every patch denoised on its own, its faces the same at every step.

    A block must be a whole number of strides, and here the stride is the patch, so the block
    becomes the least common multiple of the job's block and the patch (per axis), with the
    default shard and chunk for it. The patch lattice does not depend on the block, so neither
    do the output voxels."""
    patch = job.lattice.patch
    block = tuple(math.lcm(b, p) for b, p in zip(job.storage.block, patch, strict=True))
    overrides: dict = {"lattice.stride": patch, "lattice.mode": "overlapped", "lattice.wrap": False}
    if block != tuple(job.storage.block):
        overrides.update({"storage.block": block, "storage.shard": None, "storage.chunk": None})
    return job.with_overrides(out=str(out), **overrides)


def evaluate(root: Path, client, out_dir: Path | None = None) -> dict:
    """Measure a finished store and write ``<name>.evaluation.json`` and ``.png`` (in
    ``out_dir``, default beside the store)."""
    root = Path(root)
    check_finished(root)
    job = job_of(root)
    json_path, png_path = check_outputs(root, out_dir)
    out_dir = json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = identity(root)

    scratch = Path(tempfile.mkdtemp(prefix=f".{store_name(root)}.evaluate-", dir=out_dir))
    naive = naive_tiling_job(job, scratch / f"{store_name(root)}.naive-tiling.zarr")
    try:
        lifecycle.generate(naive, client)
        report = _measure(root, job, naive)
    finally:
        _remove_scratch(scratch, naive)

    report = {"written_by": mine, **report}
    check_outputs(root, out_dir)  # again: the naive run can take long, and the folder is shared
    atomic.write_bytes(json_path, json.dumps(report, indent=2).encode())
    _plot(report, png_path, mine)
    return report


def _remove_scratch(scratch: Path, naive: JobConfig) -> None:
    """Remove what the naive run wrote in ``scratch`` (its store, its staging folder), then the
    folder itself, which ``tempfile.mkdtemp`` created for this run alone."""
    out = Path(naive.out)
    for entry in (out, out.parent / f".{out.name}.cells-staging"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    store.forget_handles()
    try:
        scratch.rmdir()
    except OSError as err:  # something else appeared in it: leave it
        log.warning("left %s in place: %s", scratch, err)


def _measure(root: Path, job: JobConfig, naive: JobConfig) -> dict:
    stride, patch = job.lattice.stride, job.lattice.patch
    report: dict = {
        "store": str(root.resolve()),
        "fidelity": conditioning_fidelity(root),
        "seams": {
            "engine": seam_score(root, (stride[1], stride[2])),
            "naive_tiling": seam_score(naive.out, (patch[1], patch[2])),
            "engine_at_naive_faces": seam_score(root, (patch[1], patch[2])),
        },
    }
    lattices = run_seam_scores(root, job)
    report["seams"]["engine_last_lattice"] = {"seam_score": lattices["seam_score_final_lattice"]}
    report["seams"]["engine_all_lattices"] = {"seam_score": lattices["seam_score_all_lattices"]}
    truth = synthetic_truth(job)
    if truth is not None:
        report["truth"] = compare_to_truth(root, truth)
    report["nuclei"] = nuclei_counts(root, job, truth)
    return report


def synthetic_truth(job: JobConfig) -> Callable[[int], np.ndarray] | None:
    """For a job conditioned on the synthetic brain, its render slice by slice: ``truth(z)``
    is (c, y, x) uint8. None for other sources."""
    if job.conditioning.source != "synthetic":
        return None
    brain = SyntheticBrain(job.synthetic_seed, job.volume.spacing_um)
    _, ny, nx = job.volume.shape

    def truth(z: int) -> np.ndarray:
        return brain.render(Box((z, 0, 0), (1, ny, nx)))[:, 0]

    return truth


def nuclei_counts(root: Path, job: JobConfig, truth) -> dict:
    """Nuclei detected in the generated DAPI (and in ``truth``'s, if given) of the volume, or of
    its central block when the volume is large."""
    vol = job.volume.shape
    box = Box((0, 0, 0), vol)
    if np.prod(vol) > MAX_NUCLEI_VOXELS:
        box = job.grid().block(tuple(n // 2 for n in job.grid().shape)).core
    dapi = store.read_box(store.open_array(root, layout.IMAGE), box)[0]
    counts = store.read_box(
        store.open_array(root, layout.CELL_COUNT), bin_box(box, job.conditioning.bin)
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


def _plot(report: dict, path: Path, mine: dict) -> None:
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
    try:
        buffer = io.BytesIO()
        meta = {"Software": WRITER, "tera-evaluate": json.dumps(mine)}
        fig.savefig(buffer, format="png", dpi=80, metadata=meta)
        atomic.write_bytes(path, buffer.getvalue())
    finally:
        plt.close(fig)
