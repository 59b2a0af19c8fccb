"""Quality against cost of the lattice modes and samplers, side by side in one run.

For each mode, on the demo job (16 x 256 x 256, synthetic brain, the committed denoiser) and
optionally a larger one: E (patch evaluations per voxel and step; also for the geometry of a
10,000^3 job), model evaluations per voxel, the generation's wall time, the seam scores (at the
stride's faces, at the last step's lattice, averaged over every step's lattice), conditioning
fidelity, SSIM / PSNR against the synthetic truth, nuclei counted against the truth's, and
MagNet's cycle consistency (PCC per bin). Then the quality-against-steps curve of both samplers
in one mode. Every store is written in a temporary folder of this run and removed after it is
measured. Prints JSON (``--out`` also writes it).

    python benchmarks/sampling_modes.py --out docs/sampling_modes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tera_pipeline.analysis import magnet  # noqa: E402
from tera_pipeline.core.config import ClusterSpec, JobConfig  # noqa: E402
from tera_pipeline.evaluation.fidelity import conditioning_fidelity  # noqa: E402
from tera_pipeline.evaluation.metrics import compare_to_truth, run_seam_scores  # noqa: E402
from tera_pipeline.evaluation.report import nuclei_counts, synthetic_truth  # noqa: E402
from tera_pipeline.generation import lifecycle  # noqa: E402
from tera_pipeline.runtime.cluster import cluster_client  # noqa: E402
from tera_pipeline.storage import store  # noqa: E402

SHIFTED = {"lattice.mode": "shifted", "lattice.stride": (4, 32, 32)}
VOXEL_SHIFTS = SHIFTED | {"lattice.shift_unit": "voxel"}
Z_SHIFTED = {"lattice.mode": "shifted", "lattice.stride": (4, 16, 16)}
DDIM10 = {"diffusion.steps": 10}
DPM = {"diffusion.sampler": "dpmpp_2m"}
OVERLAPPED = {"lattice.mode": "overlapped", "lattice.stride": (2, 16, 16)}
"""The default lattice before the z-shifted one."""
MODES: dict[str, dict] = {
    "overlapped, DDIM 15 (before)": OVERLAPPED,
    "overlapped, DDIM 10": OVERLAPPED | DDIM10,
    "overlapped, DPM-Solver++ 10": OVERLAPPED | DPM | {"diffusion.steps": 10},
    "overlapped, DPM-Solver++ 8": OVERLAPPED | DPM | {"diffusion.steps": 8},
    "overlapped in-plane, z non-overlapping unshifted (stride 4,16,16), DDIM 15": OVERLAPPED
    | {"lattice.stride": (4, 16, 16)},
    "overlapped in-plane, z shifted, DDIM 15": Z_SHIFTED,
    "overlapped in-plane, z shifted, DPM-Solver++ 10": Z_SHIFTED | DPM | {"diffusion.steps": 10},
    "overlapped in-plane, z shifted, DPM-Solver++ 8": Z_SHIFTED | DPM | {"diffusion.steps": 8},
    "overlapped in z, in-plane non-overlapping (stride 2,32,32), DDIM 15": OVERLAPPED
    | {"lattice.stride": (2, 32, 32)},
    "shifted by bins, DDIM 15": SHIFTED,
    "shifted by bins, DPM-Solver++ 10": SHIFTED | DPM | {"diffusion.steps": 10},
    "shifted by bins + last step overlapped, DPM-Solver++ 10": SHIFTED
    | DPM
    | {"diffusion.steps": 10, "lattice.overlapped_final_steps": 1},
    "shifted by voxels, DDIM 15": VOXEL_SHIFTS,
    "shifted by voxels, DPM-Solver++ 10": VOXEL_SHIFTS | DPM | {"diffusion.steps": 10},
}
CURVE_MODES = {"overlapped": OVERLAPPED, "z-shifted": Z_SHIFTED, "shifted": SHIFTED}
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
    row = {
        "E": round(e, 3),
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


# Each benchmark is a standalone script with options of its own; their declarations share a
# shape on purpose.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256", help="the demo job's volume")
    p.add_argument("--large", default="", help="a larger volume, e.g. 32,512,512 (default: none)")
    p.add_argument("--large-modes", default="", help="';'-separated modes run on --large too")
    p.add_argument("--curve-mode", default="z-shifted", choices=sorted(CURVE_MODES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="", help="';'-separated mode names (default: all)")
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="tera-sampling-modes-"))
    result: dict = {"shape": shape, "workers": args.workers, "modes": {}, "curve": {}}
    spec = ClusterSpec(kind="local", workers=args.workers, dashboard_address=":0")
    try:
        with cluster_client(spec) as client:
            names = [n for n in MODES if not args.only or n in args.only.split(";")]
            for i, name in enumerate(names):
                job = JobConfig(out=work / f"m{i}.zarr").with_overrides(
                    **{"volume.shape": shape, **MODES[name]}
                )
                result["modes"][name] = measure(job, client)
                print(name, json.dumps(result["modes"][name]), file=sys.stderr, flush=True)
            if args.large:
                large = tuple(int(v) for v in args.large.split(","))
                result["large"] = {"shape": large, "modes": {}}
                for name in [n for n in names if n in args.large_modes.split(";")]:
                    job = JobConfig(out=work / "large.zarr").with_overrides(
                        **{"volume.shape": large, **MODES[name]}
                    )
                    result["large"]["modes"][name] = measure(job, client)
                    print("large", name, file=sys.stderr, flush=True)
            base = CURVE_MODES[args.curve_mode]
            for sampler in () if args.no_curve else ("ddim", "dpmpp_2m"):
                for steps in STEPS:
                    job = JobConfig(out=work / "c.zarr").with_overrides(
                        **{
                            "volume.shape": shape,
                            "diffusion.sampler": sampler,
                            "diffusion.steps": steps,
                            **base,
                        }  # fmt: skip
                    )
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
