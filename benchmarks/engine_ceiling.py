"""The engine's ceiling: generation with a zero-cost denoiser, against the real one, in one run.

The same job runs twice on one local cluster per block size: once with the committed denoiser,
once with a stand-in that returns zeros at once (installed on every worker by a Dask worker
plugin, so the library carries no test hook). With the model's time gone, what is left is the
engine's own work: reading and decoding the state, gathering patches, blending, the DDIM update
and noise, encoding and writing, seams, and scheduling. Prints JSON: voxel-steps/s per worker
and where the time goes, at each block size, with the real denoiser's step time for the ratio.

    python benchmarks/engine_ceiling.py [--shape 16,256,256] [--blocks 16,128,128 16,64,64]
                                        [--steps 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from tera_pipeline.core.config import ClusterSpec, JobConfig
from tera_pipeline.generation import lifecycle
from tera_pipeline.runtime.cluster import cluster_client


class _ZeroPredictor:
    """The real predictor's interface (``meta``, ``config``), with a prediction that costs
    nothing: zeros of the output's shape."""

    def __init__(self, real) -> None:
        self.meta, self.config = real.meta, real.config

    def __call__(self, x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        return np.zeros(x.shape, dtype=np.float32)


class ZeroCostDenoiser(WorkerPlugin):
    """Makes every block step on this worker use ``_ZeroPredictor``."""

    name = "zero-cost-denoiser"

    def setup(self, worker) -> None:
        from tera_pipeline.generation import block_step, predictor

        def zero(checkpoint: str, batch_size: int):
            return _ZeroPredictor(predictor.get_predictor(checkpoint, batch_size))

        block_step.get_predictor = zero


def _run(shape, block, steps: int, client, out: Path) -> dict:
    job = JobConfig.model_validate(
        {
            "out": str(out),
            "volume": {"shape": list(shape)},
            "storage": {"block": list(block)},
            "diffusion": {"steps": steps},
        }
    )
    t0 = time.perf_counter()
    reports = lifecycle.generate(job, client)
    total = time.perf_counter() - t0
    denoise = [r for r in reports if r.phase.startswith("step")]
    wall = sum(r.wall_s for r in denoise)
    s = {k: sum(getattr(r.stats, k) for r in denoise) for k in ("model_s", "read_s", "write_s")}
    inside = sum(r.stats.total_s for r in denoise)
    return {
        "step_wall_s": round(wall / steps, 3),
        "end_to_end_s": round(total, 2),
        "patch_evaluations_per_step": denoise[0].stats.items,
        "blocks_s": inside,
        **s,
    }


def _breakdown(run: dict, workers: int, steps: int) -> dict:
    """Shares of the workers' time over the steps (wall x workers)."""
    budget = run["step_wall_s"] * steps * workers
    engine = run["blocks_s"] - run["model_s"] - run["read_s"] - run["write_s"]
    parts = {
        "read_and_decode": run["read_s"],
        "model": run["model_s"],
        "gather_blend_update_noise": engine,
        "encode_write_and_seams": run["write_s"],
        "scheduling_and_idle": budget - run["blocks_s"],
    }
    return {k: round(v / budget, 3) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256")
    p.add_argument("--blocks", nargs="+", default=["16,128,128", "16,64,64"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    voxel_steps = 2 * int(np.prod(shape)) * args.steps  # two stains
    results = []
    for text in args.blocks:
        block = tuple(int(v) for v in text.split(","))
        spec = ClusterSpec(kind="local", workers=args.workers, dashboard_address=":0")
        with tempfile.TemporaryDirectory() as tmp:
            with cluster_client(spec) as client:
                real = _run(shape, block, args.steps, client, Path(tmp) / "real.zarr")
            with cluster_client(spec) as client:
                client.register_plugin(ZeroCostDenoiser())
                zero = _run(shape, block, args.steps, client, Path(tmp) / "zero.zarr")
        per_worker = voxel_steps / (zero["step_wall_s"] * args.steps) / args.workers
        results.append(
            {
                "block": list(block),
                "zero_cost": {
                    "step_wall_s": zero["step_wall_s"],
                    "voxel_steps_per_s_per_worker": round(per_worker),
                    "ns_per_voxel_step_per_worker": round(1e9 / per_worker, 1),
                    "time_shares": _breakdown(zero, args.workers, args.steps),
                },
                "real_denoiser": {
                    "step_wall_s": real["step_wall_s"],
                    "time_shares": _breakdown(real, args.workers, args.steps),
                },
                "engine_share_of_a_real_step": round(zero["step_wall_s"] / real["step_wall_s"], 4),
                "patch_evaluations_per_step": real["patch_evaluations_per_step"],
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "engine_ceiling",
                "shape": list(shape),
                "steps": args.steps,
                "workers": args.workers,
                "load_average": os.getloadavg(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
