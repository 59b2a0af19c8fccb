"""Training MagNet (and its ST-Net-like CNN baseline) on (image, expression per bin) pairs.

Samples are windows of ``region_bins`` x ``region_bins`` bins of one z slab, aligned to the
region grid, read through the same ``level_inputs`` as inference; targets are log1p counts per
bin and each spot's and region's mean over its bins. Default data: synthetic-brain renders with
their true bin expression (validation on another seed); or a user's image zarr with its cells or
transcripts (``user_pairs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import KINDS
from models.magnet import MagNetConfig, magnet_loss, pearson
from tera_pipeline.analysis.magnet_levels import array_reader, concat, level_inputs
from tera_pipeline.core.geometry import Box, Shape
from tera_pipeline.core.intensity import to_uint8
from tera_pipeline.training.denoiser import (
    TrainingData,
    synthetic_training_data,
    user_training_data,
)
from tera_pipeline.training.loop import (
    Losses,
    Recipe,
    Stage,
    TrainingLog,
    run_stage,
    save_trained,
    to_device,
)
from tera_pipeline.training.sampling import streamed
from tera_pipeline.training.trainer import Trainer, TrainOptions
from tera_pipeline.training.user_data import UserData

log = logging.getLogger("tera_pipeline.magnet_training")

TRAINED_KINDS = ("magnet", "magnet_bin_cnn")
"""The kinds ``train_magnet`` trains (their classes in ``models.checkpoint.KINDS``)."""
USER_BIN: Shape = (1, 16, 16)
"""The bin of a user's expression (z, y, x voxels) that MagNet trains on."""
MAGNET_RECIPE = Recipe(batch=8, lr=1e-3)
"""The default batch and learning rate."""


def synthetic_pairs(
    seeds: tuple[int, ...], shape: Shape, spacing_um=(4.0, 1.0, 1.0), bin_shape=(1, 16, 16)
) -> list[TrainingData]:
    """Synthetic-brain renders with their true bin expression, one per seed."""
    return [synthetic_training_data(s, shape, spacing_um, bin_shape) for s in seeds]


def user_pairs(
    data: UserData, config: MagNetConfig | None = None
) -> tuple[list[TrainingData], list[TrainingData]]:
    """A user's image volume and its cells or transcripts in ``USER_BIN`` bins, as (train,
    validation) pairs; the validation part holds at least one window of ``region_bins`` bins."""
    w, b = (config or MagNetConfig()).region_bins, USER_BIN
    window = (1, w * b[1], w * b[2])
    train, val = user_training_data(data, b, patch=window)
    return [train], [val]


