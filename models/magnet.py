"""MagNet, after Zhu et al.: gene expression per bin predicted from images at three resolutions.

Each bin is seen three ways: its own crop (the bin plus a margin), the spot tile and the region
tile that contain it (coarser levels of the same image). The bin feature queries the tile
features by cross-attention (``x = x + CA(spot) + CA(region)``); graph attention over the k = 8
nearest neighbours on each level's grid (the 3 x 3 neighbourhood of a regular grid) mixes
neighbouring bins, spots and regions; a transformer over the three level tokens, mean-pooled
and joined with the bin level's token, feeds a shared head predicting G genes (log1p counts).
Tile heads predict each tile's mean expression for the paper's tile-level and cross-resolution
losses.

Everything is laid out on dense grids of one bin slab: ``(S, H, W, ...)`` with S independent slabs
(z slabs at inference, training samples in a batch), so block-wise and whole-volume runs compute
the same numbers. Pure torch: no storage, no orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, check_heads

LEVELS = ("bin", "spot", "region")


@dataclass(frozen=True)
class MagNetConfig(ModelConfig):
    """Sizes of MagNet. Images enter as (C, px, px) in [0, 1]: the bin crop at full resolution
    (``bin_px`` plus ``margin_px`` each side), spot and region tiles (``spot_bins`` and
    ``region_bins`` bins a side) mean-pooled to ``tile_px``."""

    genes: int = 32
    channels: int = 2
    bin_px: int = 16
    margin_px: int = 8
    spot_bins: int = 4
    region_bins: int = 8
    tile_px: int = 16
    dim: int = 64
    heads: int = 4
    level_layers: int = 2

    def __post_init__(self) -> None:
        check_heads(self.dim, self.heads)
        if self.region_bins % self.spot_bins:
            raise ValueError("region_bins must be a multiple of spot_bins")
        for name in ("spot", "region"):
            side = getattr(self, f"{name}_bins") * self.bin_px
            if side % self.tile_px:
                raise ValueError(f"{name} tile ({side} px) is not a multiple of tile_px")

    @property
    def crop_px(self) -> int:
        return self.bin_px + 2 * self.margin_px

    def pool(self, level: str) -> int:
        """Pixels of the full-resolution image per pixel of ``level``'s tile."""
        return getattr(self, f"{level}_bins") * self.bin_px // self.tile_px


def conv_encoder(channels: int, dim: int, downsamplings: int) -> nn.Sequential:
    """A small strided CNN: (N, C, p, p) -> (N, dim, p / 2^k, p / 2^k)."""
    layers: list[nn.Module] = []
    width = 16
    c = channels
    for i in range(downsamplings):
        out = dim if i == downsamplings - 1 else width * 2**i
        layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.GELU()]
        c = out
    layers += [nn.Conv2d(c, dim, 3, padding=1)]
    return nn.Sequential(*layers)


