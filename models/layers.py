"""Layers the project's models share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def resized_like(h: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``h`` resized (nearest) to ``ref``'s spatial size where a UNet's down-sampling of an odd
    size left them apart; ``h`` itself otherwise."""
    if h.shape[2:] == ref.shape[2:]:
        return h
    return F.interpolate(h, size=ref.shape[2:], mode="nearest")


def unet_down(
    h: torch.Tensor, blocks: nn.ModuleList, downsamplers: nn.ModuleList, emb: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A UNet's encoder: each block (given ``emb``) in turn, its output kept as a skip and
    down-sampled before the next; returns the deepest features and the skips."""
    skips = []
    for i, block in enumerate(blocks):
        h = block(h, emb)
        skips.append(h)
        if i < len(downsamplers):
            h = downsamplers[i](h)
    return h, skips
