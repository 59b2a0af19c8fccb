"""Quality against cost of the lattice modes and samplers, side by side in one run.

For each mode, on the demo job (16 x 256 x 256, synthetic brain) and optionally a larger one,
with the committed denoiser (patches at any voxel of a bin) or, in the rows so named, the one
committed before it (bin-aligned patches only, taken from git at ``--before``): E (patch
evaluations per voxel and step; also for the geometry of a 10,000^3 job), model evaluations per
voxel, the generation's wall time, the seam scores (at the stride's faces, at the last step's
lattice, averaged over every step's lattice), conditioning fidelity, SSIM / PSNR against the
synthetic truth, nuclei counted against the truth's, and MagNet's cycle consistency (PCC per
bin). Then the quality-against-steps curve of both samplers in one mode. Every store is written
in a temporary folder of this run and removed after it is measured. Prints JSON (``--out`` also
writes it).

    python benchmarks/sampling_modes.py --out docs/sampling_modes.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from models.checkpoint_files import DEFAULT_DENOISER  # noqa: E402
from tera_pipeline.analysis import magnet  # noqa: E402
from tera_pipeline.core.cluster_spec import ClusterSpec  # noqa: E402
from tera_pipeline.core.config import JobConfig, lattice_preset  # noqa: E402
from tera_pipeline.evaluation.fidelity import conditioning_fidelity  # noqa: E402
from tera_pipeline.evaluation.metrics import compare_to_truth, run_seam_scores  # noqa: E402
from tera_pipeline.evaluation.report import nuclei_counts, synthetic_truth  # noqa: E402
from tera_pipeline.generation import lifecycle  # noqa: E402
from tera_pipeline.runtime.cluster import cluster_client  # noqa: E402
from tera_pipeline.storage import store  # noqa: E402

PATCH = (4, 32, 32)
SHIFTED = lattice_preset("bin-shifted", PATCH)
VOXEL_SHIFTS = lattice_preset("shifted", PATCH)
WRAPPED = lattice_preset("wrapped", PATCH)
Z_SHIFTED = lattice_preset("z-shifted", PATCH)
DPM = {"diffusion.sampler": "dpmpp_2m"}
OVERLAPPED = lattice_preset("overlapped", PATCH)
"""The default lattice before the z-shifted one."""
DDIM15 = {"diffusion.steps": 15}
BIN_ALIGNED = {"model": "bin-aligned"}
"""Rows run with the denoiser committed before sub-bin offsets (``--before``)."""
DDIM8 = {"diffusion.steps": 8}
MODES: dict[str, dict] = {
    "bin-aligned model: overlapped, DDIM 15 (the default before issue 17)": BIN_ALIGNED
    | OVERLAPPED
    | DDIM15,
    "bin-aligned model: z-shifted, DDIM 8 (the default before sub-bin offsets)": BIN_ALIGNED
    | Z_SHIFTED
    | DDIM8,
    "bin-aligned model: shifted by voxels, DDIM 8": BIN_ALIGNED | VOXEL_SHIFTS | DDIM8,
    "overlapped, DDIM 15": OVERLAPPED | DDIM15,
    "overlapped, DDIM 8": OVERLAPPED | DDIM8,
    "z-shifted, DDIM 8": Z_SHIFTED | DDIM8,
    "shifted by bins, DDIM 8": SHIFTED | DDIM8,
    "shifted by voxels, DDIM 8": VOXEL_SHIFTS | DDIM8,
    "shifted by voxels, DPM-Solver++ 8": VOXEL_SHIFTS | DPM | DDIM8,
    "wrapped, DDIM 8": WRAPPED | DDIM8,
    "wrapped, DDIM 10": WRAPPED | {"diffusion.steps": 10},
}
BEFORE_REV = "3400262"
"""The last commit whose committed denoiser took only bin-aligned patches."""
CURVE_MODES = {
    "overlapped": OVERLAPPED,
    "z-shifted": Z_SHIFTED,
    "shifted": SHIFTED,
    "voxel-shifted": VOXEL_SHIFTS,
    "wrapped": WRAPPED,
}
STEPS = (5, 8, 10, 15, 25)
BIG = (10_000, 10_000, 10_000)


def measure(job: JobConfig, client, quality: bool = True) -> dict:
    """Generate ``job`` and measure it; the store is removed afterwards."""
    t0 = time.perf_counter()
    lifecycle.generate(job, client)
    wall = time.perf_counter() - t0
    root = Path(job.out)
    phases = store.group_attrs(root)["tera_pipeline"]["run"]["phases"]
    steps_s = sum(p["wall_s"] for p in phases if p["phase"].startswith("step "))
    e = job.evaluations_per_voxel()
    evaluated = [p["patches"] for p in phases if p["phase"].startswith("step ")]
    measured = sum(evaluated) / len(evaluated) * math.prod(job.lattice.patch)
    row = {
        "E": round(e, 3),
        "E_measured": round(measured / math.prod(job.volume.shape), 3),
        "E_10000_cubed": round(
            job.with_overrides(**{"volume.shape": BIG}).evaluations_per_voxel(), 3
        ),
        "model_evaluations_per_voxel": round(e * job.diffusion.steps, 2),
        "generation_s": round(wall, 1),
        "steps_s": round(steps_s, 1),
    }
    if quality:
        row |= {k: round(v, 3) for k, v in run_seam_scores(root, job).items()}
        row["fidelity_r"] = round(conditioning_fidelity(root)["pearson_r"], 3)
        truth = synthetic_truth(job)
        row |= faces_against_interior(root, job, truth)
        against = compare_to_truth(root, truth)
        row["ssim"] = [round(v, 4) for v in against["ssim_mean"]]
        row["psnr_db"] = [round(v, 2) for v in against["psnr_mean"]]
        nuclei = nuclei_counts(root, job, truth)
        row["nuclei"] = nuclei["generated"]["count"]
        row["nuclei_truth"] = nuclei["ground_truth"]["count"]
        magnet.run(root, client)
        cycle = magnet.cycle_consistency(root)
        row["magnet_pcc_bin"] = {k: round(m["pcc_bin"], 3) for k, m in cycle.items()}
    store.forget_handles()
    shutil.rmtree(root)  # inside this run's own temporary folder
    return row


def faces_against_interior(root: Path, job: JobConfig, truth) -> dict:
    """DAPI against the synthetic truth (Pearson r per voxel) within half a patch of the
    volume's faces and in the rest: where a wrapped lattice's patch takes voxels from the
    opposite face, quality would fall first."""
    image = store.open_array(root, "image")[0].read().result().astype(np.float64)
    ref = np.stack([truth(z)[0] for z in range(image.shape[0])]).astype(np.float64)
    band = np.zeros(image.shape, bool)
    for axis, p in enumerate(job.lattice.patch):
        index = np.arange(image.shape[axis])
        near = np.minimum(index, image.shape[axis] - 1 - index) < p // 2
        band |= near.reshape([-1 if a == axis else 1 for a in range(3)])
    r = {name: float(np.corrcoef(image[m], ref[m])[0, 1]) for name, m in
         (("faces", band), ("interior", ~band))}  # fmt: skip
    return {"dapi_r_faces": round(r["faces"], 3), "dapi_r_interior": round(r["interior"], 3)}


def _checkpoint_at(revision: str, work: Path) -> Path:
    """The committed denoiser of a git revision, written into this run's folder."""
    path = work / f"denoiser-{revision}.safetensors"
    blob = subprocess.run(
        ["git", "show", f"{revision}:models/checkpoints/denoiser.safetensors"],
        cwd=HERE, capture_output=True, check=True,
    ).stdout  # fmt: skip
    path.write_bytes(blob)
    return path