class BinEncoder(nn.Module):
    """Bin crop -> one feature vector (the ST-Net-like baseline uses it alone)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.cnn = conv_encoder(channels, dim, 3)
        self.norm = nn.LayerNorm(dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.norm(self.cnn(crops).mean(dim=(2, 3)))


class TileEncoder(nn.Module):
    """Tile -> a map of tokens (key/value of the fusion) and its pooled vector."""

    def __init__(self, channels: int, dim: int, tile_px: int) -> None:
        super().__init__()
        self.cnn = conv_encoder(channels, dim, 2)
        side = tile_px // 4
        self.position = nn.Parameter(torch.zeros(1, side * side, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.cnn(tiles).flatten(2).transpose(1, 2) + self.position
        tokens = self.norm(tokens)
        return tokens, tokens.mean(dim=1)


class GridGraphAttention(nn.Module):
    """Graph attention (GraphSAGE-like) over the 8 nearest neighbours on a regular grid.

    ``x`` (S, H, W, D) with ``valid`` (S, H, W): a node attends to its valid 3 x 3 neighbours
    (itself included); the aggregate is concatenated with the node and projected, residually.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        s, h, w, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k, v = _neighbours(k), _neighbours(v)  # (S, H, W, 9, D)
        mask = _neighbours(valid[..., None].to(x.dtype))[..., 0] > 0  # (S, H, W, 9)
        hd = d // self.heads
        q = q.reshape(s, h, w, 1, self.heads, hd)
        k = k.reshape(s, h, w, 9, self.heads, hd)
        v = v.reshape(s, h, w, 9, self.heads, hd)
        logits = (q * k).sum(-1) / hd**0.5  # (S, H, W, 9, heads)
        logits = logits.masked_fill(~mask[..., None], -1e4)
        # a node with no valid neighbour (outside the data) aggregates nothing
        weights = logits.softmax(dim=3) * mask[..., None]
        agg = (weights[..., None] * v).sum(dim=3).reshape(s, h, w, d)
        return self.norm(x + self.proj(torch.cat([x, agg], dim=-1)))


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """(S, H, W, D) -> (S, H, W, 9, D): each node's 3 x 3 neighbourhood, zero beyond the grid."""
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    h, w = x.shape[1], x.shape[2]
    shifts = [padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return torch.stack(shifts, dim=3)


@dataclass
class LevelInputs:
    """Dense grids of one or more bin slabs, each grown by one ring for graph attention.

    ``crops`` (S, Hb, Wb, C, p, p) and ``bin_valid`` (S, Hb, Wb); ``spots``/``regions`` (S, Hs, Ws,
    C, t, t) with their ``*_valid``; ``spot_of_bin``/``region_of_bin`` (Hb, Wb) flat indices into
    the spot / region grid of each bin.
    """

    crops: torch.Tensor
    bin_valid: torch.Tensor
    spots: torch.Tensor
    spot_valid: torch.Tensor
    regions: torch.Tensor
    region_valid: torch.Tensor
    spot_of_bin: torch.Tensor
    region_of_bin: torch.Tensor

    def to(self, device: torch.device | str) -> LevelInputs:
        """The same inputs on ``device``."""
        return LevelInputs(**{k: v.to(device) for k, v in vars(self).items()})


class MagNet(nn.Module):
    """Bin crop + spot and region tiles -> G genes per bin (log1p counts)."""

    def __init__(self, config: MagNetConfig) -> None:
        super().__init__()
        self.config = config
        c, d = config.channels, config.dim
        self.bin_encoder = BinEncoder(c, d)
        self.tile_encoders = nn.ModuleDict(
            {n: TileEncoder(c, d, config.tile_px) for n in LEVELS[1:]}
        )
        self.fusion = nn.ModuleDict(
            {n: nn.MultiheadAttention(d, config.heads, batch_first=True) for n in LEVELS[1:]}
        )
        self.fusion_norm = nn.LayerNorm(d)
        self.graph = nn.ModuleDict({n: GridGraphAttention(d, config.heads) for n in LEVELS})
        self.level_embedding = nn.Parameter(torch.zeros(len(LEVELS), d))
        layer = nn.TransformerEncoderLayer(
            d, config.heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.levels = nn.TransformerEncoder(layer, config.level_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, config.genes))
        self.tile_heads = nn.ModuleDict({n: nn.Linear(d, config.genes) for n in LEVELS[1:]})

    def forward(self, inputs: LevelInputs) -> dict[str, torch.Tensor]:
        """Predictions on the interior (ring excluded) of each grid:
        ``bin`` (S, Hb-2, Wb-2, G), ``spot`` (S, Hs-2, Ws-2, G), ``region`` likewise."""
        s, hb, wb = inputs.bin_valid.shape
        crops = inputs.crops.flatten(0, 2)
        x = self.bin_encoder(crops).reshape(s, hb * wb, -1)  # (S, Nb, D)
        pooled, index = {}, {"spot": inputs.spot_of_bin, "region": inputs.region_of_bin}
        for level, tiles in (("spot", inputs.spots), ("region", inputs.regions)):
            gh, gw = tiles.shape[1:3]
            tokens, vector = self.tile_encoders[level](tiles.flatten(0, 2))
            tokens = tokens.reshape(s, gh * gw, *tokens.shape[1:])
            pooled[level] = vector.reshape(s, gh, gw, -1)
            keys = tokens[:, index[level].flatten()].flatten(0, 1)  # (S*Nb, T, D)
            query = x.flatten(0, 1)[:, None]
            attended, _ = self.fusion[level](query, keys, keys, need_weights=False)
            x = x + attended.reshape(x.shape)
        x = self.fusion_norm(x).reshape(s, hb, wb, -1)
        bins = self.graph["bin"](x, inputs.bin_valid)[:, 1:-1, 1:-1]
        spots = self.graph["spot"](pooled["spot"], inputs.spot_valid)
        regions = self.graph["region"](pooled["region"], inputs.region_valid)
        inner = (slice(1, -1), slice(1, -1))
        si = inputs.spot_of_bin[inner].flatten()
        ri = inputs.region_of_bin[inner].flatten()
        tokens = torch.stack(
            [bins.flatten(1, 2), spots.flatten(1, 2)[:, si], regions.flatten(1, 2)[:, ri]], dim=2
        )  # (S, Nb_inner, 3, D)
        levels = self.levels((tokens + self.level_embedding).flatten(0, 1))
        # the paper's mean over levels, plus the bin level's own token: without it the prediction
        # drifts toward the neighbourhood's mean (measured; see docs/ARCHITECTURE.md)
        fused = torch.cat([levels.mean(dim=1), levels[:, 0]], dim=-1)
        out = self.head(fused).reshape(s, hb - 2, wb - 2, -1)
        return {
            "bin": out,
            "spot": self.tile_heads["spot"](spots[:, 1:-1, 1:-1]),
            "region": self.tile_heads["region"](regions[:, 1:-1, 1:-1]),
        }


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation along ``dim`` (zero where either side is constant)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    den = (a.square().sum(dim) * b.square().sum(dim) + 1e-12).sqrt()  # finite gradient at 0
    return (a * b).sum(dim) / den


def magnet_loss(
    pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor], spot_bins: int
) -> dict[str, torch.Tensor]:
    """The paper's loss: 0.75 MSE + 0.1 (1 - PCC) at the bin level, 0.05 (1 - PCC) at each tile
    level, 0.05 cross-resolution consistency (each spot's prediction against the mean of its
    bins' predictions). PCC is per gene across the batch's bins. Targets are log1p counts."""
    terms: dict[str, torch.Tensor] = {}
    b, t = pred["bin"].flatten(0, 2), target["bin"].flatten(0, 2)
    terms["mse"] = F.mse_loss(b, t)
    terms["pcc"] = 1 - pearson(b, t, 0).mean()
    for level in ("spot", "region"):
        p, q = pred[level].flatten(0, 2), target[level].flatten(0, 2)
        terms[f"pcc_{level}"] = 1 - pearson(p, q, 0).mean() if len(p) > 1 else F.mse_loss(p, q)
    s, h, w, g = pred["bin"].shape
    k = spot_bins
    bins = pred["bin"][:, : h // k * k, : w // k * k]
    mean = bins.reshape(s, h // k, k, w // k, k, g).mean(dim=(2, 4))
    spots = pred["spot"][:, : h // k, : w // k]
    terms["consistency"] = F.mse_loss(mean, spots)
    terms["loss"] = (
        0.75 * terms["mse"]
        + 0.1 * terms["pcc"]
        + 0.05 * (terms["pcc_spot"] + terms["pcc_region"])
        + 0.05 * terms["consistency"]
    )
    return terms


class BinCNN(nn.Module):
    """The ST-Net-like baseline: the bin crop alone through a CNN to G genes."""

    def __init__(self, config: MagNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BinEncoder(config.channels, config.dim)
        self.head = nn.Linear(config.dim, config.genes)

    def forward(self, inputs: LevelInputs) -> dict[str, torch.Tensor]:
        s, hb, wb = inputs.bin_valid.shape
        inner = inputs.crops[:, 1:-1, 1:-1].flatten(0, 2)
        out = self.head(self.encoder(inner)).reshape(s, hb - 2, wb - 2, -1)
        return {"bin": out}
