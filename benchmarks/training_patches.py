"""Denoiser training patches from an image store larger than the memory they may use (JSON).

Writes a store (``image`` (2, z, y, x) uint8 and its ``conditioning`` gene bins) shard by shard,
larger than the cap, then, in a child process whose address space is capped with RLIMIT_AS (its
DataLoader workers inherit the cap), draws ``--steps`` batches with ``--workers`` prefetching
workers (``training.store_patches``), then the same steps in process. Reports patches per
second, the child's and its workers' peak RSS, and the process tree's largest RSS at once
(sampled here); then trains the tiny denoiser ``--train-steps`` steps on batches read so (the
checkpoint and its figures go beside the store). The store goes in a temporary folder, or in
``--work`` (only it is removed).

    python benchmarks/training_patches.py [--cap-gb 2] [--store-gb 3.5] [--steps 500] [--work DIR]
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
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from output import emit  # noqa: E402  (the benchmarks' folder: this script's own)

GENES = tuple(f"gene{g}" for g in range(8))
PLANE, SHARD, BIN = 4096, (16, 512, 512), (1, 16, 16)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from tera_pipeline.training.prefetch import Prefetcher
from tera_pipeline.training.store_patches import StorePatches
steps, batch, workers, prefetch = (int(v) for v in sys.argv[3:7])
source = StorePatches(sys.argv[1], (4, 32, 32), (1, 1, 1), (0, 1, 1), (1, 16, 16), channels=2)
indices = range(batch)
t0 = time.perf_counter()
with Prefetcher(source, indices, 0, steps + 1, workers=workers, prefetch=prefetch) as fetched:
    fetched.draw(0, indices)  # the workers' start
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        x, c, o = fetched.draw(step, indices)
    t2 = time.perf_counter()
inline_steps = max(steps // 3, 1)
for step in range(1, inline_steps + 1):
    source.draw(step, indices)
t3 = time.perf_counter()
val = source.validation_batch(32)
# training itself: the tiny denoiser, its batches read from the store by prefetching workers
from models.denoiser import DENOISER_SIZES, DenoiserConfig
from tera_pipeline.training.denoiser import train_denoiser
from tera_pipeline.training.loop import Recipe
from tera_pipeline.training.prefetch import Prefetched
train_steps = int(sys.argv[7])
cfg = DenoiserConfig(**DENOISER_SIZES["tiny"])
t4 = time.perf_counter()
with Prefetched(StorePatches(sys.argv[1], cfg.patch, cfg.cond_context, cfg.cond_extra,
                             channels=2), train_steps, workers=workers) as patches:
    log = train_denoiser(Path(sys.argv[8]) / "tiny.safetensors", train_steps,
                         Recipe(batch=batch, lr=2e-3), model_config=cfg, source=patches,
                         log_every=max(train_steps // 4, 1), val_patches=8)
t5 = time.perf_counter()
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({
    "start_s": round(t1 - t0, 2), "prefetched_s": round(t2 - t1, 2),
    "patches_per_s": round(steps * batch / (t2 - t1), 1),
    "inline_patches_per_s": round(inline_steps * batch / (t3 - t2), 1),
    "batch_shapes": [list(x.shape), list(c.shape), list(o.shape)],
    "validation": list(val[0].shape), "peak_rss_mib": round(own, 1),
    "training_steps": train_steps, "training_s": round(t5 - t4, 2),
    "training_patches_per_s": round(train_steps * batch / (t5 - t4), 1),
    "training_loss_first_last": [log[0].get("train_loss"), log[-1].get("train_loss")],
    "worker_peak_rss_mib": round(kids, 1)}))
"""


