"""A gigavoxel job run to completion as a user runs it, watched from outside.

``tera generate`` runs in a child process (its HOME and working directory inside ``--work``)
on a volume of at least 1e9 voxels with the default lattice and sampler and a given checkpoint
(``--checkpoint``; a small, fast one made by ``tera train denoiser``). Meanwhile this script
samples the resident memory of the driver (the ``tera`` process) and of each Dask worker every
few seconds (a worker's also without file-backed pages: its heap, not the libraries it pages
in), and runs ``tera status`` on the store every ``--status-every`` seconds to show it live.
At the end it reads the store's run figures and its pyramid levels. Prints JSON (``--json``
also writes it); the store stays in ``--work`` (remove it yourself: it is several GB).

    python benchmarks/gigavoxel.py --work /tmp/giga --checkpoint small.safetensors \
        [--shape 64,4096,4096] [--block 32,256,256] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from output import emit  # the benchmarks' folder: this script's own

HERE = Path(__file__).resolve().parents[1]
TERA = Path(sys.executable).with_name("tera")


def _rss_mib(proc: psutil.Process) -> tuple[float, float]:
    """A process's resident memory and its anonymous part (RSS less the file-backed and shared
    pages: its heap, what a leak or a fragmented heap grows, not the libraries it pages in)."""
    try:
        info = proc.memory_info()
    except psutil.Error:
        return 0.0, 0.0
    return info.rss / 2**20, (info.rss - getattr(info, "shared", 0)) / 2**20


def _workers(driver: psutil.Process) -> list[psutil.Process]:
    """The driver's descendants that are Dask worker processes (spawned Python children)."""
    found = []
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing" in line and "resource_tracker" not in line:
            found.append(child)
    return found


def _flatness(samples: list[tuple[float, float]]) -> dict:
    """A worker's RSS samples after its first quarter (warm-up): first, median, last and peak;
    the change from the first sample (one point of a sawtooth: workers trim their heap every
    30 s), and the steadier measures: the median of the last quarter against that of the second,
    and the least-squares slope over the samples after warm-up."""
    series = [r for _, r in samples]
    if len(series) < 8:
        return {"samples": len(series)}
    n = len(series)
    warm = series[n // 4 :]
    second, last = sorted(series[n // 4 : n // 2]), sorted(series[3 * n // 4 :])
    hours = [at / 3600 for at, _ in samples[n // 4 :]]
    mean_t, mean_r = sum(hours) / len(hours), sum(warm) / len(warm)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(hours, warm, strict=True)) / sum(
        (t - mean_t) ** 2 for t in hours
    )
    return {
        "samples": n,
        "after_warmup_first_mib": round(warm[0], 1),
        "after_warmup_median_mib": round(sorted(warm)[len(warm) // 2], 1),
        "last_mib": round(series[-1], 1),
        "max_mib": round(max(series), 1),
        "growth_after_warmup_pct": round(100 * (warm[-1] - warm[0]) / warm[0], 1),
        "second_quarter_median_mib": round(second[len(second) // 2], 1),
        "last_quarter_median_mib": round(last[len(last) // 2], 1),
        "median_growth_pct": round(
            100 * (last[len(last) // 2] - second[len(second) // 2]) / second[len(second) // 2], 1
        ),
        "slope_after_warmup_mib_per_hour": round(slope, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the store, HOME, cwd")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--shape", default="64,4096,4096")
    p.add_argument("--block", default="32,256,256")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--status-every", type=float, default=300.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / "giga.zarr"
    env = os.environ | {"HOME": str(work), "PYTHONPATH": str(HERE)}
    command = [
        str(TERA), "generate", "--out", str(out), "--shape", args.shape,
        "--block", args.block, "--workers", str(args.workers),
        "--checkpoint", str(args.checkpoint.resolve()),
    ] + (["--steps", str(args.steps)] if args.steps else [])  # fmt: skip
    t0 = time.time()
    child = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    driver = psutil.Process(child.pid)
    log_path = work / "generate.log"
    driver_peak, workers_rss, workers_anon, statuses = 0.0, {}, {}, []
    next_status = t0 + args.status_every
    with log_path.open("w") as log:
        os.set_blocking(child.stdout.fileno(), False)
        while child.poll() is None:
            for line in iter(child.stdout.readline, ""):
                log.write(line)
            driver_peak = max(driver_peak, _rss_mib(driver)[0])
            for worker in _workers(driver):
                at = round(time.time() - t0, 1)
                rss, anon = _rss_mib(worker)
                workers_rss.setdefault(worker.pid, []).append((at, rss))
                workers_anon.setdefault(worker.pid, []).append((at, anon))
            if time.time() >= next_status and out.exists():
                shown = subprocess.run(
                    [str(TERA), "status", str(out)], cwd=work, env=env,
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                statuses.append(
                    {"at_s": round(time.time() - t0), "tera_status": shown.stdout.splitlines()}
                )
                print(f"[{statuses[-1]['at_s']} s]\n{shown.stdout}", file=sys.stderr, flush=True)
                next_status += args.status_every
            time.sleep(args.sample_every)
        log.write(child.stdout.read())
    wall = time.time() - t0
    result: dict = {
        "benchmark": "gigavoxel",
        "command": " ".join(command),
        "returncode": child.returncode,
        "shape": [int(v) for v in args.shape.split(",")],
        "wall_s": round(wall, 1),
        "driver_peak_rss_mib": round(driver_peak, 1),
        "workers": {str(pid): _flatness(s) for pid, s in workers_rss.items()},
        "workers_anonymous": {str(pid): _flatness(s) for pid, s in workers_anon.items()},
        "worker_rss_series_mib": {
            str(pid): [[at, round(r, 1)] for at, r in s] for pid, s in workers_rss.items()
        },
        "live_status": statuses,
        "load_average": os.getloadavg(),
    }
    if child.returncode == 0:
        sys.path.insert(0, str(HERE))
        from tera_pipeline.evaluation.figures import run_figures

        result["voxels"] = math.prod(result["shape"])
        result["figures"] = run_figures(out)
        result["pyramid_levels"] = sorted(
            d.name for d in (out / "pyramid").iterdir() if (d / "zarr.json").exists()
        )
    emit(result, args.json)


if __name__ == "__main__":
    main()
