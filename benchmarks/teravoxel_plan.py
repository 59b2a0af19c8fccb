"""Planning a teravoxel job (10,000³ voxels per stain; prints JSON).

Times and measures the driver's work before any denoising: preflight, store creation (every
array, coordinates, the ledger), walking the block grid of the first step from the ledger, and
submitting the first wave of block tasks to a real Dask cluster (then cancelled).

    python benchmarks/teravoxel_plan.py [--shape 10000,10000,10000]
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
from tera_pipeline.generation import block_step, lifecycle
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.storage import ledger


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="10000,10000,10000")
    p.add_argument("--block", default="16,128,128")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = JobConfig.model_validate(
            {
                "out": str(Path(tmp) / "tera.zarr"),
                "volume": {"shape": shape},
                "storage": {"block": block},
                "check_disk_space": False,  # only the plan is made: nothing near 4 TB is written
            }
        )
        t0 = time.perf_counter()
        checkpoint = lifecycle.prepare_store(job)
        timings["prepare_store_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        todo = sum(1 for _ in ledger.pending(job.out, 1))
        timings["walk_first_step_s"] = time.perf_counter() - t1
        with cluster_client(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as c:
            t2 = time.perf_counter()
            wave = tasks.in_flight(job, c)
            futures = [
                c.submit(block_step.denoise_block, job, str(checkpoint), 0, index, pure=False)
                for _, index in zip(range(wave), ledger.pending(job.out, 1))
            ]
            timings["submit_first_wave_s"] = time.perf_counter() - t2
            c.cancel(futures)
    total = sum(timings.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "benchmark": "teravoxel_plan",
                "shape": list(shape),
                "block": list(block),
                "voxels": 2 * shape[0] * shape[1] * shape[2],
                "blocks": job.grid().num_blocks,
                "blocks_pending_step_1": todo,
                "first_wave": wave,
                **{k: round(v, 2) for k, v in timings.items()},
                "total_s": round(total, 2),
                "driver_peak_rss_mib": round(peak, 1),
                "targets": {"total_s": 60, "rss_mib": 2048},
                "pass": total < 60 and peak < 2048,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
