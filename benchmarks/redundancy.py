"""Redundant compute and scratch traffic against block size (prints JSON).

1. From geometry alone (no model): for each block size of a sweep, on a teravoxel volume and on
   the demo's, the patch evaluations per DDIM step over the lattice's patches, the seam patches
   published, the scratch written per step over the state's bytes, the voxels read per step over
   the volume (halo reads) and the arrays one block task holds (its working set, model
   activations excluded).
   Patch counts are separable per axis, so a 10,000³ grid is counted exactly in microseconds.
   Without seam sharing a patch straddling k blocks is computed k times; with it
   (``share_seams``, the default) once, for the seam files' bytes.
2. From a real run (the demo's model, 2 x 2 x 2 blocks of the default size, first step, on a
   2-worker cluster, with and without sharing): patch evaluations, and the bytes of scratch
   written (state shards and seam files on disk) against the minimum: the state's own bytes, as
   float16 (what scratch stores) and as float32.

    python benchmarks/redundancy.py [--volume 10000,10000,10000] [--run-shape 32,256,256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import PatchLattice
from tera_pipeline.generation import lifecycle
from tera_pipeline.storage import layout

Z_BLOCKS = (8, 16, 32, 64)
YX_BLOCKS = (64, 128, 256, 512)
CHANNELS = 2
GENES = 32


def axis_counts(n: int, block: int, patch: int, stride: int) -> tuple[int, ...]:
    """Along one axis of ``n`` voxels, for blocks of ``block`` voxels: patch evaluations summed
    over blocks, lattice patches, voxels read summed over blocks, patches that stay inside the
    block holding their origin (or end at the volume's edge), and the voxels the others reach
    beyond it."""
    lattice = PatchLattice((patch,), (stride,))
    count = lattice.counts((n,))[0]
    evaluations = reads = inside = reach = 0
    for begin in range(0, n, block):
        end = min(begin + block, n)
        first = max(0, -(-(begin - patch + 1) // stride))
        last = min(count - 1, (end - 1) // stride)
        evaluations += last - first + 1
        reads += min(last * stride + patch, n) - first * stride  # the span, clipped to the volume
        owned = range(-(-begin // stride), last + 1)  # origins in the core
        inside += sum(1 for k in owned if k * stride + patch <= end or end == n)
        reach += sum(k * stride + patch - end for k in owned if k * stride + patch > end < n)
    return evaluations, count, reads, inside, reach


def geometry(volume, block, patch, stride, bins) -> dict:
    per_axis = [axis_counts(*args) for args in zip(volume, block, patch, stride)]
    evaluations = math.prod(a[0] for a in per_axis)
    lattice = math.prod(a[1] for a in per_axis)
    reads = math.prod(a[2] for a in per_axis)
    # patches that reach into another block's core: published once per step (seams.py), the
    # half beyond the face for a patch crossing one face, the whole patch across an edge
    inside = [a[3] for a in per_axis]
    seam_patches = lattice - math.prod(inside)
    faces = [(a[1] - a[3], a[4]) for a in per_axis]  # (patches crossing, voxels beyond) per axis
    others = [math.prod(inside[b] * patch[b] for b in range(3) if b != a) for a in range(3)]
    face_voxels = sum(reach * o for (_, reach), o in zip(faces, others))
    face_patches = sum(
        crossing * math.prod(inside[b] for b in range(3) if b != a)
        for a, (crossing, _) in enumerate(faces)
    )
    seam_voxels = face_voxels + (seam_patches - face_patches) * math.prod(patch)
    seam_bytes = seam_voxels * CHANNELS * 4
    state_bytes = 2 * CHANNELS * math.prod(volume)  # float16 scratch, before compression
    blocks = math.prod(-(-v // b) for v, b in zip(volume, block))
    lat = PatchLattice(patch, stride)
    span = [b + lo + hi for b, lo, hi in zip(block, lat.halo_below, lat.halo_above)]  # interior
    core = math.prod(block)
    cond = GENES * math.prod(-(-s // n) + 2 for s, n in zip(span, bins))
    touching = math.prod(b // s + -(-p // s) - 1 for b, p, s in zip(block, patch, stride))
    preds = touching * CHANNELS * math.prod(patch)  # every prediction, blended in lattice order
    # span state (float32), predictions, accumulator total + weight, DDIM temporaries (about 3
    # core arrays), gene window raster
    working = 4 * (
        CHANNELS * math.prod(span) + preds + CHANNELS * core + core + 3 * CHANNELS * core + cond
    )
    return {
        "block": list(block),
        "blocks": blocks,
        "patch_evaluations_per_step": evaluations,
        "lattice_patches": lattice,
        "redundancy_without_sharing": round(evaluations / lattice, 4),
        "seam_patches_per_step": seam_patches,
        "redundancy_with_sharing": 1.0,
        "scratch_written_over_state": round((state_bytes + seam_bytes) / state_bytes, 3),
        "read_amplification": round(reads / math.prod(volume), 4),
        "block_working_set_mib": round(working / 2**20, 1),
    }


def sweep(volume, patch, stride, bins) -> list[dict]:
    rows = []
    for bz in Z_BLOCKS:
        for byx in YX_BLOCKS:
            block = (bz, byx, byx)
            if any(b % s for b, s in zip(block, stride)) or any(
                b > v for b, v in zip(block, volume)
            ):
                continue
            rows.append(geometry(volume, block, patch, stride, bins))
    return rows


def recommend(rows: list[dict], budget_mib: float, workers: int) -> dict:
    """With seams shared, every block size computes each patch once; what is left to choose is
    scratch traffic against memory: the block with the least scratch written per step whose
    working set fits ``budget_mib`` and that leaves at least 4 blocks per worker (so the step
    barrier's tail stays short). Ties go to the lower redundancy without sharing (the cost when a
    neighbour has not published yet)."""
    fits = [
        r for r in rows if r["block_working_set_mib"] <= budget_mib and r["blocks"] >= 4 * workers
    ]
    return min(
        fits,
        key=lambda r: (
            r["scratch_written_over_state"],
            r["redundancy_without_sharing"],
            r["block_working_set_mib"],
        ),
    )


def _bytes(folder: Path) -> tuple[int, int]:
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json"]
    return len(files), sum(f.stat().st_size for f in files)


def scratch_run(shape, block, share: bool, client) -> dict:
    """One real step (the first) of the demo model: patch evaluations, and the bytes of scratch
    it wrote (state shards and seam files, on disk) against the state's own bytes."""
    from tera_pipeline.generation import seams
    from tera_pipeline.storage import store

    with tempfile.TemporaryDirectory() as tmp:
        job = JobConfig.model_validate(
            {
                "out": str(Path(tmp) / "r.zarr"),
                "volume": {"shape": shape},
                "storage": {"block": block},
                "diffusion": {"steps": 2},
                "share_seams": share,
            }
        )
        ckpt = lifecycle.prepare_store(job)
        lifecycle.conditioning_pass(job, client)
        t0 = time.perf_counter()
        report = lifecycle.denoise_step(job, ckpt, 0, client)
        wall = time.perf_counter() - t0
        shards, state_bytes = _bytes(Path(job.out) / layout.STATES[1])
        seam_files, seam_bytes = _bytes(Path(job.out) / seams.SEAMS)
        store.forget_handles()
    voxels = CHANNELS * math.prod(shape)
    grid = job.grid()
    lattice = len(grid.lattice.all_patches(grid.volume))
    written = state_bytes + seam_bytes
    return {
        "share_seams": share,
        "step_wall_s": round(wall, 2),
        "patch_evaluations": report.stats.items,
        "patches_shared": report.stats.shared,
        "lattice_patches": lattice,
        "measured_redundancy": round(report.stats.items / lattice, 4),
        "state_shards_written": shards,
        "state_bytes_on_disk": state_bytes,
        "seam_files": seam_files,
        "seam_bytes": seam_bytes,
        "scratch_bytes_written_per_step": written,
        "minimum_float16_state_bytes": 2 * voxels,
        "minimum_float32_state_bytes": 4 * voxels,
        "written_over_float16_state": round(written / (2 * voxels), 3),
        "written_over_float32_state": round(written / (4 * voxels), 3),
    }


def scratch_runs(shape, block, repeat: int) -> dict:
    """The step with seams shared and without, interleaved ``repeat`` times on one 2-worker
    cluster; each setting's fastest run counts (the machine is shared)."""
    from tera_pipeline.core.cluster_spec import ClusterSpec
    from tera_pipeline.runtime.cluster import cluster_client

    runs: dict[bool, list[dict]] = {True: [], False: []}
    spec = ClusterSpec(kind="local", workers=2, dashboard_address=":0")
    with cluster_client(spec) as client:
        for _ in range(repeat):
            for share in (True, False):
                runs[share].append(scratch_run(shape, block, share, client))
    shared, alone = (min(runs[s], key=lambda r: r["step_wall_s"]) for s in (True, False))
    for s, best in ((True, shared), (False, alone)):
        best["step_wall_s_each"] = [r["step_wall_s"] for r in runs[s]]
    return {
        "shape": list(shape),
        "block": list(block),
        "blocks": math.prod(-(-v // b) for v, b in zip(shape, block)),
        "shared": shared,
        "not_shared": alone,
        "step_speedup_from_sharing": round(alone["step_wall_s"] / shared["step_wall_s"], 3),
    }


# Each benchmark is a standalone script with options of its own; their declarations share a
# shape on purpose.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", default="10000,10000,10000")
    p.add_argument("--run-shape", default="32,256,256")
    p.add_argument("--run-block", default="16,128,128")
    p.add_argument("--budget-mib", type=float, default=256.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-run", action="store_true", help="geometry only")
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs of each setting")
    args = p.parse_args()
    default = JobConfig()
    patch, stride, bins = default.lattice.patch, default.lattice.stride, default.conditioning.bin
    volume = tuple(int(v) for v in args.volume.split(","))
    demo = default.volume.shape
    t0 = time.perf_counter()
    tera_rows = sweep(volume, patch, stride, bins)
    demo_rows = sweep(demo, patch, stride, bins)
    geometry_s = time.perf_counter() - t0
    out = {
        "benchmark": "redundancy",
        "patch": list(patch),
        "stride": list(stride),
        "volume": list(volume),
        "sweep": tera_rows,
        "recommended": recommend(tera_rows, args.budget_mib, args.workers),
        "recommendation_rule": (
            f"least redundancy with block working set <= {args.budget_mib:g} MiB "
            f"and >= 4 blocks per worker ({args.workers} workers)"
        ),
        "default_block": geometry(volume, default.storage.block, patch, stride, bins),
        "demo_volume": list(demo),
        "demo_sweep": demo_rows,
        "demo_recommended": recommend(demo_rows, args.budget_mib, args.workers),
        "geometry_s": round(geometry_s, 4),
    }
    if not args.no_run:
        shape = tuple(int(v) for v in args.run_shape.split(","))
        block = tuple(int(v) for v in args.run_block.split(","))
        out["load_average"] = [round(v, 2) for v in os.getloadavg()]
        out["run"] = scratch_runs(shape, block, args.repeat)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
