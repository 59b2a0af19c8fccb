"""The engine's ceiling: generation with a zero-cost denoiser, against the real one, in one run.

The same job runs twice on one local cluster per block size: once with the committed denoiser,
once with a stand-in that returns zeros at once (installed on every worker by a Dask worker
plugin, so the library carries no test hook). With the model's time gone, what is left is the
engine's own work: reading and decoding the state, gathering patches, blending, the DDIM update
and noise, encoding and writing, seams, and scheduling (the image phase, where the last step
rolls, counted with the steps). Prints JSON: voxel-steps/s per worker
and where the time goes, at each block size, with the real denoiser's step time for the ratio.
Each engine runs in its default lattice.

With ``--engine-at REV`` the same is measured, in the same run, for the engine of a git
revision (default: the one issue 17 was filed against), checked out in a temporary worktree
and run in a child process with that worktree first on its path; the ratio of the two is
printed per block size. Each engine's zero-cost job runs ``--repeats`` times on its cluster
(fresh stores); the fastest run counts (the others are printed): on a shared machine other
work only ever adds time.

    python benchmarks/engine_ceiling.py [--shape 16,256,256] [--blocks 16,128,128 16,64,64]
                                        [--steps 2] [--workers 2] [--engine-at a786214]
                                        [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

HERE = Path(__file__).resolve().parents[1]
BEFORE = "a786214"
"""The revision issue 17 measured (≈570 ns per voxel-step per worker)."""


def _api():
    """(JobConfig, ClusterSpec, generate, cluster_client) of whichever engine is on the path:
    this one, or one from before the code was housed by stage."""
    try:
        config = importlib.import_module("tera_pipeline.core.config")
        lifecycle = importlib.import_module("tera_pipeline.generation.lifecycle")
        cluster = importlib.import_module("tera_pipeline.runtime.cluster")
    except ImportError:
        config = importlib.import_module("tera_pipeline.config")
        lifecycle = importlib.import_module("tera_pipeline.engine")
        cluster = importlib.import_module("tera_pipeline.cluster")
    return config.JobConfig, config.ClusterSpec, lifecycle.generate, cluster.cluster_client


class _ZeroPredictor:
    """The real predictor's interface (``meta``, ``config``, ``device``; ``predict`` on tensors,
    or called on arrays by engines before issue 17's device path), with a prediction that costs
    nothing: zeros of the output's shape."""

    def __init__(self, real) -> None:
        self.meta, self.config = real.meta, real.config
        self.device = getattr(real, "device", None)

    def __call__(self, x: np.ndarray, t: int, cond: np.ndarray, offset=None) -> np.ndarray:
        return np.zeros(x.shape, dtype=np.float32)

    def predict(self, x, t: int, cond, offset=None):
        import torch

        return torch.zeros(x.shape, dtype=torch.float32, device=self.device)


class ZeroCostDenoiser(WorkerPlugin):
    """Makes every block step on this worker use ``_ZeroPredictor``."""

    name = "zero-cost-denoiser"

    def setup(self, worker) -> None:
        try:
            module = importlib.import_module("tera_pipeline.generation.block_step")
        except ImportError:  # the engine before the code was housed by stage
            module = importlib.import_module("tera_pipeline.engine")
        real = module.get_predictor

        def zero(checkpoint: str, batch_size: int):
            return _ZeroPredictor(real(checkpoint, batch_size))

        module.get_predictor = zero


