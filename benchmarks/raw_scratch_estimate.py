"""What plain scratch files would save: the zero-cost job with TensorStore scratch against the same
job with its state in raw per-block files, alternated on fresh clusters.

A measurement for a design decision, not a mode of the engine. On every worker a plugin
replaces the state's whole-span read and whole-block write (``block_step._read_state``,
``store.write_box`` of a state array) by raw files beside the store, one per block (C order,
float16), written with ``pwrite`` and read through memory maps; everything else (the
conditioning, DPM-Solver++'s x0, the last step's halo read, the ledger) is unchanged. The images
are not checked (the denoiser is the zero-cost stand-in of ``engine_ceiling``). Prints JSON: the
steps' wall time of each run, and their means and ratio.

    python benchmarks/raw_scratch_estimate.py [--shape 32,512,512] [--block 16,128,128]
                                              [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin
from engine_ceiling import ZeroCostDenoiser, _run  # the benchmarks' folder: its own
from output import emit

RAW = "_raw_scratch"
"""The folder, inside the job's store, of the raw state files."""


class RawStateFiles(WorkerPlugin):
    """Makes this worker keep the sampling state in raw per-block files."""

    name = "raw-state-files"

    def __init__(self, block: tuple[int, int, int]) -> None:
        self.block = tuple(block)

    def setup(self, worker) -> None:
        block_step = importlib.import_module("tera_pipeline.generation.block_step")
        geometry = importlib.import_module("tera_pipeline.core.geometry")
        store = importlib.import_module("tera_pipeline.storage.store")
        block, maps = self.block, {}
        tensorstore_read, tensorstore_write = block_step._read_state, store.write_box

        def file_of(root: Path, name: str, index: tuple[int, ...]) -> Path:
            folder = Path(root) / RAW / name.replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            return folder / "_".join(map(str, index))

        def read_state(root, step, span, box, wrap, frame):
            if box != span:
                return tensorstore_read(root, step, span, box, wrap, frame)
            name = block_step.STATES[step % 2]
            array = store.open_array(root, name)
            channels, volume = array.shape[0], tuple(array.shape[1:])
            out = np.empty((channels, *span.shape), np.float16)
            for stored, place in geometry.rolled_pieces(span, volume, wrap, frame):
                first = [b // s for b, s in zip(stored.begin, block, strict=True)]
                last = [(e - 1) // s for e, s in zip(stored.end, block, strict=True)]
                for index in np.ndindex(*(b - a + 1 for a, b in zip(first, last, strict=True))):
                    index = tuple(int(a + i) for a, i in zip(first, index, strict=True))
                    origin = [i * s for i, s in zip(index, block, strict=True)]
                    lo = [max(a, o) for a, o in zip(stored.begin, origin, strict=True)]
                    hi = [min(e, o + s) for e, o, s in zip(stored.end, origin, block, strict=True)]
                    src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))
                    at = zip(lo, hi, stored.begin, place.begin, strict=True)
                    dst = tuple(slice(a - s + p, b - s + p) for a, b, s, p in at)
                    path = file_of(root, name, index)
                    if path not in maps:
                        shape = (channels, *block)
                        maps[path] = np.memmap(path, np.float16, mode="r", shape=shape)
                    out[(slice(None), *dst)] = maps[path][(slice(None), *src)]
            return out

        def write_box(array, box, data, crc=0):
            path = array.kvstore.path.rstrip("/")
            if box.shape != block or f"/{store.SCRATCH}/state" not in path:
                return tensorstore_write(array, box, data, crc)
            root, name = path.rsplit(f"/{store.SCRATCH}/", 1)
            data = np.ascontiguousarray(data.astype(np.float16, copy=False))
            index = tuple(b // s for b, s in zip(box.begin, block, strict=True))
            fd = os.open(file_of(root, f"{store.SCRATCH}/{name}", index), os.O_WRONLY | os.O_CREAT)
            try:
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)
            return zlib.crc32(data, crc)

        block_step._read_state = read_state
        store.write_box = write_box


def one_run(shape, block, steps: int, raw: bool) -> float:
    """The steps' wall time of the zero-cost job on a fresh 2-worker cluster (after a warm-up)."""
    from tera_pipeline.core.cluster_spec import ClusterSpec
    from tera_pipeline.runtime.cluster import cluster_client

    spec = ClusterSpec(kind="local", workers=2, dashboard_address=":0")
    with tempfile.TemporaryDirectory() as tmp, cluster_client(spec) as client:
        client.register_plugin(ZeroCostDenoiser())
        if raw:
            client.register_plugin(RawStateFiles(block))
        _run((shape[0], 2 * block[1], 2 * block[2]), block, 1, client, Path(tmp) / "warm")
        return _run(shape, block, steps, client, Path(tmp) / "job.zarr")["step_wall_s"] * steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,512,512")
    p.add_argument("--block", default="16,128,128")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    runs: dict[str, list[float]] = {"tensorstore": [], "raw_files": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(round(one_run(shape, block, args.steps, mode == "raw_files"), 3))
    means = {mode: round(float(np.mean(walls)), 3) for mode, walls in runs.items()}
    emit(
        {
            "benchmark": "raw_scratch_estimate",
            "shape": list(shape),
            "block": list(block),
            "steps": args.steps,
            "steps_wall_s": runs,
            "mean_steps_wall_s": means,
            "tensorstore_over_raw": round(means["tensorstore"] / means["raw_files"], 3),
            "load_average": os.getloadavg(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
