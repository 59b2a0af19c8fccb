"""Efficiency of the engine: the denoiser's own compute time over (wall time x workers).

Runs the demo's job (default model and layout) for a few steps on a local cluster and divides
the summed time inside the denoiser by the step phases' wall time times the worker count; the
end-to-end figure also counts store creation, conditioning and finalisation. Prints JSON.

    python benchmarks/efficiency.py [--steps 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tera_pipeline.core.cluster_spec import ClusterSpec
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle
from tera_pipeline.runtime.cluster import cluster_client


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shape", default="16,256,256")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    spec = ClusterSpec(kind="local", workers=args.workers, dashboard_address=":0")
    with tempfile.TemporaryDirectory() as tmp, cluster_client(spec) as client:
        job = JobConfig.model_validate(
            {
                "out": str(Path(tmp) / "e.zarr"),
                "volume": {"shape": shape},
                "diffusion": {"steps": args.steps},
            }
        )
        t0 = time.perf_counter()
        reports = lifecycle.generate(job, client)
        end_to_end = time.perf_counter() - t0
    steps = [r for r in reports if r.phase.startswith("step")]
    model = sum(r.stats.model_s for r in steps)
    wall = sum(r.wall_s for r in steps)
    voxels = 2 * shape[0] * shape[1] * shape[2]
    print(
        json.dumps(
            {
                "benchmark": "efficiency",
                "shape": list(shape),
                "steps": args.steps,
                "workers": args.workers,
                "patches_per_step": steps[0].stats.items,
                "denoiser_s": round(model, 2),
                "step_wall_s": round(wall, 2),
                "end_to_end_s": round(end_to_end, 2),
                "efficiency_steps": round(model / (wall * args.workers), 3),
                "efficiency_end_to_end": round(model / (end_to_end * args.workers), 3),
                "output_voxels_per_s_per_step": round(voxels / wall, 1),
                "target": 0.85,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
