"""SPATIA on held-out synthetic cells against expression-only and image-only baselines.

Prints one JSON object: the annotation / clustering / imputation table per measurement of the
true counts (capture rate, and the fraction of transcripts misassigned to neighbouring cells; see
``spatia_scoring.observed``), and the generator's faithfulness to the synthetic brain's
expression -> morphology rule (nucleus size driven by Ccnd1), including the perturbation test.

    .venv/bin/python benchmarks/spatia_benchmark.py [--checkpoint PATH] [--seed 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from spatia_scoring import (  # benchmarks/spatia_scoring.py
    MEASUREMENTS,
    generation_scores,
    representation_table,
    summary,
)

from models.checkpoint import DEFAULT_SPATIA, load_spatia
from tera_pipeline.analysis.spatia_plan import niche_voxels
from tera_pipeline.training.spatia_cells import synthetic_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_SPATIA))
    ap.add_argument("--seed", type=int, default=2, help="held-out synthetic brain (training: 1)")
    ap.add_argument("--shape", default="16,512,512", help="held-out volume Z,Y,X (voxels)")
    ap.add_argument(
        "--measurements",
        default=",".join(f"{c}:{s}" for c, s in MEASUREMENTS),
        help="capture:spill pairs, comma-separated",
    )
    ap.add_argument("--generated", type=int, default=512, help="cells generated and perturbed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, meta = load_spatia(args.checkpoint)
    shape = tuple(int(v) for v in args.shape.split(","))
    spacing = tuple(meta["spacing_um"])
    cells = synthetic_cells(args.seed, shape, model.cfg.crop, spacing)
    niche = niche_voxels(meta, spacing)
    table = representation_table(
        model,
        cells,
        niche,
        [tuple(float(v) for v in m.split(":")) for m in args.measurements.split(",")],
    )
    generation = generation_scores(model, cells, args.generated, seed=args.seed)
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "held_out": {"seed": args.seed, "shape": shape, "cells": len(cells)},
                "summary": summary(table),
                "table": table,
                "generation": generation,
                "wall_s": round(time.perf_counter() - t0, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
