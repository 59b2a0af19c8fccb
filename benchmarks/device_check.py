"""The GPU check, prepared for the first device machine lent: one script, one call, under 8 minutes.

1. A cluster of kind ``auto``: dask-cuda, one worker per GPU, where there is a GPU.
2. A generation at the default model and mode: output voxels per second over all steps (the
   figure Tera-MIND reports: about 1.6e5 per A100, all steps included).
3. The engine's ceiling: the same job with a zero-cost denoiser (``engine_ceiling``).
4. Bitwise equality of the image for two block sizes, on this device.
5. Two blocks sharing each GPU (``cluster.blocks_per_gpu``, the default 2: one block's reads and
   writes overlap the other's model) against one, side by side.

``--dry`` runs it all on CPUs at a toy size: CI runs it so, and it must pass there before a
device is lent. Prints JSON (``--out`` also writes it). On the device (see
``benchmarks/device_check.sh`` for the wheels it carries):

    python benchmarks/device_check.py --out $OUT/device_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from engine_ceiling import ZeroCostDenoiser  # noqa: E402

from tera_pipeline.core.cluster_spec import ClusterSpec  # noqa: E402
from tera_pipeline.core.config import JobConfig  # noqa: E402
from tera_pipeline.core.geometry import Box  # noqa: E402
from tera_pipeline.generation import lifecycle  # noqa: E402
from tera_pipeline.runtime.cluster import cluster_client  # noqa: E402
from tera_pipeline.storage import layout, store  # noqa: E402

TERA_MIND_VOXELS_PER_S = 1.6e5
"""Tera-MIND's output voxels per second per A100, all steps included (shared/REFERENCE.md)."""
SIZES = {
    "device": {"shape": (16, 512, 512), "blocks": ((16, 128, 128), (16, 256, 256))},
    "dry": {"shape": (8, 64, 64), "blocks": ((4, 32, 32), (8, 64, 64))},
}


def _generate(job: JobConfig, client) -> dict:
    t0 = time.perf_counter()
    reports = lifecycle.generate(job, client)
    wall = time.perf_counter() - t0
    steps = [r for r in reports if r.phase.startswith("step") or r.phase == "image"]
    steps_s = sum(r.wall_s for r in steps)
    voxels = int(np.prod(job.volume.shape))
    return {
        "end_to_end_s": round(wall, 2),
        "steps_s": round(steps_s, 2),
        "output_voxels_per_s": round(voxels / steps_s),
        "model_s": round(sum(r.stats.model_s for r in steps), 2),
    }


def _image(job: JobConfig) -> np.ndarray:
    array = store.open_array(job.out, layout.IMAGE)
    return store.read_box(array, Box((0, 0, 0), job.volume.shape))


def check(dry: bool, steps: int | None) -> dict:
    size = SIZES["dry" if dry else "device"]
    spec = ClusterSpec(kind="local" if dry else "auto", workers=1 if dry else None)
    overrides = {"volume.shape": size["shape"]}
    if steps:
        overrides["diffusion.steps"] = steps
    result: dict = {
        "dry": dry,
        "host": platform.node(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with tempfile.TemporaryDirectory(prefix="tera-device-check-") as tmp:
        jobs = [
            JobConfig(out=Path(tmp) / f"b{i}.zarr").with_overrides(
                **overrides, **{"storage.block": block}
            )
            for i, block in enumerate(size["blocks"])
        ]
        with cluster_client(spec) as client:
            result["workers"] = len(client.scheduler_info()["workers"])
            result["job"] = {
                "shape": list(jobs[0].volume.shape),
                "lattice": jobs[0].lattice.mode,
                "wrapped": jobs[0].lattice.wrap,
                "sampler": jobs[0].diffusion.sampler,
                "steps": jobs[0].diffusion.steps,
                "E": round(jobs[0].evaluations_per_voxel(), 3),
            }
            result["generation"] = {str(j.storage.block): _generate(j, client) for j in jobs}
        images = [_image(j) for j in jobs]
        result["bitwise_equal_across_block_sizes"] = bool(np.array_equal(*images))
        result["image_std"] = float(images[0].std())
        zero = jobs[0].with_overrides(out=str(Path(tmp) / "zero.zarr"))
        with cluster_client(spec) as client:
            client.register_plugin(ZeroCostDenoiser())
            result["engine_ceiling"] = _generate(zero, client)
        alone = jobs[0].with_overrides(out=str(Path(tmp) / "alone.zarr"))
        with cluster_client(spec.model_copy(update={"blocks_per_gpu": 1})) as client:
            result["one_block_per_gpu"] = _generate(alone, client)
        result["blocks_per_gpu"] = spec.blocks_per_gpu
        result["two_blocks_per_gpu_speedup"] = round(
            result["one_block_per_gpu"]["steps_s"]
            / result["generation"][str(jobs[0].storage.block)]["steps_s"],
            3,
        )
    real = result["generation"][str(jobs[0].storage.block)]
    result["output_voxels_per_s_per_worker"] = round(
        real["output_voxels_per_s"] / result["workers"]
    )
    result["against_tera_mind"] = round(
        result["output_voxels_per_s_per_worker"] / TERA_MIND_VOXELS_PER_S, 3
    )
    return result


# Each benchmark is a standalone script with options of its own.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPUs, a toy size (CI)")
    p.add_argument("--steps", type=int, default=None, help="default: the job's")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    text = json.dumps(check(args.dry, args.steps), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