def _run(shape, block, steps: int, client, out: Path, codec: str | None = None) -> dict:
    JobConfig, _, generate, _ = _api()
    storage = {"block": list(block)} | ({"scratch_codec": codec} if codec else {})
    job = JobConfig.model_validate(
        {
            "out": str(out),
            "volume": {"shape": list(shape)},
            "storage": storage,
            "diffusion": {"steps": steps},
        }
    )
    t0 = time.perf_counter()
    reports = generate(job, client)
    total = time.perf_counter() - t0
    denoise = [r for r in reports if r.phase.startswith("step") or r.phase == "image"]
    wall = sum(r.wall_s for r in denoise)
    s = {k: sum(getattr(r.stats, k) for r in denoise) for k in ("model_s", "read_s", "write_s")}
    inside = sum(r.stats.total_s for r in denoise)
    return {
        "step_wall_s": round(wall / steps, 3),
        "end_to_end_s": round(total, 2),
        "patch_evaluations_per_step": getattr(denoise[0].stats, "items", None)
        or getattr(denoise[0].stats, "patches", None),
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


def measure(
    shape,
    blocks,
    steps: int,
    workers: int,
    real_too: bool = True,
    codecs: tuple = (None,),
    repeats: int = 1,
) -> list[dict]:
    """The zero-cost run (the fastest of ``repeats``; and the real one) at each block size, with
    the engine on the path; the zero-cost run again with each scratch codec of ``codecs``
    (None: the default)."""
    _, ClusterSpec, _, cluster_client = _api()
    voxel_steps = 2 * int(np.prod(shape)) * steps  # two stains
    results = []
    for block in blocks:
        spec = ClusterSpec(kind="local", workers=workers, dashboard_address=":0")
        with tempfile.TemporaryDirectory() as tmp:
            real = None
            if real_too:
                with cluster_client(spec) as client:
                    real = _run(shape, block, steps, client, Path(tmp) / "real.zarr")
            zeros = {}
            with cluster_client(spec) as client:
                client.register_plugin(ZeroCostDenoiser())
                # warm up: each worker loads the model and opens TensorStore once, not inside
                # the first measured run (which then paid it and the runs after it did not)
                _run((shape[0], 2 * block[1], 2 * block[2]), block, 1, client, Path(tmp) / "w")
                for codec in codecs:
                    runs = [
                        _run(shape, block, steps, client, Path(tmp) / f"z-{codec}-{r}.zarr", codec)
                        for r in range(repeats)
                    ]
                    zeros[codec] = min(runs, key=lambda run: run["step_wall_s"])
                    zeros[codec]["step_wall_s_runs"] = [run["step_wall_s"] for run in runs]
        rows = {
            codec: _zero_row(zero, voxel_steps, steps, workers) for codec, zero in zeros.items()
        }
        row = {"block": list(block), "zero_cost": rows.pop(None)}
        row |= {f"zero_cost_scratch_{codec}": r for codec, r in rows.items()}
        zero = zeros[codecs[0]]
        if real is not None:
            row["real_denoiser"] = {
                "step_wall_s": real["step_wall_s"],
                "time_shares": _breakdown(real, workers, steps),
            }
            row["engine_share_of_a_real_step"] = round(zero["step_wall_s"] / real["step_wall_s"], 4)
        results.append(row)
    return results


def _zero_row(zero: dict, voxel_steps: int, steps: int, workers: int) -> dict:
    per_worker = voxel_steps / (zero["step_wall_s"] * steps) / workers
    return {
        "step_wall_s": zero["step_wall_s"],
        "step_wall_s_runs": zero.get("step_wall_s_runs", [zero["step_wall_s"]]),
        "voxel_steps_per_s_per_worker": round(per_worker),
        "ns_per_voxel_step_per_worker": round(1e9 / per_worker, 1),
        "time_shares": _breakdown(zero, workers, steps),
        "patch_evaluations_per_step": zero["patch_evaluations_per_step"],
    }


def _measure_at(revision: str, args) -> list[dict]:
    """``measure`` (zero-cost only) for the engine of ``revision``, in a child process."""
    work = Path(tempfile.mkdtemp(prefix="tera-engine-at-"))
    tree = work / "tree"
    git = ["git", "-C", str(HERE)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)  # fmt: skip
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--shape", args.shape, "--blocks", *args.blocks,
             "--steps", str(args.steps), "--workers", str(args.workers),
             "--repeats", str(args.repeats)],
            cwd=work, env=os.environ | {"PYTHONPATH": str(tree)}, capture_output=True,
            text=True, check=True,
        )  # fmt: skip
    finally:  # the worktree this made, inside its own mkdtemp folder
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], capture_output=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
    return json.loads(child.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256")
    p.add_argument("--blocks", nargs="+", default=["16,128,128", "16,64,64"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine-at", default=BEFORE, help="also measure this revision ('' skips)")
    p.add_argument(
        "--scratch-codecs", nargs="*", default=["zstd"],
        help="this engine's zero-cost run again with these scratch codecs",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=int, default=3, help="zero-cost runs per engine; the fastest counts"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    blocks = [tuple(int(v) for v in text.split(",")) for text in args.blocks]
    if args.child:
        print(
            json.dumps(
                measure(shape, blocks, args.steps, args.workers, False, repeats=args.repeats)
            )
        )
        return
    before = _measure_at(args.engine_at, args) if args.engine_at else None
    codecs = (None, *(c for c in args.scratch_codecs if c))
    results = measure(shape, blocks, args.steps, args.workers, codecs=codecs, repeats=args.repeats)
    out = {
        "benchmark": "engine_ceiling",
        "shape": list(shape),
        "steps": args.steps,
        "workers": args.workers,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "results": results,
    }
    if before is not None:
        out["engine_at"] = {"revision": args.engine_at, "results": before}
        out["ceiling_ratio"] = {
            "x".join(map(str, now["block"])): round(
                then["zero_cost"]["ns_per_voxel_step_per_worker"]
                / now["zero_cost"]["ns_per_voxel_step_per_worker"],
                2,
            )
            for now, then in zip(results, before, strict=True)
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
