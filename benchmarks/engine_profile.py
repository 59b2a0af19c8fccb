"""Where a zero-cost block step's time goes in one process (no Dask, cProfile on).

The job of ``engine_ceiling.py`` (default 32 x 512 x 512, blocks 16 x 128 x 128) with the
denoiser replaced by its zero-cost stand-in: step 0 is run to fill the scratch state, then
step 1 of every block is profiled on one thread. Prints JSON: the step's wall time, ns per
voxel-step, and the functions with the most time of their own and in all. The store is written
in a temporary folder of this run and removed after it.

With ``--timers`` no profiler runs: steps 1 and 2 (both computed in their lattice's frame) are
timed with a clock around each part of the block step (reads, prediction, writes, ...), which
costs nothing next to them.

    python benchmarks/engine_profile.py [--timers]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from engine_ceiling import _ZeroPredictor  # noqa: E402

from tera_pipeline.core.config import JobConfig  # noqa: E402
from tera_pipeline.generation import block_step, lifecycle  # noqa: E402
from tera_pipeline.storage import store  # noqa: E402


def _top(profile: cProfile.Profile, key: str, n: int) -> list[dict]:
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2 if key == "own" else 3])[::-1]
    return [
        {"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": round(tt, 4),
         "all_s": round(ct, 4)}
        for (f, line, name), (_, nc, tt, ct, _) in rows[:n]
    ]  # fmt: skip


PARTS = ("_read_inputs", "_read_state", "_predict", "_assemble", "_write_update",
         "position_noise_on")  # fmt: skip
"""The block step's parts ``--timers`` clocks (functions of ``block_step``)."""


def _clocked(totals: dict[str, float]) -> Callable[[], None]:
    """Wrap each of ``PARTS`` (and the store's reads and writes) to add its time to ``totals``;
    returns what puts the originals back."""
    originals = []
    for module, name in [(block_step, n) for n in PARTS] + [(store, "read_box"),
                                                             (store, "write_box")]:  # fmt: skip
        inner = getattr(module, name)
        originals.append((module, name, inner))

        def timed(*args, _inner=inner, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0

        setattr(module, name, timed)

    def restore() -> None:
        for module, name, inner in originals:
            setattr(module, name, inner)

    return restore


def profile(shape, block, top: int, timers: bool = False) -> dict:
    torch.set_num_threads(1)
    real = block_step.get_predictor
    block_step.get_predictor = lambda c, b: _ZeroPredictor(real(c, b))
    work = Path(tempfile.mkdtemp(prefix="tera-engine-profile-"))
    try:
        job = JobConfig.model_validate(
            {"out": str(work / "p.zarr"), "volume": {"shape": list(shape)},
             "storage": {"block": list(block)}, "diffusion": {"steps": 4 if timers else 3}}
        )  # fmt: skip
        checkpoint = str(lifecycle.prepare_store(job))
        blocks = list(np.ndindex(*job.grid().shape))
        for index in blocks:
            block_step.rasterize_block(job, index)
        for index in blocks:
            block_step.denoise_block(job, checkpoint, 0, index)
        if timers:
            return _timed_steps(job, checkpoint, blocks, shape, block)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for index in blocks:
            block_step.denoise_block(job, checkpoint, 1, index)
        prof.disable()
        wall = time.perf_counter() - t0
    finally:
        store.forget_handles()
        shutil.rmtree(work, ignore_errors=True)  # this run's own mkdtemp folder
    voxels = int(np.prod(shape))
    return {
        "benchmark": "engine_profile",
        "shape": list(shape),
        "block": list(block),
        "blocks": len(blocks),
        "step_s": round(wall, 3),
        "ns_per_voxel_step": round(wall / voxels * 1e9, 1),
        "top_own": _top(prof, "own", top),
        "top_all": _top(prof, "all", top),
    }


def _timed_steps(job, checkpoint: str, blocks: list, shape, block) -> dict:
    """Steps 1 and 2 of every block with each part clocked (ns per voxel-step of the step)."""
    voxels = int(np.prod(shape))
    steps = []
    for step in (1, 2):
        totals: dict[str, float] = {}
        restore = _clocked(totals)
        t0 = time.perf_counter()
        for index in blocks:
            block_step.denoise_block(job, checkpoint, step, index)
        wall = time.perf_counter() - t0
        restore()
        parts = {k: round(v / voxels * 1e9, 1) for k, v in sorted(totals.items())}
        steps.append({"step": step, "step_s": round(wall, 3),
                      "ns_per_voxel_step": round(wall / voxels * 1e9, 1),
                      "ns_per_voxel_step_by_part": parts})  # fmt: skip
    return {"benchmark": "engine_profile", "mode": "timers", "shape": list(shape),
            "block": list(block), "blocks": len(blocks), "steps": steps}  # fmt: skip


# Each benchmark is a standalone script with options of its own.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,512,512")
    p.add_argument("--block", default="16,128,128")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--timers", action="store_true", help="clock the block step's parts instead")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    print(json.dumps(profile(shape, block, args.top, args.timers), indent=1))


if __name__ == "__main__":
    main()
