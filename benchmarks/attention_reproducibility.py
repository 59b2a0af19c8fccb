"""Reproducibility of the gene-gene attention analysis (prints JSON).

Tera-MIND found the same gene-gene interactions in three virtual brains. Here: the volume-mean
gene x gene attention of (a) two generations of the same tissue with two noise seeds, and (b) two
different synthetic tissues, compared by Pearson r. The gene encoder reads only the conditioning,
so (a) is 1 by construction; (b) measures how stable the interactions are across tissue.

    python benchmarks/attention_reproducibility.py [--shape 16,256,256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from tera_pipeline.analysis import attention
from tera_pipeline.core.cluster_spec import ClusterSpec
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import lifecycle
from tera_pipeline.runtime.cluster import cluster_client


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16,256,256")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    runs = {"seed 0": (0, 0), "seed 1": (0, 1), "tissue 2": (2, 0)}
    matrices = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster_client(ClusterSpec(kind="local", dashboard_address=":0")) as client,
    ):
        for name, (tissue, seed) in runs.items():
            job = JobConfig.model_validate(
                {
                    "out": str(Path(tmp) / f"{tissue}-{seed}.zarr"),
                    "volume": {"shape": shape},
                    "diffusion": {"steps": args.steps, "seed": seed},
                    "synthetic_seed": tissue,
                }
            )
            lifecycle.generate(job, client)
            matrices[name] = attention.run(job.out, client)["mean_matrix"].ravel()

    def r(a: str, b: str) -> float:
        return round(float(np.corrcoef(matrices[a], matrices[b])[0, 1]), 4)

    print(
        json.dumps(
            {
                "benchmark": "attention_reproducibility",
                "shape": list(shape),
                "pearson_r_two_noise_seeds": r("seed 0", "seed 1"),
                "pearson_r_two_tissues": r("seed 0", "tissue 2"),
                "target_r_at_least": 0.9,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
