"""Conditioning from a transcript table larger than the memory it may use (prints JSON).

Writes a parquet table of N random transcripts (in row groups, never whole in memory), then, in
a child process whose address space is capped with RLIMIT_AS, partitions it by block once and
rasterises the gene bins block by block into a TensorStore array. Checks that every transcript
was counted.

    python benchmarks/large_conditioning.py --transcripts 20000000 --limit-gb 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import bin_box
from tera_pipeline.inputs.partition import PartitionedSource, partition
from tera_pipeline.inputs.synthetic import GENE_PANEL
from tera_pipeline.storage import store

limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
job = JobConfig.model_validate_json(Path(sys.argv[1]).read_text())
t0 = time.perf_counter()
manifest = partition(job, GENE_PANEL, Path(job.out) / "_cells")
t_part = time.perf_counter() - t0
vol_bins = bin_box(job.grid().volume_box, job.conditioning.bin).shape
shard = tuple(s // b for s, b in zip(job.storage.block, job.conditioning.bin))
arr = store.create_array(Path(job.out), store.ArraySpec(
    "conditioning", (len(GENE_PANEL), *vol_bins), "float32", ("gene", "zbin", "ybin", "xbin"),
    (len(GENE_PANEL), *shard), (len(GENE_PANEL), *shard)))
source = PartitionedSource(Path(job.out) / "_cells", GENE_PANEL, job.storage.block)
total = 0.0
per_gene = [0.0] * len(GENE_PANEL)
for block in job.grid().blocks():
    bins = bin_box(block.core, job.conditioning.bin)
    genes, _ = source.rasters(block.core, bins, job.volume.spacing_um, job.conditioning.bin)
    store.write_box(arr, bins, genes)
    total += float(genes.sum())
    per_gene = [a + float(b) for a, b in zip(per_gene, genes.sum(axis=(1, 2, 3)))]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"manifest": manifest, "counted": total, "per_gene": per_gene,
                  "partition_s": round(t_part, 1), "total_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_mib": round(peak, 1)}))
"""


def write_table(path: Path, n: int, shape_um, genes, seed: int = 0, group: int = 1_000_000):
    """N uniform transcripts in row groups; returns per-gene counts."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(genes), dtype=np.int64)
    schema = pa.schema(
        [
            ("x", pa.float64()),
            ("y", pa.float64()),
            ("z", pa.float64()),
            ("gene", pa.dictionary(pa.int16(), pa.string())),
        ]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, group):
            m = min(group, n - start)
            codes = rng.integers(0, len(genes), m).astype(np.int16)
            counts += np.bincount(codes, minlength=len(genes))
            writer.write_table(
                pa.table(
                    {
                        "x": rng.random(m) * shape_um[2],
                        "y": rng.random(m) * shape_um[1],
                        "z": rng.random(m) * shape_um[0],
                        "gene": pa.DictionaryArray.from_arrays(
                            pa.array(codes), pa.array(list(genes))
                        ),
                    },
                    schema=schema,
                )
            )
    return counts


def run(transcripts: int, limit_gb: float, shape, block, workdir: Path) -> dict:
    from tera_pipeline.core.config import JobConfig
    from tera_pipeline.inputs.synthetic import GENE_PANEL

    job = JobConfig.model_validate(
        {
            "out": str(workdir / "job.zarr"),
            "volume": {"shape": shape},
            "storage": {"block": block},
            "conditioning": {"source": str(workdir / "t.parquet")},
        }
    )
    shape_um = [n * s for n, s in zip(job.volume.shape, job.volume.spacing_um)]
    t0 = time.perf_counter()
    expected = write_table(workdir / "t.parquet", transcripts, shape_um, GENE_PANEL)
    write_s = time.perf_counter() - t0
    (workdir / "job.json").write_text(job.model_dump_json())
    limit = int(limit_gb * 2**30)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(workdir / "job.json"), str(limit)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed under {limit_gb} GB:\n{proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatch = int(np.abs(np.asarray(child["per_gene"]) - expected).sum())
    return {
        "benchmark": "large_conditioning",
        "transcripts": transcripts,
        "table_mib": round((workdir / "t.parquet").stat().st_size / 2**20, 1),
        "limit_gb": limit_gb,
        "peak_rss_mib": child["peak_rss_mib"],
        "write_table_s": round(write_s, 1),
        "partition_s": child["partition_s"],
        "conditioning_total_s": child["total_s"],
        "blocks": job.grid().num_blocks,
        "counted": int(child["counted"]),
        "per_gene_mismatch": mismatch,
        "pass": mismatch == 0 and child["counted"] == transcripts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transcripts", type=int, default=20_000_000)
    p.add_argument("--limit-gb", type=float, default=2.0)
    p.add_argument("--shape", default="16,512,512")
    p.add_argument("--block", default="16,128,128")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.transcripts, args.limit_gb, shape, block, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
