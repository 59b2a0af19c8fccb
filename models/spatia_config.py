"""SPATIA's sizes, and how a cell's expression enters the model (shared by its encoder and its
generator)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

LIBRARY_SCALE = 100.0
"""Expression values are log1p(LIBRARY_SCALE * count / cell total)."""


@dataclass(frozen=True)
class SpatiaConfig:
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
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.crop[1] % self.patch or self.crop[2] % self.patch:
            raise ValueError(f"crop {self.crop} in-plane must be whole ViT patches {self.patch}")
        factor = 2 ** (len(self.gen_mults) - 1)
        if self.crop[1] % factor or self.crop[2] % factor:
            raise ValueError(f"crop {self.crop} in-plane must be divisible by {factor} (UNet)")

    @property
    def in_channels(self) -> int:
        return self.channels * self.crop[0]

    @property
    def tokens(self) -> int:
        return (self.crop[1] // self.patch) * (self.crop[2] // self.patch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpatiaConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def expression_values(counts: torch.Tensor, gene_mask: torch.Tensor | None = None):
    """(log-normalised values (B, G), log1p of the observed total (B, 1)); masked genes are
    left out of the total and read as 0."""
    observed = counts if gene_mask is None else counts * (~gene_mask)
    total = observed.sum(dim=1, keepdim=True)
    values = torch.log1p(LIBRARY_SCALE * observed / total.clamp_min(1.0))
    return values, torch.log1p(total)