def _job(out: Path, shape, mode: dict, models: dict) -> JobConfig:
    """The job of a mode: its fields, on ``shape``, with the mode's model."""
    fields = {k: v for k, v in mode.items() if k != "model"}
    checkpoint = models[mode.get("model", "default")]
    return JobConfig(out=out, checkpoint=checkpoint).with_overrides(
        **{"volume.shape": shape, **fields}
    )


# Each benchmark is a standalone script with options of its own; their declarations share a
# shape on purpose.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256", help="the demo job's volume")
    p.add_argument("--large", default="", help="a larger volume, e.g. 32,512,512 (default: none)")
    p.add_argument("--large-modes", default="", help="';'-separated modes run on --large too")
    p.add_argument("--curve-mode", default="voxel-shifted", choices=sorted(CURVE_MODES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="", help="';'-separated mode names (default: all)")
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--checkpoint", type=Path, help="the denoiser (default: the committed one)")
    p.add_argument(
        "--before",
        default=BEFORE_REV,
        help="git revision whose committed denoiser the 'bin-aligned model' rows use",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="tera-sampling-modes-"))
    result: dict = {"shape": shape, "workers": args.workers, "modes": {}, "curve": {}}
    spec = ClusterSpec(kind="local", workers=args.workers, dashboard_address=":0")
    models = {
        "default": str(args.checkpoint or DEFAULT_DENOISER),
        "bin-aligned": str(_checkpoint_at(args.before, work)),
    }
    result["checkpoints"] = models | {"bin-aligned revision": args.before}
    try:
        with cluster_client(spec) as client:
            names = [n for n in MODES if not args.only or n in args.only.split(";")]
            for i, name in enumerate(names):
                job = _job(work / f"m{i}.zarr", shape, MODES[name], models)
                result["modes"][name] = measure(job, client)
                print(name, json.dumps(result["modes"][name]), file=sys.stderr, flush=True)
            if args.large:
                large = tuple(int(v) for v in args.large.split(","))
                result["large"] = {"shape": large, "modes": {}}
                for name in [n for n in names if n in args.large_modes.split(";")]:
                    job = _job(work / "large.zarr", large, MODES[name], models)
                    result["large"]["modes"][name] = measure(job, client)
                    print("large", name, file=sys.stderr, flush=True)
            base = CURVE_MODES[args.curve_mode]
            for sampler in () if args.no_curve else ("ddim", "dpmpp_2m"):
                for steps in STEPS:
                    mode = base | {"diffusion.sampler": sampler, "diffusion.steps": steps}
                    job = _job(work / "c.zarr", shape, mode, models)
                    key = f"{args.curve_mode}, {sampler}, {steps} steps"
                    result["curve"][key] = measure(job, client)
                    print(key, json.dumps(result["curve"][key]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # this run's own mkdtemp folder
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