class WindowSampler:
    """Windows of ``region_bins`` x ``region_bins`` bins of one z slab, from (image, counts) pairs.

    A window starting at bin (y, x) is read in a frame shifted to that bin, so its spot and region
    tiles are aligned to it and every window has the same grids (and stacks into a batch), while
    the context around it is the real tissue: the frame's volume starts at (-y, -x).
    """

    def __init__(self, data: list[TrainingData], config: MagNetConfig) -> None:
        self.config = config
        self.items = [(array_reader(to_uint8(d.image)), d.cond, d.bin) for d in data]
        w = config.region_bins
        for _, cond, _ in self.items:
            if min(cond.shape[2:]) < w:
                raise ValueError(f"training images need at least {w} x {w} bins in-plane")

    def window(self, item: int, z: int, y: int, x: int):
        """Inputs and targets of the window whose first core bin is (z, y, x)."""
        read, cond, b = self.items[item]
        w, cfg = self.config.region_bins, self.config
        shift = np.asarray((0, y * b[1], x * b[2]))

        def shifted(box: Box) -> np.ndarray:
            return read(Box(tuple(np.asarray(box.begin) + shift), box.shape))

        volume = Box((0, -y, -x), cond.shape[1:])
        inputs = level_inputs(shifted, Box((z, 0, 0), (1, w, w)), volume, b, cfg)
        counts = cond[:, z : z + 1, y : y + w, x : x + w].transpose(1, 2, 3, 0)  # (1, w, w, G)
        k = cfg.spot_bins
        spot = counts.reshape(1, w // k, k, w // k, k, -1).mean(axis=(2, 4))
        region = counts.mean(axis=(1, 2), keepdims=True)
        targets = {"bin": np.log1p(counts), "spot": np.log1p(spot), "region": np.log1p(region)}
        return inputs, {n: torch.from_numpy(v.astype(np.float32)) for n, v in targets.items()}

    def origins(self, item: int, step: int | None = None) -> list[tuple[int, int, int]]:
        """Window origins of an item: every ``step`` bins (default: tiling windows)."""
        cond, w = self.items[item][1], self.config.region_bins
        _, nz, ny, nx = cond.shape
        step = step or w
        return [
            (z, y, x)
            for z in range(nz)
            for y in range(0, ny - w + 1, step)
            for x in range(0, nx - w + 1, step)
        ]

    def batch(self, size: int, rng: np.random.Generator):
        """Windows at random bins of random items."""
        picks = []
        w = self.config.region_bins
        for _ in range(size):
            item = int(rng.integers(len(self.items)))
            _, nz, ny, nx = self.items[item][1].shape
            origin = (rng.integers(nz), rng.integers(ny - w + 1), rng.integers(nx - w + 1))
            picks.append(self.window(item, *(int(v) for v in origin)))
        inputs = concat([p[0] for p in picks])
        targets = {n: torch.cat([p[1][n] for p in picks]) for n in picks[0][1]}
        return inputs, targets


def loss_of(kind: str, pred: dict, targets: dict, config: MagNetConfig) -> torch.Tensor:
    """MagNet's loss of its paper, or the baseline's: MSE and gene-wise PCC of the bins."""
    if kind == "magnet":
        return magnet_loss(pred, targets, config.spot_bins)["loss"]
    p, t = pred["bin"].flatten(0, 2), targets["bin"].flatten(0, 2)
    return 0.75 * F.mse_loss(p, t) + 0.1 * (1 - pearson(p, t, 0).mean())


@torch.no_grad()
def validate(model, sampler: WindowSampler) -> dict[str, float]:
    """Bin-level PCC (per gene across bins) and MSE over every window of the validation data."""
    model.eval()
    preds, truths = [], []
    device = next(model.parameters()).device
    for item in range(len(sampler.items)):
        for origin in sampler.origins(item):
            inputs, targets = sampler.window(item, *origin)
            preds.append(model(to_device(inputs, device))["bin"].flatten(0, 2).float().cpu())
            truths.append(targets["bin"].flatten(0, 2))
    model.train()
    p, t = torch.cat(preds), torch.cat(truths)
    return {"val_pcc_gene": float(pearson(p, t, 0).mean()), "val_mse": float(F.mse_loss(p, t))}


def train_magnet(
    out: Path,
    steps: int = 800,
    recipe: Recipe = MAGNET_RECIPE,
    kind: str = "magnet",
    volume: Shape = (8, 512, 512),
    config: MagNetConfig | None = None,
    data: tuple[list[TrainingData], list[TrainingData]] | None = None,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
    options: TrainOptions | None = None,
) -> list[dict]:
    """Train MagNet (``kind="magnet"``) or the bin-crop CNN baseline and save it to ``out``.

    ``data`` (train, validation) defaults to synthetic renders of seeds ``recipe.seed`` .. ``+ 2``
    (validation: ``recipe.seed + 1000``). ``options``: processes, accumulation, EMA, training
    states, figures (default: one process as before). Windows come from a running stream (one
    per rank). Returns the log.
    """
    if kind not in TRAINED_KINDS:
        raise ValueError(f"kind must be one of {sorted(TRAINED_KINDS)}, got {kind!r}")
    seed = recipe.seed
    rng, _ = recipe.start()
    if data is None:
        data = (
            synthetic_pairs((seed, seed + 1, seed + 2), volume),
            synthetic_pairs((seed + 1000,), (4, 256, 256)),
        )
    train, val = data
    genes, bin_shape = train[0].genes, train[0].bin
    cfg = config or MagNetConfig()
    cfg = MagNetConfig.from_dict(cfg.to_dict() | {"genes": len(genes), "bin_px": bin_shape[2]})
    model = KINDS[kind].model(cfg)
    sampler, val_sampler = WindowSampler(train, cfg), WindowSampler(val, cfg)
    model.train()
    stage = Stage(
        model,
        steps,
        recipe.lr,
        batch=streamed(lambda n: sampler.batch(n, rng)),
        loss=lambda b: Losses.single("loss", loss_of(kind, model(b[0]), b[1], cfg)),
        batch_size=recipe.batch,
        validate=lambda: validate(model, val_sampler),
        log_every=log_every,
        warmup_cap=50,
        streams=(rng,),
    )
    history = TrainingLog(log, on_log)
    run = {"kind": kind, "config": cfg.to_dict(), "steps": steps, **recipe.to_dict()}
    with Trainer(model, options, out, run, history.entries) as trainer:
        run_stage(stage, history, trainer=trainer)
        meta = {"config": cfg.to_dict(), "genes": list(genes), "bin": list(bin_shape)}
        training = {"kind": kind, "steps": steps, **recipe.to_dict()}
        save_trained(out, model, kind, meta, training, history, trainer)
    return history.entries
