"""Fault injection on a larger run (prints JSON): worker kills, a killed flow process, resume.

Runs the job once uninterrupted, then (1) with Dask workers SIGKILLed during the run, and (2)
as a ``tera generate`` process SIGKILLed mid-run (with its workers) and continued with
``--resume``. Compares the output bytes of every run with the uninterrupted one.

    python benchmarks/fault_injection.py [--shape 16,256,256] [--block 8,64,64] [--kills 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from distributed import get_task_stream

from tera_pipeline import engine, ledger, store
from tera_pipeline.cluster import cluster_client
from tera_pipeline.config import ClusterSpec, JobConfig
from tera_pipeline.geometry import Box


def _image(root: Path) -> np.ndarray:
    arr = store.open_array(root, engine.IMAGE)
    return store.read_box(arr, Box((0, 0, 0), tuple(arr.shape[1:])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256")
    p.add_argument("--block", default="8,64,64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--kills", type=int, default=4)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    tmp = Path(tempfile.mkdtemp())

    def job(name: str) -> JobConfig:
        return JobConfig.model_validate(
            {
                "out": str(tmp / name),
                "volume": {"shape": shape},
                "storage": {"block": block},
                "diffusion": {"steps": args.steps, "seed": 1},
            }
        )

    spec = ClusterSpec(kind="local", workers=2, dashboard_address=":0")
    with cluster_client(spec) as client:
        t0 = time.perf_counter()
        engine.generate(job("ref.zarr"), client)
        ref_s = time.perf_counter() - t0
    reference = _image(tmp / "ref.zarr")
    blocks = job("ref.zarr").grid().num_blocks * (args.steps + 1)

    kills: list[int] = []
    with cluster_client(spec) as client, get_task_stream(client) as stream:

        def killer() -> None:
            for _ in range(args.kills):
                time.sleep(ref_s / (args.kills + 1))
                pids = sorted(client.run(os.getpid).values())
                os.kill(pids[len(kills) % len(pids)], signal.SIGKILL)
                kills.append(1)

        thread = threading.Thread(target=killer)
        thread.start()
        engine.generate(job("killed.zarr"), client)
        thread.join()
    executed = sum(1 for t in stream.data if t.get("status") == "OK")

    out = tmp / "resumed.zarr"
    cli = [
        sys.executable,
        "-m",
        "tera_pipeline.cli",
        "generate",
        "--out",
        str(out),
        "--shape",
        args.shape,
        "--block",
        args.block,
        "--steps",
        str(args.steps),
        "--seed",
        "1",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(
        cli, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while proc.poll() is None:
        if (out / ledger.LEDGER / "zarr.json").is_file():
            done = sum(d for d, _ in ledger.progress(out))
            if done >= blocks // 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    at_kill = sum(d for d, _ in ledger.progress(out))
    subprocess.run(
        [*cli, "--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    phases = store.group_attrs(out)["tera_pipeline"]["run"]["phases"]
    resumed_blocks = sum(ph["blocks"] for ph in phases)

    outputs = {"killed_workers": _image(tmp / "killed.zarr"), "killed_flow": _image(out)}
    print(
        json.dumps(
            {
                "benchmark": "fault_injection",
                "shape": list(shape),
                "block": list(block),
                "steps": args.steps,
                "block_tasks_per_run": blocks,
                "runs": 1 + len(outputs),
                "worker_kills": len(kills),
                "block_tasks_completed_with_kills": executed,
                "blocks_rerun_after_worker_kills": executed - blocks,
                "flow_kills": 1,
                "blocks_done_at_flow_kill": at_kill,
                "blocks_computed_by_resume": resumed_blocks,
                "blocks_rerun_after_flow_kill": at_kill + resumed_blocks - blocks,
                "output_bytes_compared": int(reference.nbytes) * len(outputs),
                "mismatches": int(sum((o != reference).sum() for o in outputs.values())),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
