"""Layers the project's models share."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of times ``t`` (B,), multiplied by ``scale`` first (1000 for
    flow times in [0, 1], 1 for diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """Group norm over ``channels`` in up to 8 groups."""
    return nn.GroupNorm(math.gcd(8, channels), channels)
