"""SPATIA's sizes, and how a cell's expression enters the model (shared by its encoder and its
generator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import ModelConfig, check_heads, check_unet_plane

LIBRARY_SCALE = 100.0
"""Expression values are log1p(LIBRARY_SCALE * count / cell total)."""


@dataclass(frozen=True)
class SpatiaConfig(ModelConfig):
    """Sizes of the model. ``crop`` is (z, y, x) voxels around the centroid; z = 1 is a 2-D crop
    (the centroid's slice); z > 1 stacks the slices as channels of the ViT and the generator."""

    genes: int = 32
    channels: int = 2
    crop: tuple[int, int, int] = (1, 32, 32)
    patch: int = 4
    dim: int = 64
    heads: int = 4
    morph_layers: int = 2
    gene_layers: int = 2
    fusion_layers: int = 1
    embed_dim: int = 32
    context_layers: int = 2
    cell_types: int = 9
    gen_channels: int = 16
    gen_mults: tuple[int, ...] = (1, 2, 2)
    time_dim: int = 64

    def __post_init__(self) -> None:
        check_heads(self.dim, self.heads)
        if self.crop[1] % self.patch or self.crop[2] % self.patch:
            raise ValueError(f"crop {self.crop} in-plane must be whole ViT patches {self.patch}")
        check_unet_plane(self.crop, len(self.gen_mults), "crop")

    @property
    def in_channels(self) -> int:
        return self.channels * self.crop[0]

    @property
    def tokens(self) -> int:
        return (self.crop[1] // self.patch) * (self.crop[2] // self.patch)


def expression_values(counts: torch.Tensor, gene_mask: torch.Tensor | None = None):
    """(log-normalised values (B, G), log1p of the observed total (B, 1)); masked genes are
    left out of the total and read as 0."""
    observed = counts if gene_mask is None else counts * (~gene_mask)
    total = observed.sum(dim=1, keepdim=True)
    values = torch.log1p(LIBRARY_SCALE * observed / total.clamp_min(1.0))
    return values, torch.log1p(total)
