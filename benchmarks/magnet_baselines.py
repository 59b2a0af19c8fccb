"""MagNet against two baselines on held-out synthetic renders; prints a JSON table.

- MagNet: the committed checkpoint (``tera train magnet``);
- ST-Net-like CNN on the bin crop alone: the committed baseline
  (``tera train magnet --kind magnet_bin_cnn``, same data, steps and schedule);
- ridge regression on per-bin intensity features (mean, std, 10/50/90th percentiles of each
  stain over the bin and over its crop), fitted here on the same training renders.

All three are scored the same way (``expression_metrics``: PCC per bin and per gene, MSE, MAE on
log1p counts, at 1 x 1, 2 x 2 and 4 x 4 bins) against the true expression of a synthetic brain
none of them was trained on.

    python benchmarks/magnet_baselines.py [--seed 100] [--shape 4,512,512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import DEFAULT_MAGNET, DEFAULT_MAGNET_BIN_CNN, load_checkpoint
from models.magnet import MagNetConfig
from tera_pipeline.analysis.expression_metrics import expression_metrics
from tera_pipeline.analysis.magnet import load_magnet, predict_volume
from tera_pipeline.analysis.magnet_levels import array_reader, level_inputs
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.core.intensity import to_uint8
from tera_pipeline.training.magnet import synthetic_pairs

BIN = (1, 16, 16)


def intensity_features(image: np.ndarray, config: MagNetConfig) -> np.ndarray:
    """(bins, 20) features of every bin of a (C, z, y, x) uint8 volume."""
    bins = bin_box(Box((0, 0, 0), image.shape[1:]), BIN)
    crops = level_inputs(array_reader(image), bins, bins, BIN, config).crops
    crops = crops[:, 1:-1, 1:-1].numpy()  # (S, Y, X, C, p, p)
    m = config.margin_px
    centre = crops[..., m:-m, m:-m]
    feats = []
    for part in (centre, crops):
        flat = part.reshape(*part.shape[:4], -1)
        feats += [flat.mean(-1), flat.std(-1)]
        feats += list(np.percentile(flat, [10, 50, 90], axis=-1))
    return np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats], axis=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0):
    """Closed-form ridge on standardised features; returns predict(x) -> y."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    reg = alpha * np.eye(z.shape[1])
    reg[-1, -1] = 0
    w = np.linalg.solve(z.T @ z + reg, z.T @ y)
    return lambda q: np.hstack([(q - mu) / sd, np.ones((len(q), 1))]) @ w


def bins_last(counts: np.ndarray) -> np.ndarray:
    """(G, z, y, x) -> (bins, G)."""
    return counts.reshape(counts.shape[0], -1).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=100, help="held-out synthetic brain")
    parser.add_argument("--shape", default="4,512,512")
    parser.add_argument("--magnet", type=Path, default=DEFAULT_MAGNET)
    parser.add_argument("--cnn", type=Path, default=DEFAULT_MAGNET_BIN_CNN)
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = tuple(int(v) for v in args.shape.split(","))

    magnet, meta = load_magnet(args.magnet)
    cnn, cnn_meta = load_checkpoint(args.cnn, "magnet_bin_cnn")
    held_out = synthetic_pairs((args.seed,), shape)[0]
    image, truth = to_uint8(held_out.image), held_out.cond
    train_seed = meta["training"]["seed"]
    train = synthetic_pairs(tuple(train_seed + i for i in range(3)), (8, 512, 512))

    table, timings = {}, {}
    t0 = time.perf_counter()
    x = np.concatenate([intensity_features(to_uint8(d.image), magnet.config) for d in train])
    y = np.concatenate([np.log1p(bins_last(d.cond)) for d in train])
    ridge = fit_ridge(x, y)
    pred = np.expm1(np.clip(ridge(intensity_features(image, magnet.config)), 0, None))
    table["ridge (intensity features)"] = expression_metrics(pred.T.reshape(truth.shape), truth)
    timings["ridge"] = time.perf_counter() - t0
    for name, model in (("ST-Net-like CNN (bin crop)", cnn), ("MagNet", magnet)):
        t0 = time.perf_counter()
        table[name] = expression_metrics(predict_volume(model, image, BIN), truth)
        timings[name] = time.perf_counter() - t0
    best_baseline = max(v["1x1"]["pcc_bin"] for k, v in table.items() if k != "MagNet")
    print(
        json.dumps(
            {
                "held_out": {"synthetic_seed": args.seed, "shape": shape, "bins": truth[0].size},
                "trained_on": {"seeds": [train_seed + i for i in range(3)], "shape": [8, 512, 512]},
                "checkpoints": {"magnet": meta["command"], "cnn": cnn_meta["command"]},
                "table": table,
                "magnet_beats_baselines_on_bin_pcc": table["MagNet"]["1x1"]["pcc_bin"]
                > best_baseline,
                "magnet_beats_baselines_on_gene_pcc": table["MagNet"]["1x1"]["pcc_gene"]
                > max(v["1x1"]["pcc_gene"] for k, v in table.items() if k != "MagNet"),
                "seconds": {k: round(v, 1) for k, v in timings.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
