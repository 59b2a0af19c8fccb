"""Throughput with 1 and with 2 workers on the same job, in one run (prints JSON).

python benchmarks/scaling.py [--steps 2] [--shape 16,256,256]
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


def throughput(shape, steps: int, workers: int, out: Path) -> float:
    """Output voxel-steps per second of the step phases."""
    job = JobConfig.model_validate(
        {
            "out": str(out),
            "volume": {"shape": shape},
            "diffusion": {"steps": steps},
        }
    )
    with cluster_client(ClusterSpec(kind="local", workers=workers, dashboard_address=":0")) as c:
        reports = lifecycle.generate(job, c)
    wall = sum(r.wall_s for r in reports if r.phase.startswith("step"))
    return 2 * shape[0] * shape[1] * shape[2] * steps / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--shape", default="16,256,256")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        one = throughput(shape, args.steps, 1, Path(tmp) / "one.zarr")
        two = throughput(shape, args.steps, 2, Path(tmp) / "two.zarr")
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "shape": list(shape),
                "steps": args.steps,
                "voxel_steps_per_s_1_worker": round(one, 1),
                "voxel_steps_per_s_2_workers": round(two, 1),
                "speedup": round(two / one, 3),
                "target_speedup": 1.7,
                "wall_s": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
