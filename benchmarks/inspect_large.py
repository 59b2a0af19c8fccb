"""``tera inspect`` on a large Xenium-layout ``transcripts.parquet`` under a memory cap (JSON).

Writes N transcripts in the Xenium layout (x_location, y_location, z_location µm, feature_name
with control codewords, qv, cell_id; in row groups, never whole in memory), then runs
``tera inspect`` on it in a child process whose address space is capped with RLIMIT_AS, and
checks its counts against those the writer kept.

    python benchmarks/inspect_large.py --transcripts 20000000 --limit-gb 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHILD = r"""
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from flows.cli import app
app(sys.argv[2:], standalone_mode=True)
"""
CONTROLS = [
    "NegControlProbe_00001", "NegControlCodeword_0500", "BLANK_0001", "UnassignedCodeword_0003",
]  # fmt: skip


def write_xenium(path: Path, n: int, genes: list[str], group: int = 1_000_000) -> dict:
    """A Xenium-layout table of ``n`` rows; returns what inspect should count."""
    rng = np.random.default_rng(0)
    names = pa.array(genes + CONTROLS)
    counts = {"rows": 0, "low_qv": 0, "controls": 0, "cells": 0}
    writer = None
    for start in range(0, n, group):
        m = min(group, n - start)
        code = rng.integers(0, len(names), m).astype(np.int32)
        qv = rng.choice(np.array([10.0, 25.0, 40.0], np.float32), m, p=[0.1, 0.3, 0.6])
        cell = rng.integers(0, 200_000, m)
        table = pa.table({
            "transcript_id": pa.array(np.arange(start, start + m, dtype=np.uint64)),
            "cell_id": pa.array([f"c{c:06d}-1" for c in cell]),
            "overlaps_nucleus": pa.array(rng.integers(0, 2, m).astype(np.uint8)),
            "feature_name": pa.DictionaryArray.from_arrays(pa.array(code), names),
            "x_location": pa.array(rng.uniform(0, 4096, m).astype(np.float32)),
            "y_location": pa.array(rng.uniform(0, 4096, m).astype(np.float32)),
            "z_location": pa.array(rng.uniform(0, 60, m).astype(np.float32)),
            "qv": pa.array(qv),
        })  # fmt: skip
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        low = qv < 20
        counts["rows"] += m
        counts["low_qv"] += int(low.sum())
        counts["controls"] += int(((code >= len(genes)) & ~low).sum())
    writer.close()
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transcripts", type=int, default=20_000_000)
    p.add_argument("--limit-gb", type=float, default=2.0)
    args = p.parse_args()
    from tera_pipeline.inputs.synthetic import GENE_PANEL

    with tempfile.TemporaryDirectory(prefix="tera-inspect-") as tmp:
        table = Path(tmp) / "transcripts.parquet"
        t0 = time.perf_counter()
        want = write_xenium(table, args.transcripts, list(GENE_PANEL))
        write_s = time.perf_counter() - t0
        limit = int(args.limit_gb * 2**30)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(limit), "inspect", str(table), "--json"],
            capture_output=True, text=True, env={"HOME": tmp, "PATH": "/usr/bin:/bin"}, cwd=tmp,
        )  # fmt: skip
        inspect_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode:
            raise SystemExit(f"inspect failed under {args.limit_gb} GB:\n{proc.stderr[-2000:]}")
        info = json.loads(proc.stdout)
        dropped = info["dropped"]
        ok = (
            info["rows"] == want["rows"]
            and dropped.get("qv below 20", 0) == want["low_qv"]
            and dropped.get("control, blank or unassigned codewords", 0) == want["controls"]
        )
        print(json.dumps({
            "benchmark": "inspect_large", "transcripts": args.transcripts,
            "table_mib": round(table.stat().st_size / 2**20, 1), "limit_gb": args.limit_gb,
            "write_table_s": round(write_s, 1), "inspect_s": round(inspect_s, 1),
            "peak_rss_mib": round(peak, 1), "format": info["format"], "kept": info["kept"],
            "dropped": dropped, "genes": info["genes"], "cells": info["cells"], "pass": ok,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