def write_store(root: Path, z: int, seed: int = 0) -> tuple[int, float]:
    """A generated store's layout, shard by shard, in the empty folder ``root``; returns (image
    bytes, seconds)."""
    from tera_pipeline.core.geometry import Box
    from tera_pipeline.storage import store

    t0 = time.perf_counter()
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {"tera_pipeline": {"genes": list(GENES)}}}  # fmt: skip
    (root / "zarr.json").write_text(json.dumps(meta))
    shape, dims = (2, z, PLANE, PLANE), ("c", "z", "y", "x")
    spec = store.ArraySpec("image", shape, "uint8", dims, (2, *SHARD), (2, 4, 64, 64))
    image = store.create_array(root, spec)
    bins = (z, PLANE // BIN[1], PLANE // BIN[2])
    bin_shard = tuple(s // n for s, n in zip(SHARD, BIN))
    cond = store.create_array(root, store.ArraySpec(
        "conditioning", (len(GENES), *bins), "float32", ("gene", "zbin", "ybin", "xbin"),
        (len(GENES), *bin_shard), attributes={"bin_voxels": list(BIN)}))  # fmt: skip
    rng = np.random.default_rng(seed)
    for z0 in range(0, z, SHARD[0]):
        for y0 in range(0, PLANE, SHARD[1]):
            for x0 in range(0, PLANE, SHARD[2]):
                box = Box((z0, y0, x0), SHARD)
                stains = rng.integers(0, 32, (2, *SHARD), dtype=np.uint8) + np.uint8(60)
                store.write_box(image, box, stains)
                bins_box = Box([b // n for b, n in zip(box.begin, BIN)], bin_shard)
                counts = rng.poisson(1.0, (len(GENES), *bin_shard)).astype(np.float32)
                store.write_box(cond, bins_box, counts)
    return math.prod(shape), time.perf_counter() - t0


def run_child(root: Path, cap: int, args: argparse.Namespace, work: Path) -> dict:
    """The capped child, its process tree's RSS sampled every 0.2 s."""
    args = [str(v) for v in (root, cap, args.steps, args.batch, args.workers, args.prefetch,
                             args.train_steps, work)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    tree, most = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            family = [tree, *tree.children(recursive=True)]
            most = max(most, sum(p.memory_info().rss for p in family if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed under a {cap / 2**30:.1f} GiB cap:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "tree_peak_rss_mib": most / 2**20}


def run(args: argparse.Namespace, folder: Path) -> dict:
    plane_bytes = 2 * PLANE * PLANE
    z = max(SHARD[0], math.ceil(args.store_gb * 2**30 / plane_bytes / SHARD[0]) * SHARD[0])
    root = folder / "training_patches.zarr"
    try:  # made here, atomically, so the removal below can only ever take this run's folder
        root.mkdir(parents=True)
    except FileExistsError:
        raise SystemExit(f"{root} exists: remove it or choose another --work") from None
    try:
        nbytes, write_s = write_store(root, z)
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        cap = int(args.cap_gb * 2**30)
        child = run_child(root, cap, args, folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tree = child.pop("tree_peak_rss_mib")
    return {
        "benchmark": "training_patches",
        "store_shape": [2, z, PLANE, PLANE],
        "store_gib_uncompressed": round(nbytes / 2**30, 2),
        "store_gib_on_disk": round(disk / 2**30, 2),
        "write_s": round(write_s, 1),
        "cap_gib": args.cap_gb,
        "steps": args.steps,
        "batch": args.batch,
        "workers": args.workers,
        "prefetch": args.prefetch,
        **child,
        "tree_peak_rss_mib": round(tree, 1),
        "under_cap": tree < cap / 2**20 and nbytes > cap,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cap-gb", type=float, default=2.0)
    p.add_argument("--store-gb", type=float, default=3.5)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=40, help="then train the tiny denoiser")
    p.add_argument("--work", type=Path, default=None, help="folder for the store (else a temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        emit(run(args, args.work), args.json)
        return
    with tempfile.TemporaryDirectory(prefix="tera-patches-") as tmp:
        emit(run(args, Path(tmp)), args.json)


if __name__ == "__main__":
    main()
