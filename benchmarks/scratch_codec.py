"""The scratch state's codec, chosen by measurement: write and read a step's state through each.

The state between steps is mostly noise until the last steps, so it barely compresses; what a
codec costs is the time to encode and decode it. For each codec (blosc zstd at levels 1 and 3,
blosc lz4, none) a store's scratch array of the demo job (2 stains, 16 x 256 x 256, float16,
shards of one 16 x 128 x 128 block) is written block by block and read back with the halo a step
reads, from a state early (pure noise), half way and late (mostly signal) in the sampling.
Prints JSON: seconds per voxel-step to write and read, and bytes against the raw state.

    python benchmarks/scratch_codec.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tera_pipeline.core.config import JobConfig  # noqa: E402
from tera_pipeline.core.geometry import Box  # noqa: E402
from tera_pipeline.core.noise import position_noise  # noqa: E402
from tera_pipeline.inputs.synthetic import SyntheticBrain  # noqa: E402
from tera_pipeline.storage import layout, store  # noqa: E402

CODECS = {"zstd 1": ("zstd", 1), "zstd 3": ("zstd", 3), "lz4 1": ("lz4", 1), "none": ("none", 0)}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(job: JobConfig, state: np.ndarray, codec: str, level: int, repeat: int) -> dict:
    spec = next(s for s in layout.array_specs(job, ()) if s.name == layout.STATES[0])
    grid, vol = job.grid(), Box((0, 0, 0), job.volume.shape)
    writes, reads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = replace(spec, codec=codec, compression_level=level)
        for _ in range(repeat):
            array = store.create_array(root, spec)
            t0 = time.perf_counter()
            for index in np.ndindex(*grid.shape):
                core = grid.block(index).core
                store.write_box(array, core, state[(slice(None), *core.slices())])
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for index in np.ndindex(*grid.shape):
                read = grid.block(index).read.intersect(vol)
                store.read_box(array, read)
            reads.append(time.perf_counter() - t0)
        size = _bytes(root / spec.name)
    voxels = state.size
    return {
        "write_ns_per_voxel": round(min(writes) / voxels * 1e9, 2),
        "read_ns_per_voxel": round(min(reads) / voxels * 1e9, 2),
        "bytes_over_raw": round(size / (voxels * 2), 3),
    }


# Each benchmark is a standalone script with options of its own.
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    job = JobConfig(out="unused.zarr")
    vol = Box((0, 0, 0), job.volume.shape)
    noise = position_noise(0, 0, vol, 2)
    signal = SyntheticBrain(0).render(vol).astype(np.float32) / 127.5 - 1.0
    states = {  # x_t = sqrt(a) x0 + sqrt(1 - a) noise at three points of the sampling
        f"a={a}": (np.sqrt(a) * signal + np.sqrt(1 - a) * noise).astype(np.float16)
        for a in (0.001, 0.5, 0.99)
    }
    result = {
        name: {s: measure(job, x, *CODECS[name], args.repeat) for s, x in states.items()}
        for name in CODECS
    }
    print(json.dumps({"benchmark": "scratch_codec", "load_average": os.getloadavg(),
                      "shape": [2, *job.volume.shape], "codecs": result}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
