"""Peak worker memory against volume size at a fixed block size (prints JSON).

Runs the engine twice, on a volume V and on 8 V (2x per axis), each on a fresh two-worker
LocalCluster, and reads every worker's peak resident set size (ru_maxrss) after the run.

    python benchmarks/memory_scaling.py [--steps 2] [--base 16,128,128] [--block 16,128,128]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from tera_pipeline.core.cluster_spec import ClusterSpec
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle
from tera_pipeline.runtime.cluster import cluster_client


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(shape, block, steps: int, workers: int, checkpoint: str | None, out: Path) -> dict:
    job = JobConfig.model_validate(
        {
            "out": str(out),
            "volume": {"shape": shape},
            "storage": {"block": block},
            "diffusion": {"steps": steps},
            "checkpoint": checkpoint,
        }
    )
    t0 = time.perf_counter()
    with cluster_client(ClusterSpec(kind="local", workers=workers, dashboard_address=":0")) as c:
        lifecycle.generate(job, c)
        peaks = sorted(c.run(_peak_rss_mib).values())
    return {
        "shape": list(shape),
        "voxels": int(shape[0] * shape[1] * shape[2]) * 2,
        "blocks": job.grid().num_blocks,
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_worker_rss_mib": round(max(peaks), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--base", default="16,128,128")
    p.add_argument("--block", default="16,128,128")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args()
    base = tuple(int(v) for v in args.base.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    big = tuple(2 * v for v in base)
    with tempfile.TemporaryDirectory() as tmp:
        small = run(base, block, args.steps, args.workers, args.checkpoint, Path(tmp) / "s.zarr")
        large = run(big, block, args.steps, args.workers, args.checkpoint, Path(tmp) / "l.zarr")
    growth = large["peak_worker_rss_mib"] / small["peak_worker_rss_mib"] - 1.0
    print(
        json.dumps(
            {
                "benchmark": "memory_scaling",
                "block": list(block),
                "steps": args.steps,
                "small": small,
                "large": large,
                "volume_ratio": large["voxels"] / small["voxels"],
                "peak_rss_growth": round(growth, 4),
                "target_growth_below": 0.20,
                "pass": growth < 0.20,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
